"""The Flax modules: parameters, fresh-module identities, the functional ops, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deformjax import (
    ASPP,
    DeformConv,
    DeformRoIPool,
    DilatedConv,
    deform_conv,
    deform_roi_pool,
)


def shapes(tree):
    return jax.tree_util.tree_map(jnp.shape, tree)


@pytest.fixture
def x(rng):
    return jnp.asarray(rng.normal(size=(2, 9, 10, 4)), jnp.float32)


@pytest.mark.parametrize("modulated, groups", [(False, 1), (True, 2)])
def test_deform_conv_params(x, modulated, groups):
    layer = DeformConv(6, (3, 2), offset_groups=groups, modulated=modulated,
                       feature_group_count=2)
    params = layer.init(jax.random.key(0), x)["params"]
    k = (3 if modulated else 2) * groups * 6
    assert shapes(params) == {
        "kernel": (3, 2, 2, 6),
        "bias": (6,),
        "offset": {"kernel": (3, 2, 4, k), "bias": (k,)},
    }
    assert params["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(params["offset"]["kernel"], 0)


@pytest.mark.parametrize("strides, padding, dilation", [(1, "SAME", 1), (2, 1, 2), ((1, 2), "VALID", 1)])
def test_fresh_deform_conv_is_plain_conv(x, strides, padding, dilation):
    layer = DeformConv(5, 3, strides=strides, padding=padding, kernel_dilation=dilation,
                       bias_init=nn.initializers.normal(1.0))
    variables = layer.init(jax.random.key(1), x)
    conv = nn.Conv(5, (3, 3), strides=strides, padding=padding, kernel_dilation=dilation,
                   precision="highest")
    plain = conv.apply({"params": {k: variables["params"][k] for k in ("kernel", "bias")}}, x)
    out = jax.jit(layer.apply)(variables, x)
    np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-5)

    modulated = DeformConv(5, 3, strides=strides, padding=padding, kernel_dilation=dilation,
                           modulated=True, bias_init=nn.initializers.normal(1.0))
    variables = modulated.init(jax.random.key(1), x)
    bias = variables["params"]["bias"]
    plain = conv.apply({"params": {k: variables["params"][k] for k in ("kernel", "bias")}}, x)
    np.testing.assert_allclose(modulated.apply(variables, x), 0.5 * (plain - bias) + bias,
                               rtol=1e-5, atol=1e-5)


def test_offsets_through_branch_bias_reproduce_the_op(x, rng):
    layer = DeformConv(3, 3, padding=1, offset_groups=2, modulated=True)
    variables = layer.init(jax.random.key(2), x)
    params = variables["params"]
    bias = jnp.asarray(rng.normal(size=(3 * 2 * 9,)), jnp.float32)
    params = {**params, "offset": {**params["offset"], "bias": bias}}
    out, state = layer.apply({"params": params}, x, mutable="intermediates")
    n, h, w, _ = x.shape
    offset = jnp.broadcast_to(bias[:36], (n, h, w, 36))
    mask = jnp.broadcast_to(jax.nn.sigmoid(bias[36:]), (n, h, w, 18))
    expected = deform_conv(x, offset, params["kernel"], mask, params["bias"], padding=1)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    (sown_offset,), (sown_mask,) = state["intermediates"]["offsets"], state["intermediates"]["masks"]
    np.testing.assert_allclose(sown_offset, offset, rtol=1e-6)
    np.testing.assert_allclose(sown_mask, mask, rtol=1e-6)


def test_deform_conv_batch_dims_and_dtypes(x):
    layer = DeformConv(4, 3, dtype=jnp.bfloat16)
    variables = layer.init(jax.random.key(0), x)
    assert variables["params"]["kernel"].dtype == jnp.float32
    assert layer.apply(variables, x).dtype == jnp.bfloat16
    layer = DeformConv(4, 3)
    variables = layer.init(jax.random.key(0), x)
    unbatched = layer.apply(variables, x[0])
    extra = layer.apply(variables, x.reshape((1, 2) + x.shape[1:]))
    assert unbatched.shape == (9, 10, 4) and extra.shape == (1, 2, 9, 10, 4)
    np.testing.assert_allclose(extra[0], layer.apply(variables, x), rtol=1e-6)


def test_dilated_conv_module(x):
    layer = DilatedConv(7, 3, kernel_dilation=2, bias_init=nn.initializers.normal(1.0))
    variables = layer.init(jax.random.key(0), x)
    assert shapes(variables["params"]) == {"kernel": (3, 3, 4, 7), "bias": (7,)}
    reference = nn.Conv(7, (3, 3), kernel_dilation=2, precision="highest")
    np.testing.assert_allclose(layer.apply(variables, x), reference.apply(variables, x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "module, message",
    [
        (DeformConv(4, 3, padding="CIRCULAR"),
         "DeformConv: padding must be 'SAME', 'VALID', an int or pairs (deformable sampling reads "
         "zeros outside the image); got 'CIRCULAR'"),
        (DeformConv(4, 3, offset_groups=3),
         "DeformConv: offset_groups must divide the input channels; got 3 for 4 channels"),
        (DeformConv(4, 3, feature_group_count=3),
         "DeformConv: feature_group_count must divide the input channels; got 3 for 4 channels"),
        (DeformConv(4, (3, 3, 3)),
         "DeformConv: kernel_size must be an int or a pair of ints (h, w); got (3, 3, 3)"),
        (DeformConv(4, 3, offset_groups=0), "DeformConv: offset_groups must be a positive int; got 0"),
        (DeformConv(5, 3, feature_group_count=2),
         "DeformConv: features must be divisible by feature_group_count; got features 5 and "
         "feature_group_count 2"),
        (DilatedConv(5, 3, kernel_dilation=1, feature_group_count=2),
         "DilatedConv: features must be divisible by feature_group_count; got features 5 and "
         "feature_group_count 2"),
        (DilatedConv(4, 3, kernel_dilation=0), "DilatedConv: kernel_dilation must be >= 1; got 0"),
        (DilatedConv(4, 3, kernel_dilation=2, strides=(1, 0)),
         "DilatedConv: strides must be >= 1; got (1, 0)"),
        (DilatedConv(4, 3, kernel_dilation=2, padding="REFLECT"),
         "DilatedConv: padding must be 'SAME', 'VALID', an int or pairs (deformable sampling "
         "reads zeros outside the image); got 'REFLECT'"),
        (DilatedConv(4, 3, kernel_dilation=2, feature_group_count=3),
         "DilatedConv: feature_group_count must divide the input channels; got 3 for 4 channels"),
    ],
)
def test_module_errors(x, module, message):
    import re

    with pytest.raises(ValueError, match=re.escape(message)):
        module.init(jax.random.key(0), x)


def test_dilated_conv_dilation_is_keyword_only():
    """A third positional argument means strides (nn.Conv, DeformConv), never dilation."""
    with pytest.raises(TypeError, match="kernel_dilation"):
        DilatedConv(64, 3, 2)
    assert DilatedConv(64, 3, kernel_dilation=2).kernel_dilation == 2


@pytest.mark.parametrize("module", [DeformConv(4, 3), DilatedConv(4, 3, kernel_dilation=2)])
def test_module_rank_error(x, module):
    name = type(module).__name__
    with pytest.raises(ValueError, match=f"{name}: inputs must have shape .* got \\(10, 4\\)"):
        module.init(jax.random.key(0), x[0, 0])


@pytest.fixture
def roi_inputs(rng):
    features = jnp.asarray(rng.normal(size=(2, 16, 14, 3)), jnp.float32)
    rois = jnp.array([[0, 1.0, 2.0, 10.0, 12.0], [1, 4.0, 0.5, 13.0, 9.0], [1, 0.0, 0.0, 6.0, 6.0]],
                     jnp.float32)
    return features, rois


def test_fresh_deform_roi_pool_is_roi_align(roi_inputs):
    features, rois = roi_inputs
    pool = DeformRoIPool(output_size=(3, 2), sampling_ratio=2, deform_fc_channels=16)
    variables = pool.init(jax.random.key(0), features, rois)
    assert shapes(variables["params"]) == {
        "offset_fc_0": {"kernel": (18, 16), "bias": (16,)},
        "offset_fc_1": {"kernel": (16, 16), "bias": (16,)},
        "offset_fc_2": {"kernel": (16, 12), "bias": (12,)},
    }
    plain = deform_roi_pool(features, rois, output_size=(3, 2), sampling_ratio=2)
    np.testing.assert_allclose(jax.jit(pool.apply)(variables, features, rois), plain, atol=1e-6)
    modulated = DeformRoIPool(output_size=(3, 2), sampling_ratio=2, deform_fc_channels=16,
                              modulated=True)
    variables = modulated.init(jax.random.key(0), features, rois)
    assert shapes(variables["params"])["mask_fc_1"] == {"kernel": (16, 6), "bias": (6,)}
    np.testing.assert_allclose(modulated.apply(variables, features, rois), 0.5 * plain, atol=1e-6)


def test_deform_roi_pool_offsets_through_last_bias(roi_inputs, rng):
    features, rois = roi_inputs
    pool = DeformRoIPool(output_size=2, sampling_ratio=2, gamma=0.2, deform_fc_channels=8)
    params = pool.init(jax.random.key(0), features, rois)["params"]
    bias = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
    params = {**params, "offset_fc_2": {**params["offset_fc_2"], "bias": bias}}
    out, state = pool.apply({"params": params}, features, rois, mutable="intermediates")
    offset = jnp.broadcast_to(bias.reshape(1, 2, 2, 2), (3, 2, 2, 2))
    expected = deform_roi_pool(features, rois, offset, output_size=2, sampling_ratio=2, gamma=0.2)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(state["intermediates"]["offsets"][0], offset)


def test_aspp(rng):
    x = jnp.asarray(rng.normal(size=(2, 21, 21, 3)), jnp.float32)
    aspp = ASPP(features=4, rates=(2, 6))
    variables = aspp.init(jax.random.key(0), x)
    params = shapes(variables["params"])
    assert params["atrous_1"] == {"kernel": (3, 3, 3, 4)}
    assert set(params) == {"conv_1x1", "atrous_0", "atrous_1", "pool_conv", "project",
                           "norm_1x1", "norm_atrous_0", "norm_atrous_1", "norm_pool",
                           "norm_project"}
    assert aspp.apply(variables, x).shape == (2, 21, 21, 4)
    out, state = aspp.apply(variables, x, train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.key(1)})
    assert out.shape == (2, 21, 21, 4) and "batch_stats" in state

    # The rate-6 branch sees 6 pixels away from the centre (and image pooling everything).
    def centre(x):
        return aspp.apply(variables, x)[0, 10, 10].sum()

    grad = np.asarray(jax.grad(centre)(x))[0, :, :, 0]
    assert grad[10, 16] != 0 and grad[4, 4] != 0


def test_training_step_moves_offsets_and_lowers_loss(rng):
    """A jitted optax step: the zero-initialised offset branch gets a gradient, the loss falls."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3))(x))
            x = nn.relu(DeformConv(8, 3, modulated=True)(x))
            x = nn.relu(DeformConv(8, 3, strides=2)(x))
            return nn.Dense(3)(x.mean(axis=(1, 2)))

    x = jnp.asarray(rng.normal(size=(8, 12, 12, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, size=(8,)))
    model = Net()
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    def loss_fn(params):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    # optax's own arithmetic mixes int and float (strict promotion is for deformjax's code).
    with jax.numpy_dtype_promotion("standard"):
        params, opt_state, first, grads = step(params, opt_state)
        for name in ("DeformConv_0", "DeformConv_1"):
            assert float(jnp.abs(grads[name]["offset"]["kernel"]).max()) > 0, name
        for _ in range(30):
            params, opt_state, loss, _ = step(params, opt_state)
    assert float(loss) < 0.8 * float(first)
    assert float(jnp.abs(params["DeformConv_0"]["offset"]["kernel"]).max()) > 0
