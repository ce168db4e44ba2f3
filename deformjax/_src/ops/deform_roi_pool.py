"""Deformable RoI pooling (Dai et al. 2017, section 2.2), with mmcv's semantics."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from deformjax._src import args, ragged, sampling

_FN = "deform_roi_pool"

# Bytes of samples (four corners each) up to which every grid point of every bin
# is gathered at once (fastest); larger grids are summed one grid row at a time,
# so that the temporaries of a huge sampling_ratio stay bounded.
_VECTORIZED_BYTES = 2**28
# Most bilinear samples per RoI (oh * ow * sampling_ratio**2) that a call may ask for.
MAX_SAMPLES_PER_ROI = 2**24


def deform_roi_pool(
    features: jax.Array,
    rois: jax.Array,
    offset: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> jax.Array:
    """Deformable RoI pooling, RoIAlign-style ("aligned"), optionally modulated.

    Each RoI is split into ``oh x ow`` bins; bin ``(i, j)`` is shifted by
    ``gamma * roi_height * dy`` rows and ``gamma * roi_width * dx`` columns and
    averages a regular grid of bilinear samples (RoIAlign's boundary rule). With
    ``offset=None`` this is ``torchvision.ops.roi_align(..., aligned=True)``;
    with offsets it is mmcv's ``DeformRoIPool`` (``ModulatedDeformRoIPool`` when
    ``mask`` is given).

    Args:
      features: ``(N, H, W, C)`` feature map.
      rois: ``(R, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` in input-image
        coordinates; times ``spatial_scale`` they are feature coordinates, and
        the RoI corners are shifted by -0.5 ("aligned"). ``batch_index`` is
        truncated to an int; a RoI whose batch index is outside ``[0, N)``
        gives NaN (it cannot raise under ``jit``). ``rois`` carry no gradient.
      offset: optional ``(R, oh, ow, 2)``, normalized ``(dy, dx)`` per bin.
        (mmcv's ``(R, 2, oh, ow)`` with ``(dx, dy)``, transposed to
        ``(0, 2, 3, 1)`` with the last axis reversed.)
      mask: optional ``(R, oh, ow, 1)``, multiplying each output bin.
      output_size: int or ``(oh, ow)``.
      spatial_scale: positive factor from input-image to feature coordinates.
      sampling_ratio: samples per bin along each axis when positive; when
        ``<= 0``, adaptive: ``ceil(roi_height / oh)`` by ``ceil(roi_width / ow)``
        per RoI, as torchvision / mmcv / detectron2 do, exactly, for RoIs of
        any size. The adaptive samples are a ragged list visited in chunks by
        a ``while_loop``, so time and memory scale with the samples the RoIs
        need (of a bin larger than the map, only those that can read it are
        visited; the average still divides by the whole grid). Adaptive
        sampling supports reverse-mode derivatives of every order (``grad``,
        ``grad`` of ``grad``) but not forward mode (``jax.jvp``,
        ``jax.jacfwd``); a positive ``sampling_ratio`` supports both.
      gamma: scale of the offsets.

    Returns:
      ``(R, oh, ow, C)`` in the promoted dtype of ``features``, ``offset`` and
      ``mask``.

    Example:
      >>> import jax.numpy as jnp
      >>> from deformjax import deform_roi_pool
      >>> features = jnp.ones((1, 16, 16, 8))
      >>> rois = jnp.array([[0.0, 2.0, 2.0, 10.0, 12.0]])
      >>> offset = jnp.zeros((1, 7, 7, 2))
      >>> deform_roi_pool(features, rois, offset, output_size=7, sampling_ratio=2).shape
      (1, 7, 7, 8)
    """
    features, rois = jnp.asarray(features), jnp.asarray(rois)
    offset = None if offset is None else jnp.asarray(offset)
    mask = None if mask is None else jnp.asarray(mask)
    (oh, ow) = _check(features, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma)
    return _deform_roi_pool(
        features,
        rois,
        offset,
        mask,
        output_size=(oh, ow),
        spatial_scale=float(spatial_scale),
        sampling_ratio=int(sampling_ratio),
        gamma=float(gamma),
    )


@functools.partial(
    jax.jit,
    static_argnames=("output_size", "spatial_scale", "sampling_ratio", "gamma",
                     "position_sensitive"),
)
def _deform_roi_pool(features, rois, offset, mask, *, output_size, spatial_scale, sampling_ratio,
                     gamma, position_sensitive=False):
    return _pool((features,), rois, offset, mask, output_size=output_size,
                 spatial_scales=(spatial_scale,), sampling_ratio=sampling_ratio, gamma=gamma,
                 position_sensitive=position_sensitive, finest_scale=None)


def roi_levels(rois: jax.Array, num_levels: int, finest_scale: float) -> jax.Array:
    """The FPN level each RoI is pooled from, as mmdet's ``SingleRoIExtractor.map_roi_levels``.

    Args:
      rois: ``(R, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` in image coordinates.
      num_levels: ``L``, the number of levels.
      finest_scale: mmdet's ``finest_scale`` (56).

    Returns:
      ``(R,)`` int32 ``clip(floor(log2(sqrt(w * h) / finest_scale + 1e-6)), 0, L - 1)``;
      a RoI with an empty or non-finite box gets level 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from deformjax import roi_levels
      >>> roi_levels(jnp.array([[0.0, 0, 0, 50, 50], [0.0, 0, 0, 300, 300]]), 4, 56)
      Array([0, 2], dtype=int32)
    """
    x1, y1, x2, y2 = rois[:, 1], rois[:, 2], rois[:, 3], rois[:, 4]
    area = (x2 - x1) * (y2 - y1)
    area = jnp.where(jnp.isfinite(area) & (area > 0), area, 0)
    level = jnp.floor(jnp.log2(jnp.sqrt(area) / finest_scale + 1e-6))
    return jnp.clip(level, 0, num_levels - 1).astype(jnp.int32)


def _pool(levels, rois, offset, mask, *, output_size, spatial_scales, sampling_ratio, gamma,
          position_sensitive, finest_scale):
    """The pooling of every RoI from one of ``levels`` (maps ``(N, H_l, W_l, C)``).

    All levels are rows of one image matrix; each RoI reads only its level's
    rows, with its level's size and scale (one level: plain deform_roi_pool).
    """
    oh, ow = output_size
    n, _, _, channels = levels[0].shape
    num_rois = rois.shape[0]
    dtype, acc = args.compute_dtypes(*levels, offset, mask)

    rois = lax.stop_gradient(rois).astype(acc)
    # A RoI with a non-finite coordinate pools NaN; it is computed as an empty
    # RoI at the origin, so that nothing else (no gradient either) sees a NaN.
    finite = jnp.all(jnp.isfinite(rois[:, 1:]), axis=1)
    x1, y1, x2, y2 = jnp.where(finite[:, None], rois[:, 1:], 0).T

    if position_sensitive:
        groups, channels = oh * ow, channels // (oh * ow)
    else:
        groups = 1
    # Per level: size, scale, first row in the image matrix.
    sizes = [f.shape[1:3] for f in levels]
    firsts, total_rows = [], 0
    for h_l, w_l in sizes:
        firsts.append(total_rows)
        total_rows += n * h_l * w_l * groups
    if len(levels) == 1:
        level = jnp.zeros((num_rois,), jnp.int32)
    else:
        level = roi_levels(jnp.where(finite[:, None], rois, 0), len(levels), finest_scale)

    def per_roi(values, dtype):
        return jnp.asarray(values, dtype)[level]

    h, w = per_roi([s[0] for s in sizes], jnp.int32), per_roi([s[1] for s in sizes], jnp.int32)
    scale = per_roi(spatial_scales, acc)
    first = per_roi(firsts, jnp.int32)

    start_w = x1 * scale - 0.5
    start_h = y1 * scale - 0.5
    roi_w = (x2 * scale - 0.5) - start_w
    roi_h = (y2 * scale - 0.5) - start_h
    bin_h, bin_w = roi_h / oh, roi_w / ow

    if sampling_ratio > 0:
        count_h = count_w = jnp.full((num_rois,), sampling_ratio, acc)
    else:
        # Adaptive: torchvision's ceil(roi_height / oh) samples, visited exactly (ragged).
        count_h = jnp.maximum(jnp.ceil(bin_h), 0)
        count_w = jnp.maximum(jnp.ceil(bin_w), 0)

    # Bin origins (R, oh, ow): the RoI start moved by the bin's offset, plus the
    # bin's place in the RoI (mmcv's order of evaluation).
    y0 = jnp.broadcast_to(start_h[:, None, None], (num_rois, oh, ow))
    x0 = jnp.broadcast_to(start_w[:, None, None], (num_rois, oh, ow))
    if offset is not None:
        off = offset.astype(acc)
        y0 = y0 + gamma * roi_h[:, None, None] * off[..., 0]
        x0 = x0 + gamma * roi_w[:, None, None] * off[..., 1]
    y0 = y0 + (jnp.arange(oh, dtype=acc) * bin_h[:, None])[:, :, None]
    x0 = x0 + (jnp.arange(ow, dtype=acc) * bin_w[:, None])[:, None, :]

    # Batch index: exactly -1 is padding (pools 0, no gradient); anything else
    # outside [0, N) pools NaN. Neither reads a pixel.
    padding = rois[:, 0] == -1
    batch = jnp.trunc(rois[:, 0])
    batch_ok = (batch >= 0) & (batch < n)
    reads = batch_ok[:, None, None]
    batch = jnp.where(batch_ok, batch, 0).astype(jnp.int32)[:, None, None]  # (R, 1, 1)
    if position_sensitive:
        # Output channel c of bin (i, j) reads input channel (c * oh + i) * ow + j: the
        # image matrix gets one row per (pixel, bin), and bin (i, j) is channel block
        # i * ow + j of the sampler.
        pixels = [f.astype(dtype).reshape(n, f.shape[1], f.shape[2], channels, groups)
                  .swapaxes(3, 4) for f in levels]
        group = (jnp.arange(oh)[:, None] * ow + jnp.arange(ow))[None, :, :, None, None]
    else:
        group, pixels = 0, [f.astype(dtype) for f in levels]
    image = sampling.with_zero_row(
        jnp.concatenate([p.reshape(-1, channels) for p in pixels], axis=0))

    if sampling_ratio <= 0:
        def per_bin(a):  # (R,) -> (R * oh * ow,)
            return jnp.broadcast_to(jnp.asarray(a)[:, None, None], (num_rois, oh, ow)).reshape(-1)

        y0, x0 = y0.reshape(-1), x0.reshape(-1)
        first_iy, rows = ragged.visited(y0, per_bin(bin_h), per_bin(count_h), per_bin(h))
        first_ix, cols = ragged.visited(x0, per_bin(bin_w), per_bin(count_w), per_bin(w))
        bins = ragged.Bins(
            bin_h=per_bin(bin_h), bin_w=per_bin(bin_w),
            count_h=per_bin(jnp.maximum(count_h, 1)), count_w=per_bin(jnp.maximum(count_w, 1)),
            first_iy=first_iy, first_ix=first_ix, cols=cols, samples=rows * cols,
            batch=per_bin(jnp.where(reads[:, 0, 0], batch[:, 0, 0], 0)),
            first_row=per_bin(first), height=per_bin(h), width=per_bin(w),
            group=jnp.broadcast_to(jnp.asarray(group, jnp.int32), (num_rois, oh, ow, 1, 1)
                                   ).reshape(-1),
        )
        # A RoI that reads nothing (padding, a bad batch index, a non-finite box) visits nothing.
        bins = bins._replace(samples=jnp.where(per_bin(reads[:, 0, 0]), bins.samples, 0))
        bins = jax.tree.map(lax.stop_gradient, bins)
        out = ragged.pooled_sums(image, y0, x0, bins, groups=groups, zero_row=total_rows)
        out = out.reshape(num_rois, oh, ow, channels)
        total = jnp.maximum(count_h * count_w, 1)
        out = out / total[:, None, None, None]
        # A NaN bin origin (a NaN offset) pools NaN, as on the static grid.
        nan = jnp.isnan(y0) | jnp.isnan(x0)
        out = jnp.where(nan.reshape(num_rois, oh, ow, 1), jnp.nan, out)
        return _finish(out, mask, batch_ok & finite, padding, dtype, acc)

    # Sample offsets within a bin, in torchvision's evaluation order.
    grid_h = grid_w = sampling_ratio
    index_h = jnp.arange(grid_h, dtype=acc)
    index_w = jnp.arange(grid_w, dtype=acc)
    dy = (index_h + 0.5) * bin_h[:, None] / count_h[:, None]  # (R, grid_h)
    dx = (index_w + 0.5) * bin_w[:, None] / count_w[:, None]  # (R, grid_w)
    weight = 1.0 / (grid_h * grid_w)  # the averaging weight of every sample

    def per_sample(a):  # (R,) -> (R, 1, 1, 1, 1)
        return a[:, None, None, None, None]

    def rows_of_grid(dy):
        """The weighted samples of some rows of every bin's grid, summed: (R, oh, ow, C).

        ``dy``: ``(R, k)`` for ``k`` rows of the grid.
        """
        ys = y0[..., None, None] + dy[:, None, None, :, None]  # (R, oh, ow, k, 1)
        xs = x0[..., None, None] + dx[:, None, None, None, :]  # (R, oh, ow, 1, grid_w)
        index, weights = sampling.locate(
            ys, xs, batch[..., None, None], size=(per_sample(h), per_sample(w)), mode="clamp",
            zero_row=total_rows, scale=weight, reads=reads[..., None, None],
            groups=groups, group=group, first_row=per_sample(first),
        )
        guard = sampling.bounds_guard(index)
        return sampling.gather(image, index, weights, guard=guard).sum(axis=(3, 4))

    # All grid points at once while their samples are small; else one grid row
    # at a time, so that temporaries stay bounded whatever the sampling ratio.
    sample_bytes = num_rois * oh * ow * grid_h * grid_w * channels * 4 * jnp.dtype(acc).itemsize
    if isinstance(sample_bytes, int) and sample_bytes <= _VECTORIZED_BYTES:
        out = rows_of_grid(dy)
    else:
        @jax.checkpoint  # the backward pass recomputes each row instead of stacking them
        def step(out, dy_row):
            return out + rows_of_grid(dy_row[:, None]), None

        zeros = jnp.zeros((num_rois, oh, ow, channels), acc)
        out, _ = lax.scan(step, zeros, dy.T)
    return _finish(out, mask, batch_ok & finite, padding, dtype, acc)


def _finish(out, mask, valid, padding, dtype, acc):
    if mask is not None:
        out = out * mask.astype(acc)
    out = jnp.where(valid[:, None, None, None], out, jnp.nan)
    out = jnp.where(padding[:, None, None, None], 0, out)
    return out.astype(dtype)


def _check(features, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma,
           fn=_FN, position_sensitive=False):
    args.check_floating(fn, features=features, rois=rois, offset=offset, mask=mask)
    args.check_rank(fn, "features", features, 4, "(N, H, W, C)")
    n, h, w, c = features.shape
    if h < 1 or w < 1:
        raise args.fail(
            fn, f"features must have H, W >= 1 to sample from; got shape {features.shape}"
        )
    oh, ow = args.as_pair(output_size, "output_size", fn)
    if position_sensitive:
        if c % (oh * ow):
            raise args.fail(
                fn,
                f"features.shape[-1] must be C_out * oh * ow, a multiple of oh * ow = {oh * ow} "
                f"for a {oh}x{ow} output; got {c}",
            )
        args.check_rows(fn, n * h * w * oh * ow + 1,
                        f"N * H * W * oh * ow + 1 = {n} * {h} * {w} * {oh * ow} + 1")
    else:
        args.check_rows(fn, n * h * w + 1, f"N * H * W + 1 = {n} * {h} * {w} + 1")
    visits = (2 * h + 5) * (2 * w + 5)  # adaptive sampling's bound on one bin's visited samples
    if sampling_ratio <= 0 and isinstance(visits, int) and visits > args.MAX_ROWS:
        raise args.fail(
            fn,
            f"adaptive sampling (sampling_ratio <= 0) counts a bin's samples in int32: "
            f"(2 * H + 5) * (2 * W + 5) = {visits} must be at most 2**31 - 1; got H, W = {h}, "
            f"{w} (use a positive sampling_ratio)",
        )
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise args.fail(
            fn, f"rois must have shape (R, 5) [batch_index, x1, y1, x2, y2]; got {rois.shape}"
        )
    if not args.is_real(spatial_scale) or not 0 < spatial_scale < math.inf:
        raise args.fail(fn, f"spatial_scale must be a positive finite number; got {spatial_scale!r}")
    if not args.is_int(sampling_ratio):
        raise args.fail(fn, f"sampling_ratio must be an int; got {sampling_ratio!r}")
    if sampling_ratio > 0 and oh * ow * sampling_ratio**2 > MAX_SAMPLES_PER_ROI:
        largest = math.isqrt(MAX_SAMPLES_PER_ROI // (oh * ow))
        raise args.fail(
            fn,
            f"sampling_ratio must be at most {largest} for a {oh}x{ow} output "
            f"(oh * ow * sampling_ratio**2 <= 2**24 samples per RoI); got {sampling_ratio}",
        )
    if not args.is_real(gamma) or not math.isfinite(gamma):
        raise args.fail(fn, f"gamma must be a finite number; got {gamma!r}")
    num_rois = rois.shape[0]
    if offset is not None and offset.shape != (num_rois, oh, ow, 2):
        raise args.fail(
            fn, f"offset.shape must be (R, oh, ow, 2) = {(num_rois, oh, ow, 2)}; got {offset.shape}"
        )
    if mask is not None and mask.shape != (num_rois, oh, ow, 1):
        raise args.fail(
            fn, f"mask.shape must be (R, oh, ow, 1) = {(num_rois, oh, ow, 1)}; got {mask.shape}"
        )
    return oh, ow


_ML_FN = "multi_level_deform_roi_pool"


def multi_level_deform_roi_pool(
    features: Sequence[jax.Array],
    rois: jax.Array,
    offset: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    output_size: int | tuple[int, int],
    spatial_scales: Sequence[float],
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    finest_scale: float = 56,
) -> jax.Array:
    """Deformable RoI pooling over FPN levels, as mmdet's ``SingleRoIExtractor``.

    RoI ``r`` is pooled only from level
    ``l = clip(floor(log2(sqrt((x2 - x1) * (y2 - y1)) / finest_scale + 1e-6)), 0, L - 1)``
    with ``spatial_scales[l]``, and equals ``deform_roi_pool`` on that level
    (forward and gradients). All levels are read as one stacked image matrix,
    so each RoI is pooled once, not once per level.

    Args:
      features: ``L`` maps ``(N, H_l, W_l, C)``, finest first (P2, P3, ...).
      rois: ``(R, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` in input-image
        coordinates, as ``deform_roi_pool`` (batch index exactly ``-1`` is a
        padding RoI and pools 0).
      offset, mask: optional ``(R, oh, ow, 2)`` and ``(R, oh, ow, 1)``, as
        ``deform_roi_pool``.
      output_size: int or ``(oh, ow)``.
      spatial_scales: the ``L`` levels' scales (e.g. ``(1/4, 1/8, 1/16, 1/32)``).
      sampling_ratio, gamma: as ``deform_roi_pool``; the adaptive grid of a RoI
        is its own level's.
      finest_scale: mmdet's ``finest_scale`` (56).

    Returns:
      ``(R, oh, ow, C)`` in the promoted dtype of ``features``, ``offset`` and ``mask``.

    Example:
      >>> import jax.numpy as jnp
      >>> from deformjax import multi_level_deform_roi_pool
      >>> levels = [jnp.ones((1, 200 // 2**l, 336 // 2**l, 8)) for l in range(4)]
      >>> rois = jnp.array([[0.0, 10.0, 10.0, 60.0, 90.0], [0.0, 0.0, 0.0, 700.0, 500.0]])
      >>> multi_level_deform_roi_pool(levels, rois, output_size=7, sampling_ratio=2,
      ...                             spatial_scales=(1 / 4, 1 / 8, 1 / 16, 1 / 32)).shape
      (2, 7, 7, 8)
    """
    if not isinstance(features, Sequence) or isinstance(features, str) or not features:
        raise args.fail(_ML_FN, "features must be a non-empty sequence of (N, H_l, W_l, C) "
                        f"maps, finest first; got {type(features).__name__}")
    levels = tuple(jnp.asarray(f) for f in features)
    rois = jnp.asarray(rois)
    offset = None if offset is None else jnp.asarray(offset)
    mask = None if mask is None else jnp.asarray(mask)
    scales = tuple(spatial_scales) if isinstance(spatial_scales, Sequence) else None
    if scales is None or len(scales) != len(levels):
        raise args.fail(_ML_FN, f"spatial_scales must give one scale per level: {len(levels)} "
                        f"levels; got {spatial_scales!r}")
    if not args.is_real(finest_scale) or not 0 < finest_scale < math.inf:
        raise args.fail(_ML_FN, f"finest_scale must be a positive finite number; got "
                        f"{finest_scale!r}")
    first = levels[0]
    args.check_rank(_ML_FN, "features[0]", first, 4, "(N, H, W, C)")
    for l, (f, scale) in enumerate(zip(levels, scales)):
        args.check_rank(_ML_FN, f"features[{l}]", f, 4, "(N, H, W, C)")
        if f.shape[0] != first.shape[0] or f.shape[3] != first.shape[3]:
            raise args.fail(_ML_FN, f"every level must have the same N and C; features[0] has "
                            f"shape {first.shape}, features[{l}] {f.shape}")
        oh, ow = _check(f, rois, offset, mask, output_size, scale, sampling_ratio, gamma,
                        fn=_ML_FN)
    n = first.shape[0]
    total = sum(n * f.shape[1] * f.shape[2] for f in levels) + 1
    args.check_rows(_ML_FN, total, f"the levels' N * H_l * W_l summed, + 1 = {total}")
    return _multi_level(levels, rois, offset, mask, output_size=(oh, ow),
                        spatial_scales=tuple(float(s) for s in scales),
                        sampling_ratio=int(sampling_ratio), gamma=float(gamma),
                        finest_scale=float(finest_scale))


@functools.partial(jax.jit, static_argnames=("output_size", "spatial_scales", "sampling_ratio",
                                             "gamma", "finest_scale"))
def _multi_level(levels, rois, offset, mask, *, output_size, spatial_scales, sampling_ratio,
                 gamma, finest_scale):
    return _pool(levels, rois, offset, mask, output_size=output_size,
                 spatial_scales=spatial_scales, sampling_ratio=sampling_ratio, gamma=gamma,
                 position_sensitive=False, finest_scale=finest_scale)


_PS_FN = "deform_ps_roi_pool"


def deform_ps_roi_pool(
    features: jax.Array,
    rois: jax.Array,
    offset: jax.Array | None = None,
    *,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> jax.Array:
    """Deformable position-sensitive RoI pooling (Dai et al. 2017, the R-FCN head).

    Bin ``(i, j)`` of output channel ``c`` averages RoIAlign samples of input
    channel ``(c * oh + i) * ow + j`` (torchvision's order, moved last), over
    the bin moved by its offset. With ``offset=None`` this is
    ``torchvision.ops.ps_roi_align`` with channels last, forward and gradient.

    Args:
      features: ``(N, H, W, C_out * oh * ow)``.
      rois: ``(R, 5)`` rows ``[batch_index, x1, y1, x2, y2]``, as ``deform_roi_pool``
        (aligned corners; batch index exactly ``-1`` is padding and pools 0,
        other out-of-range indices pool NaN; no gradient).
      offset: optional ``(R, oh, ow, 2)`` normalized ``(dy, dx)``: bin ``(i, j)``
        moves by ``gamma * roi_height * dy`` rows and ``gamma * roi_width * dx``
        columns.
      output_size: int or ``(oh, ow)``.
      spatial_scale, sampling_ratio, gamma: as ``deform_roi_pool`` (adaptive
        sampling for ``sampling_ratio <= 0``).

    Returns:
      ``(R, oh, ow, C_out)`` in the promoted dtype of ``features`` and ``offset``.

    Example:
      >>> import jax.numpy as jnp
      >>> from deformjax import deform_ps_roi_pool
      >>> features = jnp.ones((1, 16, 16, 4 * 3 * 3))
      >>> rois = jnp.array([[0.0, 2.0, 2.0, 10.0, 12.0]])
      >>> deform_ps_roi_pool(features, rois, output_size=3, sampling_ratio=2).shape
      (1, 3, 3, 4)
    """
    features, rois = jnp.asarray(features), jnp.asarray(rois)
    offset = None if offset is None else jnp.asarray(offset)
    oh, ow = _check(features, rois, offset, None, output_size, spatial_scale, sampling_ratio,
                    gamma, fn=_PS_FN, position_sensitive=True)
    return _deform_roi_pool(
        features, rois, offset, None, output_size=(oh, ow), spatial_scale=float(spatial_scale),
        sampling_ratio=int(sampling_ratio), gamma=float(gamma), position_sensitive=True,
    )
