"""Every JAX transformation: vmap, jvp, grad of grad, hvp, jit, eval_shape."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from deformjax import deform_conv, deform_roi_pool, dilated_conv


def conv_inputs(rng, batch=()):
    n, h, w, c, o = 1, 5, 6, 2, 3
    size = lambda *s: batch + s  # noqa: E731
    off = rng.integers(-2, 3, size=size(n, h, w, 18)) + rng.uniform(0.2, 0.8, size=size(n, h, w, 18))
    return dict(
        x=rng.normal(size=size(n, h, w, c)),
        offset=off,
        kernel=rng.normal(size=size(3, 3, c, o)),
        mask=rng.uniform(0.2, 1.0, size=size(n, h, w, 9)),
        bias=rng.normal(size=size(o)),
    )


ROIS = np.array([[0, 1.3, 0.7, 6.1, 5.2], [0, 3.4, 2.2, 7.6, 7.9], [0, 0.6, 4.1, 4.9, 6.3]])
POOL = dict(output_size=(2, 3), sampling_ratio=2, gamma=0.1)


def pool_inputs(rng, batch=()):
    return dict(
        features=rng.normal(size=batch + (1, 9, 9, 2)),
        offset=rng.normal(scale=0.2, size=batch + (3, 2, 3, 2)),
        mask=rng.uniform(0.2, 1.0, size=batch + (3, 2, 3, 1)),
    )


def conv_fn(x, offset, kernel, mask, bias):
    return deform_conv(x, offset, kernel, mask, bias, padding=1)


def pool_fn(features, offset, mask):
    return deform_roi_pool(features, ROIS, offset, mask, **POOL)


def dilated_fn(x, kernel, bias):
    return dilated_conv(x, kernel, bias, dilation=2)


@pytest.mark.parametrize(
    "in_axes",
    [(0, 0, 0, 0, 0), (None, 0, None, 0, None), (None, None, 0, None, 0), (1, 1, None, 1, None)],
)
def test_vmap_deform_conv_matches_loop(rng, in_axes):
    batched = conv_inputs(rng, batch=(3,))
    shared = conv_inputs(rng)
    args = []
    for key, axis in zip(("x", "offset", "kernel", "mask", "bias"), in_axes):
        value = batched[key] if axis is not None else shared[key]
        if axis == 1:
            value = np.moveaxis(value, 0, 1)
        args.append(value)
    out = jax.jit(jax.vmap(conv_fn, in_axes=in_axes))(*args)
    for b in range(3):
        sliced = [a if ax is None else np.take(a, b, axis=ax) for a, ax in zip(args, in_axes)]
        np.testing.assert_allclose(out[b], conv_fn(*sliced), rtol=1e-12, atol=1e-12)


def test_vmap_roi_pool_and_dilated_conv_match_loop(rng):
    batched = pool_inputs(rng, batch=(2,))
    out = jax.vmap(pool_fn)(*batched.values())
    for b in range(2):
        np.testing.assert_allclose(out[b], pool_fn(*(v[b] for v in batched.values())),
                                   rtol=1e-12, atol=1e-12)
    x = rng.normal(size=(2, 1, 7, 7, 2))
    kernel = rng.normal(size=(2, 3, 3, 2, 3))
    out = jax.vmap(dilated_fn, in_axes=(0, 0, None))(x, kernel, None)
    for b in range(2):
        np.testing.assert_allclose(out[b], dilated_fn(x[b], kernel[b], None), rtol=1e-12)


def central_difference(fn, args, tangents, eps=1e-6):
    up = [a + eps * t for a, t in zip(args, tangents)]
    down = [a - eps * t for a, t in zip(args, tangents)]
    return (fn(*up) - fn(*down)) / (2 * eps)


@pytest.mark.parametrize(
    "fn, make, wrt",
    [
        (conv_fn, conv_inputs, ("x",)),
        (conv_fn, conv_inputs, ("offset",)),
        (conv_fn, conv_inputs, ("kernel",)),
        (conv_fn, conv_inputs, ("mask",)),
        (conv_fn, conv_inputs, ("x", "offset", "kernel", "mask", "bias")),
        (pool_fn, pool_inputs, ("features",)),
        (pool_fn, pool_inputs, ("offset",)),
        (pool_fn, pool_inputs, ("features", "offset", "mask")),
    ],
    ids=lambda v: getattr(v, "__name__", None) or "+".join(v),
)
def test_jvp_equals_central_differences(fn, make, wrt, rng):
    inputs = make(rng)
    args = list(inputs.values())
    tangents = [rng.normal(size=np.shape(v)) if k in wrt else np.zeros(np.shape(v))
                for k, v in inputs.items()]
    _, jvp = jax.jvp(fn, args, tangents)
    np.testing.assert_allclose(jvp, central_difference(fn, args, tangents), rtol=1e-6, atol=1e-7)


def test_jvp_dilated_conv(rng):
    args = [rng.normal(size=(1, 7, 7, 2)), rng.normal(size=(3, 3, 2, 3)), rng.normal(size=(3,))]
    tangents = [rng.normal(size=a.shape) for a in args]
    _, jvp = jax.jvp(dilated_fn, args, tangents)
    np.testing.assert_allclose(jvp, central_difference(dilated_fn, args, tangents),
                               rtol=1e-6, atol=1e-7)


def test_second_order_deform_conv(rng):
    inputs = conv_inputs(rng)
    check_grads(conv_fn, tuple(inputs.values()), order=2, modes=("fwd", "rev"))


def test_second_order_deform_roi_pool(rng):
    inputs = pool_inputs(rng)
    check_grads(pool_fn, tuple(inputs.values()), order=2, modes=("fwd", "rev"))


def test_second_order_dilated_conv(rng):
    args = (rng.normal(size=(1, 7, 7, 2)), rng.normal(size=(3, 3, 2, 3)), rng.normal(size=(3,)))
    check_grads(dilated_fn, args, order=2, modes=("fwd", "rev"))


def test_hessian_vector_product_wrt_offsets(rng):
    """Forward-over-reverse hvp equals central differences of the gradient."""
    inputs = conv_inputs(rng)

    def loss(offset):
        return jnp.sum(jnp.sin(conv_fn(inputs["x"], offset, inputs["kernel"], inputs["mask"],
                                       inputs["bias"])))

    offset = inputs["offset"]
    v = rng.normal(size=offset.shape)
    hvp = jax.jvp(jax.grad(loss), (offset,), (v,))[1]
    eps = 1e-6
    expected = (jax.grad(loss)(offset + eps * v) - jax.grad(loss)(offset - eps * v)) / (2 * eps)
    np.testing.assert_allclose(hvp, expected, rtol=1e-5, atol=1e-6)
    # ... and reverse-over-reverse agrees with forward-over-reverse.
    hvp_rev = jax.grad(lambda o: jnp.vdot(jax.grad(loss)(o), v))(offset)
    np.testing.assert_allclose(hvp_rev, hvp, rtol=1e-9, atol=1e-10)


def test_jit_with_static_and_traced_arguments(rng):
    inputs = conv_inputs(rng)

    @functools.partial(jax.jit, static_argnames=("strides", "padding"))
    def run(x, offset, kernel, *, strides, padding):
        return deform_conv(x, offset, kernel, strides=strides, padding=padding)

    x, offset, kernel = inputs["x"], inputs["offset"], inputs["kernel"]
    np.testing.assert_allclose(run(x, offset, kernel, strides=1, padding=1),
                               deform_conv(x, offset, kernel, padding=1), rtol=1e-12)
    # padding given as nested lists (unhashable) works outside jit's static args too
    np.testing.assert_allclose(deform_conv(x, offset, kernel, padding=[[1, 1], [1, 1]]),
                               deform_conv(x, offset, kernel, padding=1), rtol=1e-12)
    # the RoIs may be traced: they are data, not configuration
    pooled = jax.jit(lambda f, r: deform_roi_pool(f, r, **POOL))
    features = pool_inputs(rng)["features"]
    np.testing.assert_allclose(pooled(features, ROIS), deform_roi_pool(features, ROIS, **POOL),
                               rtol=1e-12)


def test_eval_shape(rng):
    shape = jax.ShapeDtypeStruct
    out = jax.eval_shape(
        functools.partial(deform_conv, strides=2, padding=1),
        shape((2, 9, 9, 4), jnp.float32), shape((2, 5, 5, 36), jnp.float32),
        shape((3, 3, 4, 8), jnp.float32), shape((2, 5, 5, 18), jnp.float32), None,
    )
    assert out.shape == (2, 5, 5, 8) and out.dtype == jnp.float32
    out = jax.eval_shape(functools.partial(deform_roi_pool, output_size=7),
                         shape((1, 16, 16, 3), jnp.bfloat16), shape((10, 5), jnp.float32))
    assert out.shape == (10, 7, 7, 3) and out.dtype == jnp.bfloat16
    out = jax.eval_shape(functools.partial(dilated_conv, dilation=3),
                         shape((1, 16, 16, 3), jnp.float32), shape((3, 3, 3, 5), jnp.float32))
    assert out.shape == (1, 16, 16, 5)
