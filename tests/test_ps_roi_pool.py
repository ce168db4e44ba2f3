"""deform_ps_roi_pool and DeformPSRoIPool: torchvision's ps_roi_align, moved bins, the R-FCN head."""

import functools
import re

import jax
import numpy as np
import optax
import pytest
from conftest import fixture_names, load_fixture
from flax import nnx

import deformjax.nnx as djnnx
from deformjax import DeformPSRoIPool, deform_ps_roi_pool
from reference import deform_ps_roi_pool_reference


@pytest.mark.parametrize("name", fixture_names("deform_ps_roi_pool"))
def test_offset_none_is_torchvision_ps_roi_align(name):
    z, meta = load_fixture("deform_ps_roi_pool", name)
    fn = jax.jit(functools.partial(deform_ps_roi_pool, output_size=tuple(meta["output_size"]),
                                   spatial_scale=meta["spatial_scale"],
                                   sampling_ratio=meta["sampling_ratio"]))
    out, vjp = jax.vjp(lambda f: fn(f, z["rois"]), z["features"])
    np.testing.assert_allclose(out, z["out"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(vjp(z["cotangent"])[0], z["grad_features"], rtol=1e-10,
                               atol=1e-10)


def case(rng, sampling_ratio):
    features = rng.normal(size=(2, 10, 11, 3 * 2 * 3))
    # within the map's size (RoIs larger than the map are issue 11's adaptive grid)
    rois = np.array([[0, 1.0, 1.5, 8.0, 7.0], [1, -2.0, 0.5, 8.5, 9.0],
                     [1, 3.0, 2.0, 3.5, 4.0], [0, 6.0, 4.0, 10.5, 9.5]])
    offset = rng.normal(scale=0.4, size=(4, 2, 3, 2))
    kw = dict(output_size=(2, 3), spatial_scale=1.0, sampling_ratio=sampling_ratio, gamma=0.1)
    return features, rois, offset, kw


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_matches_the_float64_loop_reference_at_arbitrary_offsets(rng, sampling_ratio):
    features, rois, offset, kw = case(rng, sampling_ratio)
    cotangent = rng.normal(size=(4, 2, 3, 3))
    expected, expected_grad = deform_ps_roi_pool_reference(features, rois, offset,
                                                           cotangent=cotangent, **kw)
    out, vjp = jax.vjp(lambda f: deform_ps_roi_pool(f, rois, offset, **kw), features)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(vjp(cotangent)[0], expected_grad, rtol=1e-10, atol=1e-10)


def test_uniform_offset_equals_ps_roi_align_of_translated_rois(rng):
    features, rois, _, kw = case(rng, 2)
    dy, dx = 0.5, -0.25
    offset = np.broadcast_to([dy, dx], (4, 2, 3, 2))
    height, width = rois[:, 4] - rois[:, 2], rois[:, 3] - rois[:, 1]
    moved = rois + np.stack([0 * height, 0.1 * width * dx, 0.1 * height * dy,
                             0.1 * width * dx, 0.1 * height * dy], axis=1)
    np.testing.assert_allclose(deform_ps_roi_pool(features, rois, offset, **kw),
                               deform_ps_roi_pool(features, moved, **kw), rtol=1e-12,
                               atol=1e-12)


def test_padding_rois_and_errors(rng):
    features, rois, offset, kw = case(rng, 2)
    padded = np.concatenate([rois, [[-1, 1.0, 1.0, 5.0, 5.0]]])
    out = deform_ps_roi_pool(features, padded, **kw)
    np.testing.assert_array_equal(out[-1], 0)
    message = re.escape("deform_ps_roi_pool: features.shape[-1] must be C_out * oh * ow, a "
                        "multiple of oh * ow = 6 for a 2x3 output; got 17")
    with pytest.raises(ValueError, match=message):
        deform_ps_roi_pool(features[..., :17], rois, **kw)
    with pytest.raises(ValueError, match=re.escape("deform_ps_roi_pool: offset.shape must be "
                                                   "(R, oh, ow, 2) = (4, 2, 3, 2)")):
        deform_ps_roi_pool(features, rois, offset[:, :1], **kw)
    with pytest.raises(ValueError, match="DeformPSRoIPool: features.shape\\[-1\\] \\(in_features"
                                         "\\) must be C_out \\* oh \\* ow"):
        DeformPSRoIPool(output_size=(2, 3)).init(jax.random.key(0), features[..., :17], rois)


def test_module_fresh_equals_ps_roi_align_trains_and_has_an_nnx_twin(rng):
    features, rois, _, kw = case(rng, 2)
    features, rois = features.astype(np.float32), rois.astype(np.float32)
    head = DeformPSRoIPool(output_size=(2, 3), sampling_ratio=2)
    variables = head.init(jax.random.key(0), features, rois)
    assert variables["params"]["offset"]["kernel"].shape == (1, 1, 18, 12)
    plain = deform_ps_roi_pool(features, rois, output_size=(2, 3), sampling_ratio=2)
    np.testing.assert_allclose(head.apply(variables, features, rois), plain, rtol=1e-6,
                               atol=1e-6)

    target = rng.normal(size=plain.shape).astype(np.float32)
    tx = optax.adam(0.05)

    @jax.jit
    def step(params, state):
        def loss(params):
            return ((head.apply({"params": params}, features, rois) - target) ** 2).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    params = variables["params"]
    with jax.numpy_dtype_promotion("standard"):
        state = tx.init(params)
        losses = []
        for _ in range(15):
            params, state, value = step(params, state)
            losses.append(float(value))
    assert losses[-1] < losses[0]
    assert np.abs(params["offset"]["kernel"]).max() > 0  # the offset branch learned

    twin = djnnx.DeformPSRoIPool(18, (2, 3), sampling_ratio=2, rngs=nnx.Rngs(3))
    djnnx.from_linen(twin, {"params": params})
    np.testing.assert_allclose(twin(features, rois),
                               head.apply({"params": params}, features, rois), rtol=1e-6,
                               atol=1e-6)
    _, captured = nnx.capture(twin, nnx.Intermediate)(features, rois)
    assert captured["offsets"][0].shape == (4, 2, 3, 2)
