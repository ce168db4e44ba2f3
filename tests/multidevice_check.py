"""Multi-device training checks, run by test_multidevice.py in a subprocess.

XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before jax is
imported, which is why this is a script of its own. Everything runs in
float64 so that "the same parameters" can be checked to 1e-10 even though the
devices sum their shards in a different order.
"""

import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deformjax import DeformConv, DilatedConv, deform_conv

jax.config.update("jax_enable_x64", True)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), param_dtype=jnp.float64)(x))
        x = nn.relu(DeformConv(6, 3, modulated=True, param_dtype=jnp.float64)(x))
        x = nn.relu(DilatedConv(6, 3, kernel_dilation=2, param_dtype=jnp.float64)(x))
        x = nn.relu(DeformConv(8, 3, strides=2, param_dtype=jnp.float64)(x))
        return nn.Dense(3, param_dtype=jnp.float64)(x.mean(axis=(1, 2)))


def main():
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 10, 10, 2)))
    y = jnp.asarray(rng.integers(0, 3, size=(8,)))
    model = Net()
    params = model.init(jax.random.key(0), x[:1])["params"]
    tx = optax.adam(1e-2)

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    steps = 4
    # One device.
    p1, s1 = params, tx.init(params)
    single = jax.jit(step)
    for _ in range(steps):
        p1, s1, loss1 = single(p1, s1, x, y)
    moved = jnp.abs(p1["DeformConv_0"]["offset"]["kernel"]).max()
    assert moved > 0, "the offset branch did not train"

    # jit over a Mesh: the batch sharded across 4 devices, parameters replicated.
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    p2 = jax.device_put(params, replicated)
    s2 = jax.device_put(tx.init(params), replicated)
    xs, ys = jax.device_put(x, sharded), jax.device_put(y, sharded)
    sharded_step = jax.jit(step, in_shardings=(replicated, replicated, sharded, sharded),
                           out_shardings=(replicated, replicated, replicated))
    for _ in range(steps):
        p2, s2, loss2 = sharded_step(p2, s2, xs, ys)
    assert xs.sharding.num_devices == 4 and len(xs.addressable_shards) == 4
    compare(p1, p2, "jit + NamedSharding")

    # pmap: one replica per device, gradients averaged with lax.pmean.
    def pstep(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        grads, loss = lax.pmean((grads, loss), axis_name="batch")
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    pmapped = jax.pmap(pstep, axis_name="batch")
    stack = lambda tree: jax.tree_util.tree_map(  # noqa: E731  one copy per device
        lambda a: jnp.broadcast_to(a, (4,) + jnp.shape(a)), tree)
    p3, s3 = stack(params), stack(tx.init(params))
    xr, yr = x.reshape(4, 2, *x.shape[1:]), y.reshape(4, 2)
    for _ in range(steps):
        p3, s3, loss3 = pmapped(p3, s3, xr, yr)
    compare(p1, jax.tree_util.tree_map(lambda a: a[0], p3), "pmap + pmean")
    np.testing.assert_allclose(float(loss3[0]), float(loss1), rtol=1e-10)

    # Model parallel: the kernel's output channels sharded over 4 devices.
    mesh = Mesh(np.array(jax.devices()), ("model",))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 8)))
    inputs = jnp.asarray(rng.normal(size=(2, 7, 7, 4)))
    offset = jnp.asarray(rng.normal(size=(2, 7, 7, 18)))
    fn = functools.partial(deform_conv, padding=1)
    expected = fn(inputs, offset, kernel)
    expected_grad = jax.grad(lambda k: (fn(inputs, offset, k) ** 2).sum())(kernel)
    ks = jax.device_put(kernel, NamedSharding(mesh, P(None, None, None, "model")))
    out = jax.jit(fn, out_shardings=NamedSharding(mesh, P(None, None, None, "model")))(
        inputs, offset, ks
    )
    assert len(out.addressable_shards) == 4
    assert out.addressable_shards[0].data.shape == (2, 7, 7, 2)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    grad = jax.jit(jax.grad(lambda k: (fn(inputs, offset, k) ** 2).sum()))(ks)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-10)
    print("model parallel: same output and kernel gradient")
    print("ALL OK")


def compare(expected, actual, what):
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), expected, actual))
    worst = max(leaves)
    if worst > 1e-10:
        sys.exit(f"{what}: parameters differ from one device by {worst}")
    moved = jax.tree_util.tree_leaves(expected)
    print(f"{what}: same parameters as one device after training (max diff {worst:.1e}, "
          f"{len(moved)} arrays)")


if __name__ == "__main__":
    main()
