"""deform_roi_pool against the float64 loop reference (mmcv's formulas) and identities."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_fixture
from deformjax import deform_roi_pool
from reference import deform_roi_pool_reference


def random_rois(rng, num, n, h, w, *, spatial_scale=1.0, outside=0.0):
    """RoIs [b, x1, y1, x2, y2] in image coordinates, reaching ``outside`` * size past the map."""
    size = np.array([w, h]) / spatial_scale
    lo = rng.uniform(-outside, 0.8, size=(num, 2)) * size
    hi = lo + rng.uniform(0.1, 0.9 + outside, size=(num, 2)) * size
    batch = rng.integers(0, n, size=(num, 1))
    return np.concatenate([batch, lo, hi], axis=1)


GRID = {
    # features (n, h, w, c), num rois, output_size, spatial_scale, sampling_ratio, offset, mask, outside
    "fixed2": ((2, 12, 10, 3), 5, (3, 3), 1.0, 2, True, False, 0.0),
    "adaptive": ((1, 16, 14, 2), 4, (3, 2), 1.0, 0, True, False, 0.0),
    "adaptive_no_offset": ((2, 11, 13, 2), 4, (2, 3), 1.0, -1, False, False, 0.0),
    "partly_outside": ((1, 10, 10, 2), 6, (2, 2), 1.0, 3, True, False, 0.4),
    "scaled_modulated": ((2, 8, 9, 3), 4, (4, 3), 0.5, 1, True, True, 0.0),
}


def _run(features, rois, offset, mask, cotangent, **kw):
    fn = functools.partial(deform_roi_pool, **kw)

    @jax.jit
    def run(features, offset, mask, cotangent):
        out, vjp = jax.vjp(lambda f, o, m: fn(f, rois, o, m), features, offset, mask)
        return out, vjp(cotangent)

    return run(features, offset, mask, cotangent)


@pytest.mark.parametrize("case", sorted(GRID))
def test_matches_loop_reference(case, rng):
    shape, num, output_size, scale, ratio, with_offset, with_mask, outside = GRID[case]
    n, h, w, _ = shape
    features = rng.normal(size=shape)
    rois = random_rois(rng, num, n, h, w, spatial_scale=scale, outside=outside)
    offset = rng.normal(scale=0.3, size=(num,) + output_size + (2,)) if with_offset else None
    mask = rng.uniform(0.2, 1.0, size=(num,) + output_size + (1,)) if with_mask else None
    kw = dict(output_size=output_size, spatial_scale=scale, sampling_ratio=ratio, gamma=0.1)
    cotangent = rng.normal(size=(num,) + output_size + (shape[-1],))
    out_ref, grad_ref = deform_roi_pool_reference(
        features, rois, offset, mask, cotangent=cotangent, **kw
    )
    out, (grad_features, grad_offset, grad_mask) = _run(
        features, rois, offset, mask, cotangent, **kw
    )
    np.testing.assert_allclose(out, out_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad_features, grad_ref, rtol=1e-10, atol=1e-12)
    if with_mask:
        # out is linear in the mask: d/dmask sum(out * ct) = sum_c (out / mask) * ct.
        expected = (out_ref / mask * cotangent).sum(-1, keepdims=True)
        np.testing.assert_allclose(grad_mask, expected, rtol=1e-9, atol=1e-12)
    if with_offset:
        # Central differences of the reference (no sample sits on a kink for these draws).
        eps = 1e-6
        fd = np.zeros_like(offset)
        for idx in np.ndindex(offset.shape):
            up, down = offset.copy(), offset.copy()
            up[idx] += eps
            down[idx] -= eps
            f_up = deform_roi_pool_reference(features, rois, up, mask, **kw)
            f_down = deform_roi_pool_reference(features, rois, down, mask, **kw)
            fd[idx] = ((f_up - f_down) * cotangent).sum() / (2 * eps)
        np.testing.assert_allclose(grad_offset, fd, rtol=1e-6, atol=1e-7)


def test_no_offset_is_roi_align_and_zero_offsets_change_nothing(rng):
    z, meta = load_fixture("deform_roi_pool", "no_offset")  # torchvision.ops.roi_align(aligned=True)
    kw = dict(output_size=tuple(meta["output_size"]), spatial_scale=meta["spatial_scale"],
              sampling_ratio=meta["sampling_ratio"])
    plain = deform_roi_pool(z["features"], z["rois"], **kw)
    np.testing.assert_allclose(plain, z["out"], rtol=1e-12, atol=1e-12)
    zeros = np.zeros(z["out"].shape[:3] + (2,))
    ones = np.ones(z["out"].shape[:3] + (1,))
    np.testing.assert_array_equal(deform_roi_pool(z["features"], z["rois"], zeros, **kw), plain)
    np.testing.assert_array_equal(deform_roi_pool(z["features"], z["rois"], None, ones, **kw), plain)


def test_offsets_move_bins_by_roi_size(rng):
    """An offset (dy, dx) equals pooling the RoI translated by gamma * (h * dy, w * dx)."""
    features = rng.normal(size=(1, 20, 20, 2))
    rois = np.array([[0, 3.0, 4.0, 11.0, 8.0]])  # 8 wide, 4 tall
    dy, dx, gamma = 0.5, -0.25, 0.1
    offset = np.tile([dy, dx], (1, 2, 2, 1))
    moved = rois + np.array([0, gamma * 8 * dx, gamma * 4 * dy, gamma * 8 * dx, gamma * 4 * dy])
    kw = dict(output_size=2, sampling_ratio=2, gamma=gamma)
    np.testing.assert_allclose(
        deform_roi_pool(features, rois, offset, **kw), deform_roi_pool(features, moved, **kw),
        rtol=1e-12, atol=1e-12,
    )


@pytest.mark.parametrize("name", ["small_to_3x", "scaled"])
def test_adaptive_equals_torchvision_roi_align_from_1px_to_3x_the_map(name):
    """Committed torchvision fixtures (tests/fixtures/make_roi_align.py), forward and gradient."""
    data, meta = load_fixture("roi_align_adaptive", name)
    kw = dict(output_size=tuple(meta["output_size"]), spatial_scale=meta["spatial_scale"],
              sampling_ratio=meta["sampling_ratio"])
    out, vjp = jax.vjp(lambda f: deform_roi_pool(f, data["rois"], **kw), data["features"])
    np.testing.assert_allclose(out, data["out"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(vjp(data["cotangent"])[0], data["grad_features"],
                               rtol=1e-10, atol=1e-10)


def test_adaptive_is_exact_for_large_rois_with_offsets_and_mask(rng):
    """The loop reference with every sample of every bin (grids up to 14 x 12 here)."""
    features = rng.normal(size=(2, 9, 8, 2))
    rois = np.array([[0, 0.0, 0.0, 8.0, 9.0], [1, -6.0, -4.0, 14.0, 20.0],
                     [0, -16.0, -18.0, 24.0, 27.0], [1, 3.0, 4.0, 3.6, 4.9]])
    offset = rng.normal(scale=0.5, size=(4, 2, 3, 2))
    mask = rng.uniform(0.2, 1.0, size=(4, 2, 3, 1))
    kw = dict(output_size=(2, 3), spatial_scale=1.0, sampling_ratio=0, gamma=0.3)
    cotangent = rng.normal(size=(4, 2, 3, 2))
    out_ref, grad_ref = deform_roi_pool_reference(features, rois, offset, mask,
                                                  cotangent=cotangent, **kw)
    out, (grad_features, _, _) = _run(features, rois, offset, mask, cotangent, **kw)
    np.testing.assert_allclose(out, out_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad_features, grad_ref, rtol=1e-10, atol=1e-12)


def test_adaptive_visits_only_samples_that_can_read_the_map():
    """Bins of 10^4 px on a 4x4 map: each averages 10^4 x 10^4 samples (no static or full
    grid would fit in memory), of which only those near the map are visited."""
    features = jnp.ones((1, 4, 4, 1), jnp.float64)
    rois = jnp.array([[0.0, -9998.0, -9998.0, 10002.0, 10002.0]])
    out = deform_roi_pool(features, rois, output_size=2, sampling_ratio=0)
    # Bin (0, 0) samples y, x in {-9998, ..., 1}; of those, -1, 0, 1 are alive (RoIAlign
    # reads y >= -1, clamped onto row 0), so 3 x 3 samples of 1; bin (0, 1) samples x in
    # {2, ..., 10001}, alive 2, 3 and 4 (= W, clamped onto column 3). Every bin: 9 / 10^8.
    np.testing.assert_allclose(out, np.full((1, 2, 2, 1), 9e-8), rtol=1e-12)


def test_zero_and_negative_size_rois(rng):
    features = rng.normal(size=(1, 6, 6, 2))
    rois = np.array([[0, 2.0, 2.0, 2.0, 2.0], [0, 4.0, 4.0, 1.0, 2.0]])
    for ratio in (0, 2):
        kw = dict(output_size=(2, 2), spatial_scale=1.0, sampling_ratio=ratio, gamma=0.1)
        np.testing.assert_allclose(
            deform_roi_pool(features, rois, **kw), deform_roi_pool_reference(features, rois, **kw),
            rtol=1e-12, atol=1e-12,
        )


def test_rois_get_no_gradient(rng):
    features = rng.normal(size=(1, 8, 8, 2))
    rois = np.array([[0, 1.0, 1.5, 6.0, 5.5]])
    grad = jax.grad(lambda r: deform_roi_pool(features, r, output_size=2).sum())(rois)
    np.testing.assert_array_equal(grad, np.zeros_like(rois))


def test_invalid_batch_index_gives_nan_and_minus_one_is_padding(rng):
    features = jnp.asarray(rng.normal(size=(2, 6, 6, 2)))
    box = [1.0, 1.0, 4.0, 4.0]
    rois = jnp.array([[0] + box, [2] + box, [-1] + box, [-2] + box, [-1.5] + box, [np.nan] + box])
    out = np.asarray(jax.jit(functools.partial(deform_roi_pool, output_size=2))(features, rois))
    assert np.isfinite(out[0]).all() and np.all(out[0] != 0)
    np.testing.assert_array_equal(out[2], 0)  # exactly -1: padding
    assert np.isnan(out[[1, 3, 4, 5]]).all()


def test_dtypes(rng):
    features = rng.normal(size=(1, 8, 8, 2))
    rois = np.array([[0, 1.0, 1.5, 6.0, 5.5]])
    out32 = deform_roi_pool(features.astype(np.float32), rois.astype(np.float32), output_size=2)
    assert out32.dtype == jnp.float32
    assert deform_roi_pool(features, rois, output_size=2).dtype == jnp.float64


def test_batch_index_is_truncated(rng):
    features = rng.normal(size=(2, 6, 6, 2))
    rois = np.array([[0.0, 1, 1, 4, 4], [1.0, 1, 1, 4, 4], [0.7, 1, 1, 4, 4], [1.9, 1, 1, 4, 4]])
    out = np.asarray(deform_roi_pool(features, rois, output_size=2))
    np.testing.assert_array_equal(out[2], out[0])
    np.testing.assert_array_equal(out[3], out[1])
    assert not np.allclose(out[0], out[1])


def test_adaptive_in_many_small_trips(rng, monkeypatch):
    """Four samples per trip: bins split across trips, runs of empty bins longer than a
    trip (padding and empty RoIs); forward and feature gradient still the reference's."""
    from deformjax._src import ragged

    monkeypatch.setattr(ragged, "_MIN_SLOTS", 4)
    monkeypatch.setattr(ragged, "_MAX_SLOTS", 4)
    features = rng.normal(size=(2, 7, 6, 2))  # a shape no other test compiles
    rois = np.array([[0, 0.5, 0.2, 5.0, 6.5], [-1, 0, 0, 4, 4], [0, 3, 3, 2, 2],
                     [1, 2, 2, 2, 2], [1, -4.0, -3.0, 9.0, 11.0], [0, 1.0, 1.0, 1.8, 2.2]])
    offset = rng.normal(scale=0.4, size=(6, 2, 2, 2))
    kw = dict(output_size=(2, 2), spatial_scale=1.0, sampling_ratio=0, gamma=0.2)
    cotangent = rng.normal(size=(6, 2, 2, 2))
    out_ref = deform_roi_pool_reference(features, rois, offset, **kw)
    out_ref[1] = 0  # padding RoI (the reference reads image -1 for it)
    out, (grad_features, _, _) = _run(features, rois, offset, None, cotangent, **kw)
    np.testing.assert_allclose(out, out_ref, rtol=1e-10, atol=1e-12)
    grad_ref_no_pad = deform_roi_pool_reference(
        features, rois[[0, 2, 3, 4, 5]], offset[[0, 2, 3, 4, 5]],
        cotangent=cotangent[[0, 2, 3, 4, 5]], **kw)[1]
    np.testing.assert_allclose(grad_features, grad_ref_no_pad, rtol=1e-10, atol=1e-12)


def test_adaptive_trip_size_is_chosen_per_platform():
    """A program lowered for a GPU visits the accelerators' K samples per trip, one lowered
    for the CPU the CPU's; a program lowered for both keeps both (lax.platform_dependent)."""
    import re

    from deformjax._src import ragged

    features = jnp.ones((1, 9, 9, 8), jnp.float32)
    rois = jnp.array([[0, 1, 1, 7, 7]], jnp.float32)
    cpu, gpu = ragged.slots_for(8, 4), ragged.slots_for(8, 4, accelerator=True)
    assert gpu > cpu

    def trip_sizes(fn, platforms):
        module = jax.export.export(jax.jit(fn), platforms=platforms)(features).mlir_module()
        return {k for k in (cpu, gpu) if re.search(rf"tensor<{k}x8xf32>", module)}

    def pool(f):
        return deform_roi_pool(f, rois, output_size=2)

    def loss(f):
        return jax.grad(lambda f: jnp.sum(pool(f) ** 2))(f)

    assert trip_sizes(pool, ["cpu"]) == {cpu}
    assert trip_sizes(pool, ["cuda"]) == {gpu}
    assert trip_sizes(loss, ["cuda"]) == {gpu}
    assert trip_sizes(pool, ["cpu", "cuda"]) == {cpu, gpu}
