"""Deformable RoI pooling (Dai et al. 2017, section 2.2), with mmcv's semantics."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from deformjax._src import args, sampling

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
        per RoI, as torchvision / mmcv / detectron2 do. Under ``jit`` the
        number of samples cannot depend on data, so the adaptive grid is
        evaluated on a static ``ceil(H / oh) x ceil(W / ow)`` grid with the
        surplus samples weighted 0: exact for every RoI no larger than the
        feature map. A RoI taller (wider) than the map gets ``ceil(H / oh)``
        (``ceil(W / ow)``) samples per bin and axis instead, still spread
        evenly over the bin, so its average approximates the same integral
        with fewer samples. That static grid is also the cost: prefer a
        positive ``sampling_ratio`` for speed.
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
    oh, ow = output_size
    n, h, w, channels = features.shape
    num_rois = rois.shape[0]
    dtype, acc = args.compute_dtypes(features, offset, mask)

    rois = lax.stop_gradient(rois).astype(acc)
    # A RoI with a non-finite coordinate pools NaN; it is computed as an empty
    # RoI at the origin, so that nothing else (no gradient either) sees a NaN.
    finite = jnp.all(jnp.isfinite(rois[:, 1:]), axis=1)
    x1, y1, x2, y2 = jnp.where(finite[:, None], rois[:, 1:], 0).T
    start_w = x1 * spatial_scale - 0.5
    start_h = y1 * spatial_scale - 0.5
    roi_w = (x2 * spatial_scale - 0.5) - start_w
    roi_h = (y2 * spatial_scale - 0.5) - start_h
    bin_h, bin_w = roi_h / oh, roi_w / ow

    if sampling_ratio > 0:
        grid_h = grid_w = sampling_ratio
        count_h = count_w = jnp.full((num_rois,), sampling_ratio, acc)
    else:
        grid_h, grid_w = max(1, math.ceil(h / oh)), max(1, math.ceil(w / ow))
        count_h = jnp.clip(jnp.ceil(bin_h), 0, grid_h)
        count_w = jnp.clip(jnp.ceil(bin_w), 0, grid_w)

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

    # Sample offsets within a bin, in torchvision's evaluation order.
    index_h = jnp.arange(grid_h, dtype=acc)
    index_w = jnp.arange(grid_w, dtype=acc)
    dy = (index_h + 0.5) * bin_h[:, None] / jnp.maximum(count_h, 1)[:, None]  # (R, grid_h)
    dx = (index_w + 0.5) * bin_w[:, None] / jnp.maximum(count_w, 1)[:, None]  # (R, grid_w)

    # Averaging weight per sample: 1 / count for the first count_h x count_w
    # samples of each bin, 0 for the surplus of the static adaptive grid (a
    # zero weight reads nothing).
    used_h = (index_h < count_h[:, None]).astype(acc)  # (R, grid_h)
    used_w = (index_w < count_w[:, None]).astype(acc)  # (R, grid_w)
    total = jnp.maximum(count_h * count_w, 1)

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
        groups, channels = oh * ow, channels // (oh * ow)
        pixels = features.astype(dtype).reshape(n, h, w, channels, groups).swapaxes(3, 4)
        group = (jnp.arange(oh)[:, None] * ow + jnp.arange(ow))[None, :, :, None, None]
    else:
        groups, group, pixels = 1, 0, features.astype(dtype)
    image = sampling.with_zero_row(pixels.reshape(n * h * w * groups, channels))

    def rows_of_grid(dy, used_h):
        """The weighted samples of some rows of every bin's grid, summed: (R, oh, ow, C).

        ``dy``, ``used_h``: ``(R, k)`` for ``k`` rows of the grid.
        """
        ys = y0[..., None, None] + dy[:, None, None, :, None]  # (R, oh, ow, k, 1)
        xs = x0[..., None, None] + dx[:, None, None, None, :]  # (R, oh, ow, 1, grid_w)
        weight = (used_h[:, :, None] * used_w[:, None, :]) / total[:, None, None]
        index, weights = sampling.locate(
            ys, xs, batch[..., None, None], size=(h, w), mode="clamp",
            zero_row=n * h * w * groups, scale=weight[:, None, None],
            reads=reads[..., None, None], groups=groups, group=group,
        )
        guard = sampling.bounds_guard(index)
        return sampling.gather(image, index, weights, guard=guard).sum(axis=(3, 4))

    # All grid points at once while their samples are small; else one grid row
    # at a time, so that temporaries stay bounded whatever the sampling ratio.
    sample_bytes = num_rois * oh * ow * grid_h * grid_w * channels * 4 * jnp.dtype(acc).itemsize
    if isinstance(sample_bytes, int) and sample_bytes <= _VECTORIZED_BYTES:
        out = rows_of_grid(dy, used_h)
    else:
        @jax.checkpoint  # the backward pass recomputes each row instead of stacking them
        def step(out, row):
            dy_row, used_row = row
            return out + rows_of_grid(dy_row[:, None], used_row[:, None]), None

        zeros = jnp.zeros((num_rois, oh, ow, channels), acc)
        out, _ = lax.scan(step, zeros, (dy.T, used_h.T))
    if mask is not None:
        out = out * mask.astype(acc)
    out = jnp.where((batch_ok & finite)[:, None, None, None], out, jnp.nan)
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
