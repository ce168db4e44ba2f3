"""Low precision, empty and non-finite inputs, determinism, property-based tests."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deformjax import deform_conv, deform_roi_pool, dilated_conv
from reference import deform_conv_reference, deform_roi_pool_reference


def rel_frobenius(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.bfloat16, 3e-2), (jnp.float16, 5e-3)])
def test_low_precision_deform_conv_on_a_large_image(dtype, tolerance, rng):
    """Coordinates near 300 need float32: in bfloat16 their step is 2 pixels."""
    x = rng.normal(size=(1, 300, 300, 4)).astype(np.float32)
    offset = rng.normal(scale=3.0, size=(1, 300, 300, 18)).astype(np.float32)
    kernel = (rng.normal(size=(3, 3, 4, 4)) / 6).astype(np.float32)
    mask = rng.uniform(0.5, 1.0, size=(1, 300, 300, 9)).astype(np.float32)
    fn = jax.jit(functools.partial(deform_conv, padding=1))
    expected = fn(x, offset, kernel, mask)
    low = fn(*(jnp.asarray(a, dtype) for a in (x, offset, kernel, mask)))
    assert low.dtype == dtype
    assert rel_frobenius(low, expected) < tolerance


@pytest.mark.parametrize("dtype, tolerance", [(jnp.bfloat16, 3e-2), (jnp.float16, 5e-3)])
def test_low_precision_roi_pool_on_a_large_map(dtype, tolerance, rng):
    features = rng.normal(size=(1, 320, 320, 4)).astype(np.float32)
    xy = rng.uniform(150, 250, size=(64, 2))
    rois = np.concatenate([np.zeros((64, 1)), xy, xy + rng.uniform(8, 60, size=(64, 2))], 1)
    rois = rois.astype(np.float32)
    offset = rng.normal(scale=0.1, size=(64, 7, 7, 2)).astype(np.float32)
    fn = jax.jit(functools.partial(deform_roi_pool, output_size=7, sampling_ratio=2))
    expected = fn(features, rois, offset)
    low = fn(jnp.asarray(features, dtype), rois, jnp.asarray(offset, dtype))
    assert low.dtype == dtype
    assert rel_frobenius(low, expected) < tolerance


def test_mixed_dtypes_promote_as_jax_does(rng):
    x = jnp.asarray(rng.normal(size=(1, 6, 6, 2)), jnp.bfloat16)
    offset = jnp.zeros((1, 6, 6, 18), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 2)), jnp.float16)
    with jax.numpy_dtype_promotion("standard"):
        assert deform_conv(x, offset, kernel, padding=1).dtype == jnp.result_type(
            x, offset, kernel
        )
        assert dilated_conv(x, kernel, dilation=2).dtype == jnp.result_type(x, kernel)
        pooled = deform_roi_pool(x, jnp.array([[0, 1.0, 1.0, 4.0, 4.0]]), output_size=2)
        assert pooled.dtype == jnp.bfloat16
    with pytest.raises(jax.dtypes.TypePromotionError):  # strict mode is respected
        deform_conv(x, offset, kernel, padding=1)


def test_empty_batch_and_no_rois(rng):
    x = np.zeros((0, 6, 6, 2), np.float32)
    offset = np.zeros((0, 6, 6, 18), np.float32)
    kernel = rng.normal(size=(3, 3, 2, 5)).astype(np.float32)
    fn = functools.partial(deform_conv, padding=1)
    assert fn(x, offset, kernel).shape == (0, 6, 6, 5)
    gx, go, gk = jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2))(x, offset, kernel)
    assert gx.shape == x.shape and go.shape == offset.shape
    np.testing.assert_array_equal(gk, np.zeros_like(kernel))
    assert dilated_conv(x, kernel, dilation=2).shape == (0, 6, 6, 5)

    features = rng.normal(size=(1, 8, 8, 3)).astype(np.float32)
    rois = np.zeros((0, 5), np.float32)
    pool = functools.partial(deform_roi_pool, output_size=3)
    assert pool(features, rois).shape == (0, 3, 3, 3)
    offset = np.zeros((0, 3, 3, 2), np.float32)
    gf, go = jax.grad(lambda f, o: pool(f, rois, o).sum(), argnums=(0, 1))(features, offset)
    np.testing.assert_array_equal(gf, 0)
    assert go.shape == (0, 3, 3, 2)
    # RoIs but no image: every batch index is out of range, nothing is read.
    no_images = np.zeros((0, 8, 8, 3), np.float32)
    out = pool(no_images, np.array([[0, 1.0, 1.0, 4.0, 4.0]], np.float32))
    assert out.shape == (1, 3, 3, 3) and np.isnan(out).all()


def test_nan_offset_poisons_only_its_own_output(rng):
    x = rng.normal(size=(1, 7, 7, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
    offset = rng.normal(size=(1, 7, 7, 18)).astype(np.float32)
    offset[0, 3, 4, 5] = np.nan
    out = np.asarray(deform_conv(x, offset, kernel, padding=1))
    nan = np.isnan(out).any(axis=-1)
    assert nan[0, 3, 4] and nan.sum() == 1


@pytest.mark.parametrize("value", [np.inf, -np.inf, 1e10, -1e10, 2.0**31, -(2.0**31), 1e30, 3e38])
def test_huge_and_infinite_offsets_sample_nothing(value, rng):
    """Never wraps an integer index onto a real pixel: the output is the bias."""
    x = rng.normal(size=(1, 6, 6, 2)).astype(np.float32) + 10.0
    kernel = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
    bias = np.array([1.0, 2.0, 3.0], np.float32)
    offset = np.full((1, 6, 6, 18), value, np.float32)
    out = deform_conv(x, offset, kernel, None, bias, padding=1)
    np.testing.assert_array_equal(out, np.broadcast_to(bias, out.shape))
    grad = jax.grad(lambda o: deform_conv(x, o, kernel, None, bias, padding=1).sum())(offset)
    np.testing.assert_array_equal(grad, 0)
    # one direction huge, the other finite: still nothing
    mixed = offset.copy()
    mixed[..., 1::2] = 0.5
    out = deform_conv(x, mixed, kernel, None, bias, padding=1)
    np.testing.assert_array_equal(out, np.broadcast_to(bias, out.shape))


@pytest.mark.parametrize("value", [np.inf, -np.inf, 1e10, 2.0**31, 1e30])
def test_huge_and_infinite_roi_offsets_sample_nothing(value, rng):
    features = rng.normal(size=(1, 8, 8, 2)).astype(np.float32) + 5.0
    rois = np.array([[0, 1.0, 1.0, 6.0, 6.0]], np.float32)
    offset = np.zeros((1, 2, 2, 2), np.float32)
    offset[0, 1, 0] = value
    out = np.asarray(deform_roi_pool(features, rois, offset, output_size=2, sampling_ratio=2))
    np.testing.assert_array_equal(out[0, 1, 0], 0)
    assert np.all(out[0, 0] != 0) and np.all(out[0, 1, 1] != 0)
    offset[0, 1, 0] = np.nan
    out = np.asarray(deform_roi_pool(features, rois, offset, output_size=2, sampling_ratio=2))
    assert np.isnan(out[0, 1, 0]).all() and np.isfinite(np.delete(out.reshape(4, 2), 2, 0)).all()


def test_deterministic_outputs_and_gradients(rng):
    """Bitwise reproducible on the CPU. On a GPU the image's cotangent is a scatter-add that XLA
    accumulates with atomics in any order (repeats differed by rounding on an H200), unless
    XLA_FLAGS has --xla_gpu_deterministic_ops=true: then this checks the GPU, else the CPU."""
    device = jax.devices()[0]
    if device.platform == "gpu" and "--xla_gpu_deterministic_ops=true" not in os.environ.get(
            "XLA_FLAGS", ""):
        device = jax.devices("cpu")[0]
    x = rng.normal(size=(2, 9, 9, 8)).astype(np.float32)
    offset = rng.normal(scale=2.0, size=(2, 9, 9, 18)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 8, 8)).astype(np.float32)
    x, offset, kernel = jax.device_put((x, offset, kernel), device)
    fn = jax.jit(jax.value_and_grad(
        lambda x, o, k: (deform_conv(x, o, k, padding=1) ** 2).sum(), argnums=(0, 1, 2)))
    first = jax.tree_util.tree_map(np.asarray, fn(x, offset, kernel))
    for _ in range(3):
        again = jax.tree_util.tree_map(np.asarray, fn(x, offset, kernel))
        for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again)):
            np.testing.assert_array_equal(a, b)
    features = rng.normal(size=(1, 12, 12, 4)).astype(np.float32)
    rois = np.array([[0, 1.0, 2.0, 9.0, 8.0], [0, 2.5, 0.0, 11.0, 7.5]], np.float32)
    features, rois = jax.device_put((features, rois), device)
    pool_grad = jax.jit(jax.grad(
        lambda f: (deform_roi_pool(f, rois, output_size=3) ** 2).sum()))
    np.testing.assert_array_equal(pool_grad(features), pool_grad(features))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    hw=st.tuples(st.integers(3, 6), st.integers(3, 6)),
    kernel=st.sampled_from([(1, 1), (2, 2), (3, 3), (3, 2)]),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    pad=st.integers(0, 2),
    groups=st.sampled_from([1, 2]),
    fg=st.sampled_from([1, 2]),
    modulated=st.booleans(),
)
def test_property_deform_conv_matches_reference(data, hw, kernel, stride, dilation, pad, groups,
                                                fg, modulated):
    out_hw = tuple((s + 2 * pad - (k - 1) * dilation - 1) // stride + 1 for s, k in zip(hw, kernel))
    if min(out_hw) < 1:
        return
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    c_in, c_out, taps = 4, 2, kernel[0] * kernel[1]
    x = rng.normal(size=(1,) + hw + (c_in,))
    offset = rng.normal(scale=2.0, size=(1,) + out_hw + (2 * groups * taps,))
    k = rng.normal(size=kernel + (c_in // fg, c_out))
    mask = rng.uniform(size=(1,) + out_hw + (groups * taps,)) if modulated else None
    pads = ((pad, pad), (pad, pad))
    out = deform_conv(x, offset, k, mask, strides=stride, padding=pad, dilation=dilation,
                      feature_group_count=fg)
    expected = deform_conv_reference(x, offset, k, mask, strides=(stride, stride), padding=pads,
                                     dilation=(dilation, dilation), groups=fg)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    hw=st.tuples(st.integers(4, 10), st.integers(4, 10)),
    output_size=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    sampling_ratio=st.integers(-1, 3),
    spatial_scale=st.sampled_from([0.5, 1.0]),
    with_offset=st.booleans(),
)
def test_property_deform_roi_pool_matches_reference(data, hw, output_size, sampling_ratio,
                                                    spatial_scale, with_offset):
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(2,) + hw + (3,))
    extent = np.array([hw[1], hw[0]]) / spatial_scale
    lo = rng.uniform(-0.2, 0.8, size=(3, 2)) * extent
    hi = lo + rng.uniform(0.0, 3.0, size=(3, 2)) * extent  # up to 3x the map
    rois = np.concatenate([rng.integers(0, 2, size=(3, 1)), lo, hi], axis=1)
    offset = rng.normal(scale=0.3, size=(3,) + output_size + (2,)) if with_offset else None
    kw = dict(output_size=output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
              gamma=0.1)
    out = deform_roi_pool(features, rois, offset, **kw)
    np.testing.assert_allclose(out, deform_roi_pool_reference(features, rois, offset, **kw),
                               rtol=1e-10, atol=1e-10)
