"""Every torchvision / mmcv fixture, forward and all gradients, under jit.

float64 agrees to rounding (tolerance 1e-9); the RoI offset gradients of the
fixtures are central differences with step 1e-6, trusted to about 1e-7.
float32 agrees to about 1e-5 relative (fixtures README); we allow 1e-4 of the
largest magnitude of each reference array, so that near-zero entries (the
mostly-outside ``large_offsets`` case) are judged on the array's scale.
"""

import functools

import jax
import numpy as np
import pytest

from conftest import fixture_names, load_fixture
from deformjax import deform_conv, deform_roi_pool, dilated_conv

DTYPES = [np.float64, np.float32]


def assert_close(actual, expected, dtype, name, atol64=1e-9):
    expected = np.asarray(expected)
    assert np.asarray(actual).dtype == dtype, name
    if dtype == np.float64:
        np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=atol64, err_msg=name)
    else:
        scale = max(float(np.abs(expected).max()), 1e-30)
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


def value_and_grads(fn, inputs, cotangent):
    """jit(out, vjp(cotangent)) of fn over the inputs (None entries stay None)."""

    @jax.jit
    def run(inputs, cotangent):
        out, vjp = jax.vjp(fn, *inputs)
        return out, vjp(cotangent)

    return run(inputs, cotangent)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", fixture_names("deform_conv"))
def test_deform_conv_fixture(name, dtype):
    z, meta = load_fixture("deform_conv", name)
    cast = lambda key: None if key not in z else z[key].astype(dtype)  # noqa: E731
    fn = functools.partial(
        deform_conv,
        strides=tuple(meta["strides"]),
        padding=tuple(tuple(p) for p in meta["padding"]),
        dilation=tuple(meta["dilation"]),
        feature_group_count=meta["feature_group_count"],
    )
    keys = ["x", "offset", "kernel", "mask", "bias"]
    out, grads = value_and_grads(fn, [cast(k) for k in keys], cast("cotangent"))
    assert_close(out, z["out"], dtype, "out")
    assert meta["offset_groups"] == z["offset"].shape[-1] // (2 * np.prod(meta["kernel_size"]))
    for key, grad in zip(keys, grads):
        if key in z:
            assert_close(grad, z[f"grad_{key}"], dtype, f"grad_{key}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", fixture_names("deform_roi_pool"))
def test_deform_roi_pool_fixture(name, dtype):
    z, meta = load_fixture("deform_roi_pool", name)
    cast = lambda key: None if key not in z else z[key].astype(dtype)  # noqa: E731
    rois = cast("rois")
    fn = lambda features, offset, mask: deform_roi_pool(  # noqa: E731
        features,
        rois,
        offset,
        mask,
        output_size=tuple(meta["output_size"]),
        spatial_scale=meta["spatial_scale"],
        sampling_ratio=meta["sampling_ratio"],
        gamma=meta["gamma"],
    )
    keys = ["features", "offset", "mask"]
    out, grads = value_and_grads(fn, [cast(k) for k in keys], cast("cotangent"))
    assert_close(out, z["out"], dtype, "out")
    for key, grad in zip(keys, grads):
        if key in z:
            # The offset gradients of the fixtures are finite differences.
            atol = 1e-7 if key == "offset" else 1e-9
            assert_close(grad, z[f"grad_{key}"], dtype, f"grad_{key}", atol64=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", fixture_names("dilated_conv"))
def test_dilated_conv_fixture(name, dtype):
    z, meta = load_fixture("dilated_conv", name)
    fn = jax.jit(
        functools.partial(
            dilated_conv,
            dilation=tuple(meta["dilation"]),
            strides=tuple(meta["strides"]),
            padding=meta["padding"],
            feature_group_count=meta["feature_group_count"],
        )
    )
    out = fn(z["x"].astype(dtype), z["kernel"].astype(dtype), z["bias"].astype(dtype))
    assert_close(out, z["out"], dtype, "out")


def test_torch_layout_keys_match_ours():
    """The fixtures' torch_* arrays are ours under the layout maps of API.md."""
    z, _ = load_fixture("deform_conv", "modulated")
    np.testing.assert_array_equal(z["torch_x"].transpose(0, 2, 3, 1), z["x"])
    np.testing.assert_array_equal(z["torch_offset"].transpose(0, 2, 3, 1), z["offset"])
    np.testing.assert_array_equal(z["torch_weight"].transpose(2, 3, 1, 0), z["kernel"])
    np.testing.assert_array_equal(z["torch_mask"].transpose(0, 2, 3, 1), z["mask"])
    z, _ = load_fixture("deform_roi_pool", "basic")
    np.testing.assert_array_equal(z["torch_offset"].transpose(0, 2, 3, 1)[..., ::-1], z["offset"])
