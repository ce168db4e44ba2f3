"""deformjax.nnx: the NNX twins equal the linen modules, train, checkpoint, and never warn."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deformjax
import deformjax.nnx as djnnx

X = np.random.default_rng(0).normal(size=(2, 9, 9, 4)).astype(np.float32)
ROIS = np.array([[0, 1.0, 1.0, 7.0, 6.0], [1, 0.0, 2.5, 8.0, 8.0], [-1, 0, 0, 0, 0]], np.float32)


def perturbed(variables, scale=0.1):
    """Moves every parameter (zero-initialised offset branches too) off its initial value."""
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


TWINS = {
    "DeformConv": (
        lambda: deformjax.DeformConv(6, 3, strides=2, padding=1, offset_groups=2, modulated=True),
        lambda: djnnx.DeformConv(4, 6, 3, strides=2, padding=1, offset_groups=2, modulated=True,
                                 rngs=nnx.Rngs(1)),
        (X,),
    ),
    "DilatedConv": (
        lambda: deformjax.DilatedConv(5, 3, kernel_dilation=2, feature_group_count=1),
        lambda: djnnx.DilatedConv(4, 5, 3, kernel_dilation=2, rngs=nnx.Rngs(1)),
        (X,),
    ),
    "DeformRoIPool": (
        lambda: deformjax.DeformRoIPool(3, sampling_ratio=2, modulated=True, deform_fc_channels=8),
        lambda: djnnx.DeformRoIPool(4, 3, sampling_ratio=2, modulated=True, deform_fc_channels=8,
                                    rngs=nnx.Rngs(1)),
        (X, ROIS),
    ),
    "DeformPSRoIPool": (
        lambda: deformjax.DeformPSRoIPool((2, 1), sampling_ratio=2),
        lambda: djnnx.DeformPSRoIPool(4, (2, 1), sampling_ratio=2, rngs=nnx.Rngs(1)),
        (X, ROIS),
    ),
    "ASPP": (
        lambda: deformjax.ASPP(features=8, rates=(2,), dropout_rate=0.0),
        lambda: djnnx.ASPP(4, features=8, rates=(2,), dropout_rate=0.0, rngs=nnx.Rngs(1)),
        (X,),
    ),
}


@pytest.mark.parametrize("name", sorted(TWINS))
def test_nnx_twin_equals_linen_forward_and_gradients(name):
    make_linen, make_nnx, inputs = TWINS[name]
    linen = make_linen()
    variables = perturbed(linen.init(jax.random.key(0), *inputs))
    model = make_nnx()
    if name == "ASPP":
        model.eval()
    djnnx.from_linen(model, variables)
    # the one-line mapping back gives the same tree
    assert jax.tree_util.tree_structure(djnnx.to_linen(model)) == jax.tree_util.tree_structure(
        variables)

    def linen_loss(params, first):
        out = linen.apply({**variables, "params": params}, first, *inputs[1:])
        return (out ** 2).sum()

    def nnx_loss(model, first):
        return (model(first, *inputs[1:]) ** 2).sum()

    value, (g_params, g_input) = jax.jit(jax.value_and_grad(linen_loss, argnums=(0, 1)))(
        variables["params"], inputs[0])
    nnx_value, (nnx_grads, nnx_input) = nnx.jit(nnx.value_and_grad(nnx_loss, argnums=(0, 1)))(
        model, inputs[0])
    np.testing.assert_allclose(nnx_value, value, rtol=1e-6)
    np.testing.assert_allclose(nnx_input, g_input, rtol=1e-5, atol=1e-6)
    nnx_params = nnx.to_pure_dict(nnx.filter_state(nnx_grads, nnx.Param))
    for a, b in zip(jax.tree_util.tree_leaves(nnx_params), jax.tree_util.tree_leaves(g_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_constructor_from_the_contract_and_fresh_layer():
    layer = djnnx.DeformConv(8, 16, 3, modulated=True, rngs=nnx.Rngs(0))
    assert layer.kernel.shape == (3, 3, 8, 16) and layer.offset.kernel.shape == (3, 3, 8, 27)
    np.testing.assert_array_equal(layer.offset.kernel[...], 0)
    x = np.random.default_rng(1).normal(size=(1, 10, 10, 8)).astype(np.float32)
    # fresh modulated: mask sigmoid(0) = 0.5, zero offsets -> half a convolution plus bias
    plain = jax.lax.conv_general_dilated(x, layer.kernel[...], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    out = nnx.jit(lambda layer, x: layer(x))(layer, x)
    np.testing.assert_allclose(out, 0.5 * plain + layer.bias[...], rtol=1e-5, atol=1e-5)


def test_offsets_are_captured_without_warnings():
    layer = djnnx.DeformConv(4, 6, 3, modulated=True, rngs=nnx.Rngs(0))
    pool = djnnx.DeformRoIPool(4, 2, sampling_ratio=2, modulated=True, deform_fc_channels=4,
                               rngs=nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = nnx.jit(lambda layer, x: layer(x))(layer, X)  # not captured: no warning
        y2, captured = nnx.capture(layer, nnx.Intermediate)(X)
        _, pooled = nnx.capture(pool, nnx.Intermediate)(X, ROIS)
    np.testing.assert_array_equal(y, y2)
    assert captured["offsets"][0].shape == (2, 9, 9, 18)
    assert captured["masks"][0].shape == (2, 9, 9, 9)
    assert pooled["offsets"][0].shape == (3, 2, 2, 2) and pooled["masks"][0].shape == (3, 2, 2, 1)
    assert not nnx.state(layer, nnx.Intermediate)  # nothing left behind on the module


class Net(nnx.Module):
    """Every NNX module of deformjax in one model."""

    def __init__(self, rngs):
        self.conv = djnnx.DeformConv(4, 8, 3, modulated=True, rngs=rngs)
        self.dilated = djnnx.DilatedConv(8, 8, 3, kernel_dilation=2, rngs=rngs)
        self.aspp = djnnx.ASPP(8, features=8, rates=(2,), dropout_rate=0.1, rngs=rngs)
        self.pool = djnnx.DeformRoIPool(8, 2, sampling_ratio=2, deform_fc_channels=8,
                                        rngs=rngs)
        self.ps_pool = djnnx.DeformPSRoIPool(8, 2, sampling_ratio=2, rngs=rngs)
        self.head = nnx.Linear(8 + 2, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.dilated(nnx.relu(self.conv(x))))
        x = self.aspp(x)
        pooled = self.pool(x, ROIS[:2])  # one RoI per image
        position_sensitive = self.ps_pool(x, ROIS[:2])
        return self.head(jnp.concatenate([pooled, position_sensitive], -1).mean(axis=(1, 2)))


def test_trains_under_nnx_jit_and_round_trips_through_orbax(tmp_path):
    import orbax.checkpoint as ocp

    labels = jnp.array([0, 2])
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    # as a user runs optax: standard promotion (the suite's default is strict)
    with warnings.catch_warnings(), jax.numpy_dtype_promotion("standard"):
        warnings.simplefilter("error")
        losses = [float(step(model, optimizer, X)) for _ in range(12)]
    assert losses[-1] < 0.5 * losses[0]
    assert np.abs(model.conv.offset.kernel[...]).max() > 0  # the offsets learned
    assert np.abs(model.pool.offset_fc_2.kernel[...]).max() > 0
    assert np.abs(model.ps_pool.offset.kernel[...]).max() > 0
    assert np.abs(model.aspp.norm_project.mean[...]).max() > 0  # batch statistics moved
    model.eval()

    weights = (nnx.Param, nnx.BatchStat)  # what a checkpoint holds (not the rng streams)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", nnx.to_pure_dict(nnx.state(model, weights)))
    checkpointer.wait_until_finished()
    fresh = Net(nnx.Rngs(5))
    fresh.eval()
    target = nnx.state(fresh, weights)
    restored = checkpointer.restore(tmp_path / "state", nnx.to_pure_dict(target))
    nnx.replace_by_pure_dict(target, restored)
    nnx.update(fresh, target)
    np.testing.assert_array_equal(fresh(X), model(X))


def test_nnx_errors_name_the_module():
    with pytest.raises(ValueError, match="DeformConv: offset_groups must divide the input "
                                         "channels; got 3 for 4 channels"):
        djnnx.DeformConv(4, 6, 3, offset_groups=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="DilatedConv: kernel_dilation must be >= 1; got 0"):
        djnnx.DilatedConv(4, 6, 3, kernel_dilation=0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError):
        djnnx.DilatedConv(4, 6, 3, 2, rngs=nnx.Rngs(0))  # dilation is keyword-only
    layer = djnnx.DeformConv(4, 6, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="DeformConv: inputs.shape\\[-1\\] must be in_features "
                                         "= 4; got 5"):
        layer(np.ones((1, 6, 6, 5), np.float32))
