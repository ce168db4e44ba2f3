"""The edges: non-finite values stay local, padded RoIs, limits, export, vmap, module errors."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax import lax

from deformjax import DeformConv, DeformRoIPool, dcnv3, deform_conv, deform_roi_pool

CONV = functools.partial(deform_conv, padding=1)


def conv_case(rng, n=1, hw=(7, 8), c_in=3, c_out=2):
    x = rng.normal(size=(n,) + hw + (c_in,))
    offset = rng.normal(scale=1.5, size=(n,) + hw + (18,))
    kernel = rng.normal(size=(3, 3, c_in, c_out))
    mask = rng.uniform(0.2, 1.0, size=(n,) + hw + (9,))
    return x, offset, kernel, mask


@jax.jit
def conv_grads(x, offset, kernel, mask, cotangent):
    """Output and every gradient of <deform_conv(...), cotangent>."""
    out, vjp = jax.vjp(lambda *a: CONV(*a), x, offset, kernel, mask)
    return out, vjp(cotangent)


def test_nan_offset_stays_at_its_output_position(rng):
    """Its gradients elsewhere are finite and equal those of a sample that reads nothing
    (torchvision's col2im skips a NaN sample)."""
    x, offset, kernel, mask = conv_case(rng)
    cotangent = np.ones(x.shape[:3] + (2,))
    # (3, 4), tap 0 (top left): its corners clamp onto row 0 / column 3-4.
    nan, far = offset.copy(), offset.copy()
    nan[0, 3, 4, 0] = np.nan
    far[0, 3, 4, 0] = 1e6  # dy far below the image: samples nothing
    out, (gx, go, gk, gm) = conv_grads(x, nan, kernel, mask, cotangent)
    ref_out, (rgx, rgo, rgk, rgm) = conv_grads(x, far, kernel, mask, cotangent)
    bad = np.isnan(out).any(-1)
    assert bad[0, 3, 4] and bad.sum() == 1
    keep = ~bad[..., None]
    np.testing.assert_array_equal(np.where(keep, out, 0), np.where(keep, ref_out, 0))
    assert np.isfinite(gx).all()
    np.testing.assert_allclose(gx, rgx, rtol=1e-12, atol=1e-12)
    # offset and mask gradients: every entry but the NaN sample's own
    others = np.ones(go.shape, bool)
    others[0, 3, 4, 0:2] = False
    assert np.isfinite(go[others]).all()
    np.testing.assert_allclose(go[others], rgo[others], rtol=1e-12, atol=1e-12)
    others = np.ones(gm.shape, bool)
    others[0, 3, 4, 0] = False
    np.testing.assert_allclose(gm[others], rgm[others], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_nan_mask_stays_at_its_output_position(rng, where):
    x, offset, kernel, mask = conv_case(rng)
    cotangent = np.ones(x.shape[:3] + (2,))
    offset[0, 0, 0, :2] = (-5.0, 0.3) if where == "outside" else (0.4, 0.3)
    nan, zero = mask.copy(), mask.copy()
    nan[0, 0, 0, 0] = np.nan
    zero[0, 0, 0, 0] = 0.0
    out, (gx, go, _, _) = conv_grads(x, offset, kernel, nan, cotangent)
    _, (rgx, rgo, _, _) = conv_grads(x, offset, kernel, zero, cotangent)
    bad = np.isnan(out).any(-1)
    assert bad[0, 0, 0] and bad.sum() == 1
    assert np.isfinite(gx).all()
    np.testing.assert_allclose(gx, rgx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(go[0, 1:], rgo[0, 1:], rtol=1e-12, atol=1e-12)


def test_infinite_pixel_changes_only_samples_that_weight_it(rng):
    """Zero offsets sample integer points: the far corners have weight 0 and must not
    turn an infinite neighbour into NaN. The footprint of the pixel is found with
    a one-hot image; with inf there, the same outputs and only they are not finite."""
    x, offset, kernel, _ = conv_case(rng, hw=(9, 9))
    kernel = np.abs(kernel) + 0.1
    for offsets in (np.zeros_like(offset), np.tile([0.5, 0.0], 9) + np.zeros_like(offset),
                    offset):
        one_hot = np.zeros_like(x)
        one_hot[0, 4, 5] = 1.0
        touched = np.asarray(CONV(one_hot, offsets, kernel)).any(-1)
        poisoned = x.copy()
        poisoned[0, 4, 5] = np.inf
        out = np.asarray(CONV(poisoned, offsets, kernel))
        np.testing.assert_array_equal(~np.isfinite(out).all(-1), touched)
        np.testing.assert_array_equal(out[~touched], np.asarray(CONV(x, offsets, kernel))[~touched])
    # zero offsets: lax.conv is the oracle
    ref = lax.conv_general_dilated(poisoned, kernel, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    out = CONV(poisoned, np.zeros_like(offset), kernel)
    np.testing.assert_array_equal(np.isfinite(out), np.isfinite(ref))


def test_samples_outside_the_image_are_exactly_zero_next_to_infinite_pixels(rng):
    """torchvision: a sample with y <= -1 (or x <= -1, y >= H, x >= W) is 0."""
    x = np.full((1, 4, 4, 2), np.inf)
    kernel = np.ones((1, 1, 2, 1))
    for dy, dx in [(-1.0, 0.0), (-1.0, 2.0), (0.0, -1.0), (4.0, 1.0), (1.0, 4.0), (-3.5, 7.25)]:
        offset = np.tile([dy, dx], (1, 4, 4, 1))
        out = np.asarray(deform_conv(x, offset, kernel))
        outside = ((np.arange(4)[:, None] + dy <= -1) | (np.arange(4)[:, None] + dy >= 4)
                   | (np.arange(4)[None, :] + dx <= -1) | (np.arange(4)[None, :] + dx >= 4))
        np.testing.assert_array_equal(out[0, outside, 0], 0)
    # RoIAlign's rule: a RoI wholly above the map (y < -1) pools 0
    rois = np.array([[0, 0.0, -9.0, 3.0, -2.0], [0, 0.0, 0.0, 1.0, 1.0]])
    pooled = np.asarray(deform_roi_pool(x, rois, output_size=2, sampling_ratio=2))
    np.testing.assert_array_equal(pooled[0], 0)
    assert np.isinf(pooled[1]).all()


def test_infinite_pixel_changes_only_rois_that_weight_it(rng):
    features = rng.normal(size=(1, 12, 12, 2))
    rois = np.array([[0, 0.5, 0.5, 4.5, 4.5], [0, 1.0, 1.0, 3.0, 3.0], [0, 6.0, 6.0, 11.0, 11.0],
                     [0, 0.0, 0.0, 5.0, 2.0]])
    offset = np.zeros((4, 2, 2, 2))
    offset[3] = 0.7
    pool = functools.partial(deform_roi_pool, output_size=2, sampling_ratio=2)
    one_hot = np.zeros_like(features)
    one_hot[0, 3, 3] = 1.0
    touched = np.asarray(pool(one_hot, rois, offset)).any(-1)
    assert touched.any() and not touched.all()
    poisoned = features.copy()
    poisoned[0, 3, 3] = np.inf
    out = np.asarray(pool(poisoned, rois, offset))
    np.testing.assert_array_equal(~np.isfinite(out).all(-1), touched)
    np.testing.assert_array_equal(out[~touched], np.asarray(pool(features, rois, offset))[~touched])


@jax.jit
def pool_loss_grads(features, rois, offset, valid):
    def loss(features, offset):
        out = deform_roi_pool(features, rois, offset, output_size=3, sampling_ratio=2)
        return jnp.sum(jnp.where(valid[:, None, None, None], out, 0.0) ** 2)

    return loss(features, offset), jax.grad(loss, argnums=(0, 1))(features, offset)


def roi_case(rng):
    features = rng.normal(size=(2, 10, 9, 3))
    rois = np.array([[0, 1.0, 1.0, 7.0, 6.0], [1, 0.5, 2.0, 8.0, 9.0], [0, 2.0, 0.0, 6.0, 5.0],
                     [1, 3.0, 3.0, 5.5, 8.0]])
    offset = rng.normal(scale=0.2, size=(4, 3, 3, 2))
    return features, rois, offset


@pytest.mark.parametrize("column", [0, 1, 4])
def test_nan_roi_excluded_with_where_has_finite_gradients(rng, column):
    features, rois, offset = roi_case(rng)
    bad = rois.copy()
    bad[2, column] = np.nan
    valid = np.array([True, True, False, True])
    loss, (gf, go) = pool_loss_grads(features, bad, offset, valid)
    ref_loss, (rgf, rgo) = pool_loss_grads(features, rois, offset, valid)
    out = np.asarray(deform_roi_pool(features, bad, offset, output_size=3, sampling_ratio=2))
    assert np.isnan(out[2]).all() and np.isfinite(np.delete(out, 2, 0)).all()
    assert np.isfinite(loss) and np.isfinite(gf).all() and np.isfinite(go).all()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(gf, rgf, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(go, rgo, rtol=1e-12, atol=1e-12)


def test_nan_roi_offset_stays_in_its_bin(rng):
    features, rois, offset = roi_case(rng)
    offset[1, 2, 0, 1] = np.nan
    valid = np.ones(4, bool)
    out = np.asarray(deform_roi_pool(features, rois, offset, output_size=3, sampling_ratio=2))
    bad = np.isnan(out).any(-1)
    assert bad[1, 2, 0] and bad.sum() == 1
    _, (gf, go) = pool_loss_grads(features, rois, offset, valid)
    assert np.isfinite(gf).all()
    others = np.ones(go.shape, bool)
    others[1, 2, 0] = False
    assert np.isfinite(go[others]).all()


def test_padding_rois_pool_zero_and_send_no_gradient(rng):
    features, rois, offset = roi_case(rng)
    padded = np.concatenate([rois, [[-1, 1.0, 1.0, 5.0, 5.0], [-1, np.nan, 0, 0, np.inf]]])
    padded_offset = np.concatenate([offset, rng.normal(size=(1, 3, 3, 2)), np.full((1, 3, 3, 2), np.nan)])
    out = np.asarray(deform_roi_pool(features, padded, padded_offset, output_size=3,
                                     sampling_ratio=2))
    np.testing.assert_array_equal(out[4:], 0)
    np.testing.assert_array_equal(
        out[:4], deform_roi_pool(features, rois, offset, output_size=3, sampling_ratio=2))
    # sum(pool * valid) is finite, and the features' gradient is the one without padding
    _, (gf, go) = pool_loss_grads(features, padded, padded_offset, np.ones(6, bool))
    _, (rgf, rgo) = pool_loss_grads(features, rois, offset, np.ones(4, bool))
    np.testing.assert_allclose(gf, rgf, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(go[4:], 0)
    np.testing.assert_allclose(go[:4], rgo, rtol=1e-12, atol=1e-12)
    # any other batch index out of range still pools NaN
    for index in (-2, 2, 7):
        wrong = rois.copy()
        wrong[0, 0] = index
        pooled = deform_roi_pool(features, wrong, offset, output_size=3, sampling_ratio=2)
        assert np.isnan(pooled[0]).all() and np.isfinite(pooled[1:]).all()


@pytest.mark.parametrize("ratio", [10**9, 10**5, 586])
def test_sampling_ratio_too_large_raises(ratio):
    features = jnp.ones((1, 8, 8, 2))
    rois = jnp.array([[0, 1.0, 1.0, 5.0, 5.0]])
    message = f"deform_roi_pool: sampling_ratio must be at most 585 for a 7x7 output .* got {ratio}"
    with pytest.raises(ValueError, match=message):
        deform_roi_pool(features, rois, output_size=7, sampling_ratio=ratio)
    module = DeformRoIPool(output_size=7, sampling_ratio=ratio, deform_fc_channels=4)
    with pytest.raises(ValueError, match=message):
        module.init(jax.random.key(0), features, rois)


def test_large_sampling_ratio_runs_in_bounded_memory(rng, monkeypatch):
    """Grids too large to gather at once are summed one grid row at a time."""
    import deformjax._src.ops.deform_roi_pool as module
    from reference import deform_roi_pool_reference

    features, rois, offset = roi_case(rng)
    kw = dict(output_size=(3, 3), sampling_ratio=40, spatial_scale=1.0)
    fn = jax.jit(functools.partial(deform_roi_pool, **kw))
    expected = deform_roi_pool_reference(features, rois, offset, gamma=0.1, **kw)
    # 4 RoIs x 9 bins x 1600 samples x 4 corners x 3 channels x 8 bytes: 5.5 MB at once
    monkeypatch.setattr(module, "_VECTORIZED_BYTES", 2**20)
    jax.clear_caches()
    try:
        analysis = fn.lower(features, rois, offset).compile().memory_analysis()
        if analysis is not None:
            assert analysis.temp_size_in_bytes < 2**20
        np.testing.assert_allclose(fn(features, rois, offset), expected, rtol=1e-10, atol=1e-10)
        grad = jax.grad(lambda f: (fn(f, rois, offset) ** 2).sum())
        one_row = grad(features)
    finally:
        jax.clear_caches()
    np.testing.assert_allclose(one_row, grad(features), rtol=1e-10, atol=1e-10)


def test_adaptive_sample_count_beyond_int32_raises():
    wide = jax.ShapeDtypeStruct((1, 2**15, 2**15, 1), jnp.float32)
    rois = jax.ShapeDtypeStruct((3, 5), jnp.float32)
    message = re.escape("deform_roi_pool: adaptive sampling (sampling_ratio <= 0) counts a bin's "
                        "samples in int32: (2 * H + 5) * (2 * W + 5) = 4295622681")
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(functools.partial(deform_roi_pool, output_size=7), wide, rois)
    jax.eval_shape(functools.partial(deform_roi_pool, output_size=7, sampling_ratio=2), wide, rois)


def test_inputs_too_large_for_int32_rows_raise():
    big = jax.ShapeDtypeStruct((2**16, 2**8, 2**8, 8), jnp.float32)
    offset = jax.ShapeDtypeStruct((2**16, 2**8, 2**8, 18), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 8, 8), jnp.float32)
    message = re.escape("deform_conv: the input is too large to index with int32: N * H * W * "
                        "offset_groups + 1 = 65536 * 256 * 256 * 1 + 1 = 4294967297")
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(CONV, big, offset, kernel)
    rois = jax.ShapeDtypeStruct((3, 5), jnp.float32)
    with pytest.raises(ValueError, match="deform_roi_pool: the input is too large to index"):
        jax.eval_shape(functools.partial(deform_roi_pool, output_size=7), big, rois)
    # just below the limit, abstract evaluation works
    ok = jax.ShapeDtypeStruct((2**15 - 1, 2**8, 2**8, 8), jnp.float32)
    ok_offset = jax.ShapeDtypeStruct((2**15 - 1, 2**8, 2**8, 18), jnp.float32)
    assert jax.eval_shape(CONV, ok, ok_offset, kernel).shape == (2**15 - 1, 256, 256, 8)


def roundtrip(exported):
    return export.deserialize(exported.serialize())


def test_export_deform_conv_with_symbolic_batch_for_every_platform(rng):
    b, = export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct
    kernel = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    fn = jax.jit(CONV)
    exported = export.export(fn, platforms=("cpu", "cuda", "tpu"))(
        spec((b, 8, 8, 4), jnp.float32), spec((b, 8, 8, 18), jnp.float32), kernel)
    assert exported.platforms == ("cpu", "cuda", "tpu")
    loaded = roundtrip(exported)
    for n in (1, 3):
        x = rng.normal(size=(n, 8, 8, 4)).astype(np.float32)
        offset = rng.normal(scale=2.0, size=(n, 8, 8, 18)).astype(np.float32)
        np.testing.assert_allclose(loaded.call(x, offset, kernel), fn(x, offset, kernel),
                                   rtol=1e-6, atol=1e-6)


def test_export_deform_conv_with_symbolic_height_and_width(rng):
    h, w = export.symbolic_shape("h, w")
    spec = jax.ShapeDtypeStruct
    kernel = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    mask_spec = spec((2, h, w, 9), jnp.float32)
    fn = jax.jit(CONV)
    loaded = roundtrip(export.export(fn)(
        spec((2, h, w, 4), jnp.float32), spec((2, h, w, 18), jnp.float32), kernel, mask_spec))
    for hw in ((5, 7), (11, 6)):
        x = rng.normal(size=(2,) + hw + (4,)).astype(np.float32)
        offset = rng.normal(scale=2.0, size=(2,) + hw + (18,)).astype(np.float32)
        mask = rng.uniform(size=(2,) + hw + (9,)).astype(np.float32)
        np.testing.assert_allclose(loaded.call(x, offset, kernel, mask),
                                   fn(x, offset, kernel, mask), rtol=1e-6, atol=1e-6)


def test_export_deform_conv_module_with_symbolic_batch(rng):
    b, = export.symbolic_shape("b")
    model = DeformConv(6, 3, modulated=True)
    params = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 4), jnp.float32))
    # move the offsets away from zero, so that the export has something to sample
    params = jax.tree_util.tree_map(
        lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    apply = jax.jit(model.apply)
    loaded = roundtrip(export.export(apply, platforms=("cpu", "cuda", "tpu"))(
        params, jax.ShapeDtypeStruct((b, 8, 8, 4), jnp.float32)))
    for n in (1, 4):
        x = rng.normal(size=(n, 8, 8, 4)).astype(np.float32)
        np.testing.assert_allclose(loaded.call(params, x), apply(params, x), rtol=1e-6, atol=1e-6)


def test_export_deform_roi_pool_with_symbolic_roi_count(rng):
    r, = export.symbolic_shape("r")
    features, rois, offset = roi_case(rng)
    fn = jax.jit(functools.partial(deform_roi_pool, output_size=3, sampling_ratio=2))
    spec = jax.ShapeDtypeStruct
    loaded = roundtrip(export.export(fn, platforms=("cpu", "cuda", "tpu"))(
        features, spec((r, 5), rois.dtype), spec((r, 3, 3, 2), offset.dtype)))
    for count in (1, 4):
        np.testing.assert_allclose(loaded.call(features, rois[:count], offset[:count]),
                                   fn(features, rois[:count], offset[:count]), rtol=1e-12)


def test_chunk_policy_follows_the_lowering_platform():
    """Chunked on a CPU, one chunk for an accelerator, whatever the host's backend."""
    from deformjax._src import sampled_matmul

    x = jax.ShapeDtypeStruct((4, 32, 32, 64), jnp.float32)
    offset = jax.ShapeDtypeStruct((4, 32, 32, 18), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)
    assert sampled_matmul.chunk_rows(4 * 32 * 32, 9 * 64 * 4, tangent=False) is not None
    fn = jax.jit(CONV)
    # the CPU's chunks are a loop around a chunk's product; one chunk is all rows
    cpu = fn.trace(x, offset, kernel).lower(lowering_platforms=("cpu",)).as_text()
    cuda = fn.trace(x, offset, kernel).lower(lowering_platforms=("cuda",)).as_text()
    chunk = sampled_matmul.chunk_rows(4 * 32 * 32, 9 * 64 * 4, tangent=False)
    assert "stablehlo.while" in cpu and f"tensor<{chunk}x64xf32>" in cpu
    assert "stablehlo.while" not in cuda and "tensor<4096x64xf32>" in cuda


def test_vmap_keeps_the_gather_guard_a_conditional(rng):
    """Under vmap the guard's predicate stays one scalar: a conditional, not a select
    that would run both branches (4x slower; timed in benchmarks/bench.py)."""
    x, offset, kernel, mask = conv_case(rng, n=1)
    batched = [np.stack([a] * 3) for a in (x, offset, mask)]
    fn = jax.jit(jax.vmap(lambda x, o, m: CONV(x, o, kernel, m)))
    hlo = fn.lower(*batched).compile().as_text()
    assert "conditional" in hlo
    out = fn(*batched)
    np.testing.assert_allclose(out[1], CONV(x, offset, kernel, mask), rtol=1e-12, atol=1e-12)
    # and in the gradient, whose chunks compute their guard inside jax.checkpoint:
    # as many conditionals under vmap as without it (the primal's and the tangent's)
    grad = jax.grad(lambda x, o, m: (CONV(x, o, kernel, m) ** 2).sum(), argnums=(0, 1, 2))
    plain = jax.jit(grad).lower(x, offset, mask).compile().as_text().count("conditional(")
    mapped = jax.jit(jax.vmap(grad)).lower(*batched).compile().as_text().count("conditional(")
    assert plain >= 2 and mapped == plain


def _conditionals_with_and_without_fence(monkeypatch, fn, *operands):
    """Conditionals in ``jit(fn)`` compiled for the CPU, as is and with ``sampling.fenced`` a
    plain call. The fence is aimed at the CPU's fusion (an H200's compiler dropped the
    conditional, at no cost: benchmarks/gpu_policy.py), so the CPU compiles on any machine."""
    from deformjax._src import sampling

    operands = jax.device_put(operands, jax.devices("cpu")[0])

    def conditionals():
        jax.clear_caches()
        return jax.jit(fn).lower(*operands).compile().as_text().count("conditional(")

    fenced = conditionals()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(sampling, "fenced", lambda fn, *operands: fn(*operands))
            return fenced, conditionals()
    finally:
        jax.clear_caches()


def test_derivative_points_are_written_out_once(rng, monkeypatch):
    """On a CPU the forward's flat coordinates and weights, and the derivative's coordinates,
    corner rows and weights, and split offset tangent, are the results of conditionals
    (sampling.fenced) that survive compilation: were their predicate one XLA can decide, XLA
    would drop them, every per-corner and per-channel reader would repeat the points'
    arithmetic, and the corners' loops would run scalar (docs/performance.md: EDVR's forward
    52 -> 35 ms and forward+backward -15% with the flat, written-out coordinates; its forward
    -7% with the index computed from the written-out weights)."""
    x, offset, kernel, mask = conv_case(rng, n=1)
    forward = lambda x, o, m: CONV(x, o, kernel, m)  # noqa: E731
    grad = jax.grad(lambda x, o, m: (forward(x, o, m) ** 2).sum(), argnums=(0, 1, 2))
    fenced, plain = _conditionals_with_and_without_fence(monkeypatch, forward, x, offset, mask)
    assert fenced == plain + 2
    fenced, plain = _conditionals_with_and_without_fence(monkeypatch, grad, x, offset, mask)
    assert fenced == plain + 5  # the primal's two and the derivative chunks' three


def test_cpu_forward_takes_corner_major_index_and_weights(rng):
    """On a CPU deform_conv's forward computes its index and weights with the corner axis first
    (sampling.corners_leading, vectorized by LLVM: EDVR's forward 52 -> 35 ms,
    docs/performance.md); lowered for a GPU it keeps the per-point layout measured there."""
    x, offset, kernel, mask = jax.device_put(conv_case(rng, n=1, c_in=4), jax.devices("cpu")[0])
    fn = jax.jit(lambda x, o, m: CONV(x, o, kernel, m))
    points = 7 * 8 * 9  # output positions times taps, one offset group
    text = {platform: fn.trace(x, offset, mask).lower(lowering_platforms=(platform,)).as_text()
            for platform in ("cpu", "cuda")}
    assert f"tensor<4x{points}xi32>" in text["cpu"]
    assert f"tensor<4x{points}xi32>" not in text["cuda"]
    assert "tensor<56x9x4xi32>" in text["cuda"]  # (rows, taps, corners)


def test_cpu_sampler_layout_has_the_accelerators_derivatives(rng, monkeypatch):
    """The CPU's flat, corner-major forward and derivative chunks (sampled_matmul._rows_flat,
    _tangent_points_flat) give the values, gradients, forward-mode tangents and second
    derivatives of the per-point layout that GPUs run (the fixtures test the CPU's against
    torchvision): next to an infinite pixel, a NaN offset, integer offsets, a zero mask."""
    from deformjax._src import sampled_matmul

    x, offset, kernel, mask = conv_case(rng, n=2, c_in=4, c_out=3)
    x[0, 1, 1, 0] = np.inf
    offset[0, 3, 4, 5] = np.nan
    offset[1, 2, 2, :6] = [1.0, -1.0, 0.0, 2.0, -2.0, 1.0]
    mask[1, 4, 4, 3] = 0
    x, offset, kernel, mask = jax.device_put((x, offset, kernel, mask), jax.devices("cpu")[0])

    def loss(x, offset, kernel, mask):
        out = CONV(x, offset, kernel, mask)
        return jnp.nansum(jnp.where(jnp.isinf(out), 0, out) ** 2)

    def everything():
        jax.clear_caches()
        out = CONV(x, offset, kernel, mask)
        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(x, offset, kernel, mask)
        tangent = jax.jvp(lambda x, o, m: CONV(x, o, kernel, m), (x, offset, mask),
                          (x * 0 + 0.3, offset * 0.7, mask * 0.5))[1]
        second = jax.jvp(lambda o: jax.grad(loss, argnums=1)(x, o, kernel, mask), (offset,),
                         (offset * 0.5,))[1]
        return out, grads, tangent, second

    flat = everything()
    monkeypatch.setattr(sampled_matmul, "_rows_flat", sampled_matmul._rows_by_point)
    monkeypatch.setattr(sampled_matmul, "_tangent_points_flat",
                        sampled_matmul._tangent_points_by_point)
    try:
        by_point = everything()
    finally:
        jax.clear_caches()
    for got, want in zip(jax.tree.leaves(flat), jax.tree.leaves(by_point)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.isinf(flat[0]).any() and np.isnan(flat[0]).any()


@pytest.mark.parametrize("row0", ["finite", "infinite"])
def test_corner_leading_gather_has_the_gathers_values(rng, row0):
    """sampling.read_weights_leading, read_index_leading and gather_leading (the CPU forward's
    sampler, on the image without a zero row) give gather's values: out of the image, at
    integer coordinates next to the border, with NaN points, an infinite pixel read with weight
    0 (0) or not (inf), a zero, an infinite and a NaN scale; with a finite row 0 (where corners
    that read nothing are sent: the fast branch) and an infinite one (the branch that masks
    their rows)."""
    from deformjax._src import sampling

    h, w, c = 5, 6, 3
    image = rng.normal(size=(h * w, c))
    image[7] = np.inf  # pixel (1, 1)
    if row0 == "infinite":
        image[0] = -np.inf  # pixel (0, 0)
    assert bool(sampling.first_row_finite(jnp.asarray(image))) == (row0 == "finite")
    image = sampling.with_zero_row(jnp.asarray(image))
    y = np.array([0.5, -1.0, -0.5, 4.0, 4.5, 1.0, 1.0, 0.3, np.nan, 2.2, 1.0, 30.0, 2.7, 1.5])
    x = np.array([0.5, 2.0, 5.2, 3.0, 1.0, 1.0, 0.0, 1.0, 1.0, np.nan, 2.0, 1.0, -0.9, 3.5])
    scale = rng.uniform(0.5, 1.0, size=y.shape)
    scale[0], scale[10], scale[13] = np.inf, 0, np.nan  # inf; pixel (1, 2) with scale 0; NaN
    pts = sampling.points(jnp.asarray(y), jnp.asarray(x), 0, size=(h, w), mode="zeros")
    index, weights = sampling.corners(pts, zero_row=h * w, scale=jnp.asarray(scale))
    expected = sampling.gather(image, index, weights)
    weights = sampling.read_weights_leading(pts, jnp.asarray(scale))
    index = sampling.read_index_leading(pts.low, weights, y_rows=pts.y_rows, x_rows=pts.x_rows)
    assert index.shape == weights.shape == (4,) + y.shape
    # corners that read nothing read row 0 of the image without its zero row, with weight * 0
    lead_index, lead_weights = sampling.corners_leading(pts, zero_row=h * w,
                                                        scale=jnp.asarray(scale))
    reads = np.isfinite(lead_weights) & (lead_weights != 0)
    np.testing.assert_array_equal(index, np.where(reads, lead_index, 0))
    np.testing.assert_array_equal(weights, np.where(reads, lead_weights, lead_weights * 0))
    assert (index < h * w).all() and (~reads).any() and reads.any()
    # gather_leading samples the image without its zero row
    out = sampling.gather_leading(image[:-1], index, weights, guard=sampling.bounds_guard(index))
    np.testing.assert_array_equal(out, expected)
    assert np.isinf(out[5]).all() and np.isfinite(out[6]).all()  # (1, 1) itself; (1, 0)
    assert np.isnan(out[8]).all() and np.isnan(out[13]).all() and (out[11] == 0).all()
    assert np.isnan(out[0]).all()  # an infinite scale: every corner's weight * 0

    def weights(layout, y, x, scale):  # the weights' derivatives, corner axis last
        pts = sampling.points(y, x, 0, size=(h, w), mode="zeros")
        if layout == "leading":
            return sampling.corners_leading(pts, zero_row=h * w, scale=scale)[1].T
        return sampling.corners(pts, zero_row=h * w, scale=scale)[1]

    primals = tuple(jnp.asarray(np.nan_to_num(a)) for a in (y, x, scale))
    tangents = tuple(jnp.asarray(rng.normal(size=y.shape)) for _ in range(3))
    for mode in (jax.jvp, lambda f, p, t: jax.vjp(f, *p)[1](t[0][:, None] * np.ones(4))):
        got = mode(functools.partial(weights, "leading"), primals, tangents)
        want = mode(functools.partial(weights, "last"), primals, tangents)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_weights_cotangent_is_one_batched_product_on_the_cpu(rng, monkeypatch):
    """On a CPU deform_conv's derivative chunks take the weights' tangent stacked, one product
    batched over the samples (sampling._stacked_rows), whose transpose XLA compiles to a batched
    matrix product
    instead of one YNNPACK reduction per corner (CenterNet's forward+backward 253 -> 212 ms,
    docs/performance.md); lowered for a GPU it keeps the per-corner form measured there."""
    from deformjax._src import sampling

    x, offset, kernel, mask = jax.device_put(conv_case(rng, c_in=8), jax.devices("cpu")[0])
    grad = jax.jit(jax.grad(lambda x, o, m: (CONV(x, o, kernel, m) ** 2).sum(), argnums=(0, 1, 2)))
    batched = {platform: len(re.findall(r"batching_dims = \[0, 1\] x \[0, 1\]", grad.trace(
        x, offset, mask).lower(lowering_platforms=(platform,)).as_text())) for platform in ("cpu", "cuda")}
    assert batched["cpu"] > 0 and batched["cuda"] == 0

    def reductions():
        jax.clear_caches()
        return grad.lower(x, offset, mask).compile().as_text().count(" reduce(")

    try:
        product = reductions()
        monkeypatch.setattr(sampling, "_stacked_rows", sampling._rows_by_corner)
        by_corner = reductions()
    finally:
        jax.clear_caches()
    assert product + 4 <= by_corner  # one reduction per corner fewer, at least


def test_point_sums_are_the_gather_summed_over_the_points(rng):
    """sampling.point_sums (dcnv3's aggregation; on a CPU one gather of every corner and a
    batched product) has the values and derivatives of gather(...).sum(axis=-2), next to an
    infinite pixel too: a corner of weight 0 reads nothing, a NaN weight stays in its sum."""
    from deformjax._src import sampling

    image = np.concatenate([rng.normal(size=(30, 5)), np.zeros((1, 5))])  # the zero row last
    image[7] = np.inf
    index = rng.integers(0, 31, size=(6, 3, 4))
    index[:2] = 7  # samples 0 and 1 read the infinite pixel with every corner
    weights = rng.uniform(0.1, 1.0, size=(6, 3, 4))
    weights[0] = 0  # sample 0 gives it weight 0: finite, 0
    weights[2, 1, 3] = np.nan
    weights[3, :, 1:] = 0
    image, index, weights = jnp.asarray(image), jnp.asarray(index), jnp.asarray(weights)

    def by_point(image, weights):
        return sampling.gather(image, index, weights).sum(axis=-2)

    def fused(image, weights):
        return sampling.point_sums(image, index, weights)

    cotangent = rng.normal(size=(6, 5))
    expected, expected_vjp = jax.vjp(by_point, image, weights)
    out, vjp = jax.vjp(fused, image, weights)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert np.isfinite(out[0]).all() and np.isinf(out[1]).all() and np.isnan(out[2]).all()
    for got, want in zip(vjp(cotangent), expected_vjp(cotangent)):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(jax.jvp(fused, (image, weights), (image * 0, weights))[1],
                               jax.jvp(by_point, (image, weights), (image * 0, weights))[1],
                               rtol=1e-12)


def test_dcnv3_sums_its_points_without_a_reduction_on_the_cpu(rng, monkeypatch):
    """dcnv3's sum over the points is sampling.point_sums' batched product on a CPU, not a
    YNNPACK reduction (forward 20-31% faster at InternImage-T's stages, docs/performance.md)."""
    from deformjax._src import sampling

    x = rng.normal(size=(1, 6, 6, 8))
    offset, mask = rng.normal(size=(1, 6, 6, 36)), rng.uniform(size=(1, 6, 6, 18))
    operands = jax.device_put((x, offset, mask), jax.devices("cpu")[0])
    fn = jax.jit(lambda x, o, m: dcnv3(x, o, m, kernel_size=3, padding=1, groups=2))

    def reductions():
        jax.clear_caches()
        return fn.lower(*operands).compile().as_text().count(" reduce(")

    try:
        fused = reductions()
        monkeypatch.setattr(sampling, "point_sums",
                            lambda image, index, weights: sampling.gather(image, index, weights)
                            .sum(axis=-2))
        by_point = reductions()
    finally:
        jax.clear_caches()
    assert fused < by_point


def test_adaptive_roi_pooling_writes_its_sample_rows_out_once(rng, monkeypatch):
    """The ragged loop's corner rows come out of sampling.fenced: without it XLA fused their
    index arithmetic into each corner's gather, once per channel (benchmarks/bench_roi.py's
    map200 forward+backward 26 -> 63 ms on the 2-core EPYC, unnoticed for a day)."""
    features = rng.normal(size=(1, 16, 16, 8)).astype(np.float32)
    rois = np.array([[0, 1.0, 2.0, 12.0, 9.0], [0, 3.5, 0.0, 15.0, 14.5]], np.float32)
    grad = jax.grad(lambda f, r: (deform_roi_pool(f, r, output_size=3) ** 2).sum())
    fenced, plain = _conditionals_with_and_without_fence(monkeypatch, grad, features, rois)
    assert fenced > plain


def test_deform_roi_pool_module_accepts_what_the_function_accepts():
    features = np.ones((1, 12, 12, 2), np.float32)
    rois = [[0, 1.0, 1.0, 8.0, 8.0]]  # a list of Python floats: weakly typed
    module = DeformRoIPool(output_size=2, sampling_ratio=2, deform_fc_channels=4)
    params = module.init(jax.random.key(0), features, rois)
    np.testing.assert_allclose(module.apply(params, features, rois),
                               deform_roi_pool(features, rois, output_size=2, sampling_ratio=2))
    with pytest.raises(ValueError, match=re.escape("DeformRoIPool: rois must have shape (R, 5)")):
        module.apply(params, features, [1.0, 2.0])
