"""The bilinear sampler behind every deformable op.

Two boundary rules, one gather:

* ``"zeros"`` (``deform_conv``, torchvision's ``bilinear_interpolate``): each of
  the four corners that falls outside the image contributes 0, so a sample with
  ``y <= -1``, ``y >= H``, ``x <= -1`` or ``x >= W`` is 0.
* ``"clamp"`` (RoIAlign, ``deform_roi_pool``): a sample with ``y < -1``,
  ``y > H``, ``x < -1`` or ``x > W`` is 0; otherwise coordinates below 0 clamp
  to 0 and coordinates at or past the last row / column clamp onto it.

The image is viewed as a ``(rows, channels)`` matrix with one extra all-zero
row appended (:func:`with_zero_row`). Sampling is split in two steps so that
the expensive one stays simple:

1. :func:`locate` turns coordinates into, per sample, the rows of its four
   corners and their bilinear weights. A corner outside the image, and every
   corner of a sample that must read nothing (a NaN coordinate, a padding RoI),
   indexes the zero row, so no index can leave the image and nothing outside a
   sample's own footprint is ever read or receives a gradient. A NaN
   coordinate gives NaN weights (its sample, and only it, is NaN) through a
   ``where`` whose other branch keeps every derivative finite. It works on
   small per-sample arrays without channels, in float32 at least: in bfloat16
   a coordinate near 300 has a step of 2 pixels.
2. :func:`gather` fetches the four corners' whole channel rows and sums them
   with the weights. A corner whose weight is 0 (or not finite) reads the zero
   row instead of its pixel, so an infinite pixel changes only the samples that
   give it a nonzero weight (``0 * inf`` never happens) and a NaN weight sends
   no gradient into the image. Its derivative with respect to the weights
   still reads the real pixel: at an integer coordinate the weight of the far
   corner is 0 but its derivative is not. (Values only, on an image without
   the zero row: :func:`gather_leading`, the CPU forward of ``deform_conv``,
   sends such corners to row 0 with their weight times 0, so that no copy of
   the image with a zero row is made.)

Gradients are those of the plain formula ``sum_q w_q * image[row_q]``. The rows
are piecewise constant, so the derivative with respect to a coordinate is that
of the bilinear patch the coordinate lies in, which at integer coordinates is
torchvision's (the patch below / to the right, with the corners outside the
image counting 0, as in its ``get_coordinate_weight``).
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

Mode = Literal["zeros", "clamp"]

# Zeros rule: coordinates are clipped into [_LOW, size] first. Beyond that range
# both corners along the axis are outside the image, so value and gradient are
# already 0 there (as in torchvision), infinite or huge finite coordinates
# cannot overflow an integer, and the clip's own kink never lands on -1, the
# border row a fresh layer samples.
_LOW = -2

# Corners (r, c), (r, c + 1), (r + 1, c), (r + 1, c + 1): whether each takes the high row / column.
_CORNER_HIGH_Y = np.array([False, False, True, True])
_CORNER_HIGH_X = np.array([False, True, False, True])


def with_zero_row(image: jax.Array) -> jax.Array:
    """``(rows, C)`` -> ``(rows + 1, C)``: the image matrix with its zero row appended."""
    return jnp.concatenate([image, jnp.zeros((1,) + image.shape[1:], image.dtype)], axis=0)


def _axis(coord: jax.Array, size, mode: Mode):
    """One axis: (low row, step to the high row, fraction, low corner inside, high corner inside).

    The low row is an int32 in ``[-2, size]`` (zeros rule) or ``[0, size - 1]``
    (clamp rule); the high row is ``low + step``, with ``step`` 1, or 0 where the
    clamp rule holds a sample on the last row. A corner marked outside is never
    read (its index becomes the zero row), so only inside corners need exact rows.
    """
    if mode == "zeros":
        c = jnp.clip(coord, _LOW, size)
        low = jnp.floor(c)
        inside_low = (low >= 0) & (low <= size - 1)
        inside_high = (low >= -1) & (low <= size - 2)
        step = 1
    else:
        alive = (coord >= -1) & (coord <= size)
        c = jnp.where(coord <= 0, 0, coord)
        c = jnp.where(c >= size - 1, size - 1, c)
        low = jnp.floor(c)
        inside_low = inside_high = alive
        step = (low < size - 1).astype(jnp.int32)
    return low.astype(jnp.int32), step, c - low, inside_low, inside_high


def _per_corner(a):
    return jnp.asarray(a)[..., None]


def _corners(low, high, along):
    """``S + (4,)``: per corner, ``high`` where ``along`` (the corners' pattern) holds, else ``low``.
    """
    return jnp.where(along, _per_corner(high), _per_corner(low))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _weights(leading, fy, fx, scale, iy_low, iy_high, ix_low, ix_high, nan):
    """The bilinear weights of points with fractions ``fy``, ``fx``.

    ``S + (4,)``, or ``(4,) + S`` when ``leading``. A corner outside the image
    (``iy_*``, ``ix_*``: the low / high row and column inside) weighs 0;
    ``scale`` (or None) multiplies every weight; a NaN point (``nan``) gets
    NaN weights.

    Its derivative is that of the formula, written corner by corner and
    stacked: reverse mode then transposes the stack into four slices of the
    cotangent, where the formula's broadcast over the corner axis would be
    transposed into sums over it (reductions that XLA's CPU code runs as
    separate, slow calls, with their inputs written out first).
    """
    if leading:
        pick, per_point = functools.partial(_leading, ndim=jnp.ndim(fy)), lambda a: a
    else:
        pick, per_point = _corners, _per_corner
    inside = pick(iy_low, iy_high, _CORNER_HIGH_Y) & pick(ix_low, ix_high, _CORNER_HIGH_X)
    weights = pick(1 - fy, fy, _CORNER_HIGH_Y) * pick(1 - fx, fx, _CORNER_HIGH_X)
    weights = jnp.where(inside, weights, 0)
    if scale is not None:
        weights = weights * per_point(scale)
    return jnp.where(per_point(nan), jnp.nan, weights)


@_weights.defjvp
def _weights_jvp(leading, primals, tangents):
    fy, fx, scale, iy_low, iy_high, ix_low, ix_high, nan = primals
    d_fy, d_fx, d_scale = tangents[:3]
    terms = _corner_terms(fy, fx, scale, iy_low, iy_high, ix_low, ix_high, nan, d_fy, d_fx,
                          d_scale)
    return _weights(leading, *primals), jnp.stack(terms, axis=0 if leading else -1)


_corner_weights = functools.partial(_weights, False)  # corner axis last
_leading_weights = functools.partial(_weights, True)  # corner axis first


def _corner_terms(fy, fx, scale, iy_low, iy_high, ix_low, ix_high, nan, d_fy, d_fx, d_scale):
    """The weights' tangent for fraction tangents ``d_fy``, ``d_fx``: a list, one per corner."""
    terms = []
    for high_y, high_x in zip(_CORNER_HIGH_Y, _CORNER_HIGH_X):
        py, d_py = (fy, d_fy) if high_y else (1 - fy, -d_fy)
        px, d_px = (fx, d_fx) if high_x else (1 - fx, -d_fx)
        inside = (iy_high if high_y else iy_low) & (ix_high if high_x else ix_low)
        term = jnp.where(inside, d_py * px + py * d_px, 0)
        if scale is not None:
            term = term * scale + jnp.where(inside, py * px, 0) * d_scale
        terms.append(jnp.where(nan, 0, term))
    return terms


class Points(NamedTuple):
    """What :func:`corners` needs of each point (shape ``S``, or broadcastable to it)."""

    fy: jax.Array  # the fractions of y and x past the low row and column
    fx: jax.Array
    d_fy: jax.Array | None  # d fy / d y and d fx / d x (1 or 0, or between at a clip's kink)
    d_fx: jax.Array | None
    low: jax.Array  # int32, the low corner's row of the image matrix (exact where inside)
    y_rows: jax.Array | int  # rows from the low corner to the one below it (and to its right)
    x_rows: jax.Array | int
    iy_low: jax.Array  # bool, whether the low / high row and column are inside the image
    iy_high: jax.Array
    ix_low: jax.Array
    ix_high: jax.Array
    nan: jax.Array  # bool, a NaN coordinate


def points(
    y: jax.Array,
    x: jax.Array,
    batch: jax.Array,
    *,
    size: tuple[int, int],
    mode: Mode,
    groups: int = 1,
    group: jax.Array | int = 0,
    first_row: jax.Array | int = 0,
    derivatives: bool = False,
) -> Points:
    """The per-point half of :func:`locate` (arguments as there).

    Differentiable in ``fy`` and ``fx``. With ``derivatives``, ``d_fy`` and
    ``d_fx`` are their derivatives, for a caller that forms the weights'
    tangent itself (:func:`weights_jvp`); else they are None.
    """
    # Per-point sizes (arrays) take part in float and in integer arithmetic alike.
    height_f, width_f = (v if isinstance(v, int) else jnp.asarray(v, y.dtype) for v in size)
    height, width = (v if isinstance(v, int) else jnp.asarray(v, jnp.int32) for v in size)
    nan = jnp.isnan(y) | jnp.isnan(x)

    def axis(coord, size):
        # NaN coordinates are replaced before any arithmetic, so that the
        # derivatives of the replaced branch are 0, never NaN * 0.
        return _axis(jnp.where(nan, _LOW, coord), size, mode)

    def with_derivative(coord, size):
        fn = functools.partial(axis, size=size)
        if not derivatives:
            return fn(coord), None
        out, (_, _, d_frac, _, _) = jax.jvp(fn, (coord,), (jnp.ones_like(coord),))
        return out, d_frac

    (y_low, y_step, fy, iy_low, iy_high), d_fy = with_derivative(y, height_f)
    (x_low, x_step, fx, ix_low, ix_high), d_fx = with_derivative(x, width_f)
    base = jnp.asarray(batch, jnp.int32) * height
    group = jnp.asarray(group, jnp.int32)
    low = ((base + y_low) * width + x_low) * groups + group + first_row
    return Points(fy, fx, d_fy, d_fx, low, y_step * width * groups, x_step * groups,
                  iy_low, iy_high, ix_low, ix_high, nan)


def corners(
    pts: Points,
    *,
    zero_row: int,
    scale: jax.Array | None = None,
    reads: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The per-corner half of :func:`locate` (arguments as there): ``(index, weights)``."""
    # The corner axis comes from broadcasting against the corners' constant
    # pattern, and every corner's row is the low corner's plus a step: XLA's
    # CPU code for stacking four arrays picks the operand per element and
    # repeats all of each one's arithmetic, 2-4x slower (measured).
    high_y, high_x = _CORNER_HIGH_Y, _CORNER_HIGH_X
    inside = _corners(pts.iy_low, pts.iy_high, high_y) & _corners(pts.ix_low, pts.ix_high, high_x)
    weights = _corner_weights(pts.fy, pts.fx, scale, pts.iy_low, pts.iy_high, pts.ix_low,
                              pts.ix_high, pts.nan)
    index = _per_corner(pts.low) + _corners(0, pts.y_rows, high_y) + _corners(
        0, pts.x_rows, high_x)
    reads_pixel = inside & ~_per_corner(pts.nan)
    if reads is not None:
        reads_pixel = reads_pixel & _per_corner(reads)
    index = jnp.where(reads_pixel, index, zero_row)
    return jnp.broadcast_to(index, weights.shape), weights


def corners_leading(
    pts: Points, *, zero_row: int, scale: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """:func:`corners` with the corner axis first: ``(index, weights)``, ``(4,) + S`` each.

    The same rows and weights, differentiable alike: the weights' derivative
    is the formula's, written corner by corner and stacked on the leading
    axis (as :func:`weights_tangent_leading`), so that reverse mode takes four
    contiguous slices of the cotangent instead of summing a corner axis.

    Why the corner axis first: XLA's CPU code loops over an output's innermost
    axis innermost, and LLVM vectorizes that loop only when it is long. With
    the corners last (:func:`corners`) it has 4 steps and the whole per-point
    arithmetic runs scalar; with them first, over points ``S`` that are flat
    and written out beforehand (e.g. computed by :func:`fenced`), it runs on
    vectors: the index and weights of EDVR's forward took 21 -> 6 ms (2-core
    EPYC; the LLVM IR that ``XLA_FLAGS=--xla_dump_to`` writes shows the
    vector instructions).
    """
    lead = functools.partial(_leading, ndim=jnp.ndim(pts.fy))
    inside = lead(pts.iy_low, pts.iy_high, _CORNER_HIGH_Y) & lead(pts.ix_low, pts.ix_high,
                                                                  _CORNER_HIGH_X)
    weights = _leading_weights(pts.fy, pts.fx, scale, pts.iy_low, pts.iy_high, pts.ix_low,
                               pts.ix_high, pts.nan)
    index = pts.low + lead(0, pts.y_rows, _CORNER_HIGH_Y) + lead(0, pts.x_rows, _CORNER_HIGH_X)
    return jnp.where(inside & ~pts.nan, index, zero_row), weights


def read_weights_leading(pts: Points, scale: jax.Array | None = None) -> jax.Array:
    """:func:`corners_leading`'s weights ``(4,) + S`` as :func:`gather_leading` takes them.

    A corner that reads nothing (weight 0 or not finite: outside the image, a
    NaN point, a zero or infinite scale) has its weight times 0 (0, or NaN), as
    :func:`gather` counts it. Values only (no derivative for the choice).
    """
    weights = _leading_weights(pts.fy, pts.fx, scale, pts.iy_low, pts.iy_high, pts.ix_low,
                               pts.ix_high, pts.nan)
    return jnp.where(_reads(weights), weights, weights * 0)


def read_index_leading(low: jax.Array, weights: jax.Array, *, y_rows, x_rows) -> jax.Array:
    """The rows ``(4,) + S`` of the corners of :func:`read_weights_leading`'s ``weights``.

    Row 0 for a corner that reads nothing (its weight is 0 or not finite),
    else the corner's row of the image without its zero row: ``low`` (a
    :class:`Points`' low corner row, ``S``) plus ``y_rows`` and ``x_rows``
    (its steps to the row below and the column right). From the weights and
    the low rows written out beforehand, so that the index's loop does not
    repeat their arithmetic (EDVR's forward -7%, then -4%, docs/performance.md).
    """
    lead = functools.partial(_leading, ndim=jnp.ndim(low))
    index = low + lead(0, y_rows, _CORNER_HIGH_Y) + lead(0, x_rows, _CORNER_HIGH_X)
    return jnp.where(_reads(weights), index, 0)


def _leading(low, high, along, ndim):
    """``(4,) + S``: per corner, ``high`` where ``along`` (the corners' pattern) holds.

    Else ``low``; ``ndim`` is the number of axes of ``S``.
    """
    return jnp.where(along.reshape((4,) + (1,) * ndim), high, low)


def weights_tangent_leading(pts: Points, scale, d_y, d_x, d_scale) -> jax.Array:
    """The tangent ``(4,) + S`` of :func:`corners_leading`'s weights.

    Arguments as in :func:`weights_jvp`.

    Written corner by corner and stacked on the leading axis, so that its
    transpose takes four contiguous slices of the cotangent, never a sum
    over a corner axis. ``pts`` must carry derivatives (``points(...,
    derivatives=True)``).
    """
    return jnp.stack(_corner_terms(pts.fy, pts.fx, scale, pts.iy_low, pts.iy_high, pts.ix_low,
                                   pts.ix_high, pts.nan, pts.d_fy * d_y, pts.d_fx * d_x, d_scale))


def weights_jvp(pts: Points, scale, d_y, d_x, d_scale):
    """``(weights, tangent)``: :func:`corners`'s weights and their tangent.

    For tangents ``d_y``, ``d_x`` of the coordinates and ``d_scale`` of the scale.

    ``d_scale`` is ignored (may be None) when ``scale`` is None.
    """
    def weights(fy, fx, scale):
        return _corner_weights(fy, fx, scale, pts.iy_low, pts.iy_high, pts.ix_low, pts.ix_high,
                               pts.nan)

    tangents = (pts.d_fy * d_y, pts.d_fx * d_x, d_scale)
    primals = (pts.fy, pts.fx, scale)
    tangents = tuple(t if t is None else t.astype(p.dtype) for p, t in zip(primals, tangents))
    if scale is None:
        return jax.jvp(lambda fy, fx: weights(fy, fx, None), primals[:2], tangents[:2])
    return jax.jvp(weights, primals, tangents)


def locate(
    y: jax.Array,
    x: jax.Array,
    batch: jax.Array,
    *,
    size: tuple[int, int],
    mode: Mode,
    zero_row: int,
    scale: jax.Array | None = None,
    groups: int = 1,
    group: jax.Array | int = 0,
    reads: jax.Array | None = None,
    first_row: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array]:
    """The four corner rows of each sample and their bilinear weights.

    Rows index the image viewed as ``(B * H * W * groups + 1, C / groups)``,
    i.e. ``with_zero_row(image.reshape(-1, C // groups))`` for an image
    ``(B, H, W, C)`` whose channels are split into ``groups`` contiguous
    blocks; row ``zero_row = B * H * W * groups`` is the zero row.

    Args:
      y, x: row and column coordinates, shape ``S``, in float32 or wider.
      batch: integer image index of each point, broadcastable to ``S``; it need
        only be in ``[0, B)`` where ``reads`` holds.
      size: ``(H, W)`` of the image.
      mode: the boundary rule, ``"zeros"`` or ``"clamp"``.
      zero_row: the index of the zero row.
      scale: optional factor per point, broadcastable to ``S`` (a modulation
        mask, an averaging weight), folded into the weights.
      groups, group: the channel block of each point, broadcastable to ``S``.
      reads: optional boolean per point, broadcastable to ``S``; where false
        the point reads only the zero row (its sample is 0, or NaN when its
        weights are).
      first_row: optional row of the image's first pixel, per point
        (broadcastable to ``S``), for several images stacked in one matrix
        (FPN levels); ``size`` may then be per point too.

    Returns:
      ``(index, weights)``: int32 and float ``S + (4,)``, the corners ordered
      ``(r, c), (r, c + 1), (r + 1, c), (r + 1, c + 1)``.
    """
    pts = points(y, x, batch, size=size, mode=mode, groups=groups, group=group,
                 first_row=first_row)
    return corners(pts, zero_row=zero_row, scale=scale, reads=reads)


def fenced(fn, *operands):
    """``fn(*operands)``, computed apart from its surroundings and written out.

    A conditional whose two branches are both ``fn``: XLA cannot fuse its
    results' arithmetic into the fusions that read them. Left to itself it
    repeats a cheap producer inside every consumer, and per-point arithmetic
    read by many per-corner and per-channel consumers then costs several times
    over. The predicate is a comparison of the first floating-point
    operand's first entry with itself: XLA cannot decide it while compiling
    (a NaN compares unequal; either branch gives the same results), where it
    folds one of integers and then drops the conditional.
    """
    key = next(a for a in operands if jnp.issubdtype(a.dtype, jnp.floating))
    return lax.cond(_fence_predicate(lax.stop_gradient(key)), fn, fn, *operands)


@jax.custom_batching.custom_vmap
def _fence_predicate(x: jax.Array) -> jax.Array:
    return _first_equal(x)


def _first_equal(x):
    if x.size == 0:
        return jnp.asarray(True)
    first = x.reshape(-1)[0]
    return first == first


@_fence_predicate.def_vmap
def _fence_predicate_vmap(axis_size, in_batched, x):
    del axis_size
    return _first_equal(x[0] if in_batched[0] else x), False


@jax.custom_batching.custom_vmap
def bounds_guard(index: jax.Array) -> jax.Array:
    """The predicate of :func:`gather`'s guard: is ``index``'s first entry >= 0? Always true.

    No index from :func:`locate` is negative, so the predicate always holds
    (the other branch, which would clamp every index at 0, is never taken);
    any scalar computed from the data would do, and the first entry costs
    nothing, where a reduction over every index made XLA recompute all of them
    for it (11 of 47 ms in a deform_conv forward, measured).

    A ``custom_vmap``, so that under ``vmap`` it stays one scalar and the
    guard's conditional stays a conditional, instead of a select that runs
    both branches. Compute it from an ``index`` that depends on primal values
    only (``sampled_matmul`` does so inside the ``jax.checkpoint`` of its
    derivative chunks, from the chunk's primal offsets); under ``vmap`` of a
    gradient it stays a conditional there too (tested).
    """
    return _first_nonnegative(index)


def _first_nonnegative(index: jax.Array) -> jax.Array:
    if index.size == 0:  # an empty batch: nothing to read either way
        return jnp.asarray(True)
    return index.reshape(-1)[0] >= 0


@bounds_guard.def_vmap
def _bounds_guard_vmap(axis_size, in_batched, index):
    del axis_size
    if in_batched[0]:  # the first entry of the first batch member
        index = index[0]
    return _first_nonnegative(index), False


def _reads(weights: jax.Array) -> jax.Array:
    """The corners whose pixel is read: weight nonzero and finite."""
    return (jnp.abs(weights) > 0) & (jnp.abs(weights) < jnp.inf)


reads = _reads


def _weighted_rows(image, index, weights, form):
    """``sum_q weights[..., q] * image[index[..., q]]``, one whole channel row per corner.

    ``form`` is one of:

    * ``"skip"``: a corner whose weight is 0 or not finite adds ``weight * 0``
      instead of ``weight * pixel`` (0, or NaN for a NaN weight);
    * ``"corners"``: the real rows (the weights are a tangent,
      :func:`weighted_rows`), gathered and weighted corner by corner;
    * ``"stacked"``: the same, on a CPU as one gather of all four corners and a
      product batched over the samples (:func:`_stacked_rows`).

    Reverse mode transposes a tangent's form into the weights' cotangent: per
    corner, the sum over the channels of the rows times the output's
    cotangent. Corner by corner that is a reduction per corner, which XLA's
    CPU code runs as a YNNPACK call each; stacked, one batched matrix product:
    forward+backward of deform_conv's derivative chunks at CenterNet's shape
    253 -> 212 ms, the small shape 2.2 -> 1.7 ms, the depthwise shape -8%, of
    dcnv3's chunks at stage 1 -11%, none slower (2-core EPYC, benchmarks/
    bench.py and bench_dcnv3.py shapes). The stacked rows are written out, so
    they are for the rows of one chunk: deform_roi_pool's static grid (256
    channels, not chunked) took 210 -> 230 ms and 400 -> 449 MiB with them.
    Other platforms keep the per-corner form, the one measured on GPUs
    (``lax.platform_dependent``).
    """
    if form == "stacked":
        return lax.platform_dependent(image, index, weights, cpu=_stacked_rows,
                                      default=_rows_by_corner)
    return _rows_by_corner(image, index, weights, skip_zero_weights=form == "skip")


def _rows_by_corner(image, index, weights, *, skip_zero_weights=False, corner_axis=-1):
    """:func:`_weighted_rows`, corner by corner (the corner axis of ``index`` and ``weights``)."""
    out = None
    for corner in range(4):
        rows = image.at[lax.index_in_dim(index, corner, corner_axis, keepdims=False)].get(
            mode="promise_in_bounds", wrap_negative_indices=False).astype(weights.dtype)
        weight = lax.index_in_dim(weights, corner, corner_axis, keepdims=False)[..., None]
        if skip_zero_weights:
            rows = jnp.where(_reads(weight), rows, 0)
        term = weight * rows
        out = term if out is None else out + term
    return out


def _stacked_rows(image, index, weights, *, skip_zero_weights=False):
    """:func:`_weighted_rows` as one gather of every corner and a product batched over ``S``.

    ``index`` and ``weights``: ``S + (Q,)`` for any number ``Q`` of corners.
    """
    rows = image.at[index].get(mode="promise_in_bounds").astype(weights.dtype)  # S + (Q, C)
    if skip_zero_weights:
        rows = jnp.where(_reads(weights)[..., None], rows, 0)
    return jnp.einsum("...q,...qc->...c", weights, rows, precision=lax.Precision.HIGHEST,
                      preferred_element_type=weights.dtype)


def linear_rows(
    image: jax.Array, index: jax.Array, weights: jax.Array, reads: jax.Array | None = None
) -> jax.Array:
    """:func:`weighted_rows` for an ``image`` that is a tangent, with a cheap transpose.

    The same values, as one gather of all four corners: its transpose, the
    scatter into the image's cotangent, is then one scatter-add of all corners
    into one buffer. Four corner gathers transpose into four scatters, each
    into its own zero-filled image-sized buffer that XLA adds up afterwards
    (four image-sized temporaries and their sums, per chunk of a loop). To
    read nothing where a weight is 0 or not finite (as :func:`gather` does),
    pass ``reads`` (:func:`reads` of the weights): those corners' rows count
    as 0, so that the transpose sends them 0, never ``NaN * cotangent``. (The
    rows are masked, not their index: the scatter then shares its index with
    the other uses of ``index`` instead of computing its own.)
    """
    rows = image.at[index].get(mode="promise_in_bounds").astype(weights.dtype)  # S + (4, C)
    if reads is not None:
        rows = jnp.where(reads[..., None], rows, 0)
    return (weights[..., None] * rows).sum(axis=-2)


def _guarded_rows(image, index, weights, guard, form):
    """``_weighted_rows`` behind a bounds guard that XLA cannot fuse across.

    Fused with its surroundings on a CPU, the gather repeats the per-sample
    arithmetic of ``locate`` for every channel, and a reshape of its output to
    im2col rows makes XLA loop over ``K * C`` columns instead of contiguous
    channel rows; either costs 3-5x (XLA also drops
    ``lax.optimization_barrier`` before fusing). The branches of a conditional
    are compiled apart from it, so the gather sees materialized index and
    weights. The predicate always holds (``locate`` never yields a negative
    row; the other branch would clamp), see :func:`bounds_guard`.
    """
    return _guarded(functools.partial(_weighted_rows, form=form), image, index, weights, guard)


def _guarded(rows, image, index, weights, guard, safe=None):
    """``rows(image, index, weights)`` as the branch of :func:`_guarded_rows`' conditional.

    The other branch is ``safe`` (default ``rows``) on the index clamped at 0.
    """
    safe = rows if safe is None else safe
    return lax.cond(
        guard,
        rows,
        lambda image, index, weights: safe(image, jnp.maximum(index, 0), weights),
        image,
        index,
        weights,
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _gather(image, index, weights, guard, form):
    if guard is None:
        return _weighted_rows(image, index, weights, form)
    return _guarded_rows(image, index, weights, guard, form)


def _gather_jvp(form, primals, tangents):
    image, index, weights, guard = primals
    d_image, _, d_weights, _ = tangents
    out = _gather(image, index, weights, guard, form)
    t_out = _gather_tangent(form == "skip", form == "stacked", image, index, weights, d_image,
                            d_weights)
    return out, jnp.zeros_like(out) if t_out is None else t_out


def _gather_tangent(skip_zero_weights, stacked, image, index, weights, d_image, d_weights):
    """The tangent of ``_gather`` (None when both tangents are symbolic zeros).

    ``stacked``: the weights' tangent in :func:`_weighted_rows`' stacked form.
    """
    t_out = None
    if not isinstance(d_image, SymbolicZero):
        # A corner that reads nothing sends nothing back, so that a NaN weight
        # cannot reach the image's cotangent. d_image in the weights' dtype
        # (float32 at least), so that the transpose, a scatter-add into the
        # image's cotangent, accumulates in float32.
        t_out = linear_rows(d_image.astype(weights.dtype), index, weights,
                            _reads(weights) if skip_zero_weights else None)
    if not isinstance(d_weights, SymbolicZero):
        # The real corner rows: at an integer coordinate the far corner has
        # weight 0 but not derivative 0. (A choice of rows that depended on
        # d_weights would not be linear in it.)
        t = _gather(image, index, d_weights, None, "stacked" if stacked else "corners")
        t_out = t if t_out is None else t_out + t
    return t_out


_gather.defjvp(_gather_jvp, symbolic_zeros=True)


def gather(
    image: jax.Array, index: jax.Array, weights: jax.Array, *, guard: jax.Array | None = None
) -> jax.Array:
    """Bilinear samples: ``sum_q weights[..., q] * image[index[..., q]]``.

    A corner whose weight is 0 or not finite reads the zero row (the last row
    of ``image``) instead; derivatives are those of the formula above.

    Args:
      image: ``(rows + 1, C)``, e.g. ``with_zero_row(x.reshape(-1, C // groups))``.
      index, weights: from :func:`locate`, shape ``S + (4,)``.
      guard: optional :func:`bounds_guard` of ``index`` (or of an array it was
        cut from): compile the gather apart from its surroundings (see
        ``_guarded_rows``), for callers whose output feeds a reshape or a
        matrix product.

    Returns:
      ``S + (C,)`` in the dtype of ``weights``: one gather of whole,
      contiguous channel rows per corner.
    """
    return _gather(image, index, weights, guard, "skip")


@jax.custom_jvp
def _point_sums(image, index, weights):
    return lax.platform_dependent(image, index, weights, cpu=_point_sums_dot,
                                  default=_point_sums_by_point)


def _point_sums_by_point(image, index, weights):
    return _weighted_rows(image, index, weights, "skip").sum(axis=-2)


def _point_sums_dot(image, index, weights):
    corners = index.shape[:-2] + (-1,)  # every corner of every point
    return _stacked_rows(image, index.reshape(corners), weights.reshape(corners),
                         skip_zero_weights=True)


def _point_sums_jvp(primals, tangents):
    image, index, weights = primals
    d_image, _, d_weights = tangents
    out = _point_sums(image, index, weights)
    t_out = _gather_tangent(True, True, image, index, weights, d_image, d_weights)
    return out, jnp.zeros_like(out) if t_out is None else t_out.sum(axis=-2)


_point_sums.defjvp(_point_sums_jvp, symbolic_zeros=True)


def point_sums(image: jax.Array, index: jax.Array, weights: jax.Array) -> jax.Array:
    """:func:`gather` summed over the points: ``sum_p sum_q weights[..., p, q] * image[index[..., p, q]]``.

    Values and derivatives are those of ``gather(image, index, weights).sum(axis=-2)``.
    On a CPU it is one gather of every corner of every point and a product
    batched over ``S``; gathered corner by corner, the sum over the points is
    a reduction that XLA's CPU code runs as a YNNPACK call (DCNv3's forward at
    InternImage-T's stages 70 -> 57, 25 -> 18, 14 -> 11 and 8.7 -> 6.3 ms with
    the product, benchmarks/bench_dcnv3.py shapes, 2-core EPYC). The rows of
    every corner are written out, so it is for the index of one chunk. Other
    platforms gather, then sum (``lax.platform_dependent``).

    Args:
      image: as in :func:`gather`.
      index, weights: ``S + (P, 4)``, from :func:`locate` for ``S + (P,)`` points.

    Returns:
      ``S + (C,)`` in the dtype of ``weights``.
    """
    return _point_sums(image, index, weights)


def weighted_rows(
    image: jax.Array,
    index: jax.Array,
    weights: jax.Array,
    *,
    guard: jax.Array | None = None,
    stacked: bool = False,
) -> jax.Array:
    """``sum_q weights[..., q] * image[index[..., q]]`` with the real corner rows.

    The form of :func:`gather` for weights that are a derivative (a tangent
    must be linear in them, so no row may be chosen by their values): at an
    integer coordinate the far corner has weight 0 but not derivative 0, and
    its pixel is read. Arguments as in :func:`gather`; ``stacked`` gathers all
    four corners at once and, on a CPU, contracts them with a product batched
    over the samples, which reverse mode runs faster there: for the index of
    one chunk, whose rows stay in cache (see ``_weighted_rows``).
    """
    return _gather(image, index, weights, guard, "stacked" if stacked else "corners")


def gather_leading(image: jax.Array, index: jax.Array, weights: jax.Array, *,
                   guard: jax.Array) -> jax.Array:
    """:func:`gather`'s values for :func:`read_index_leading`'s ``(4,) + S`` index and weights.

    ``S + (C,)``: ``sum_q weights[q] * image[index[q]]``, behind the bounds
    guard (see ``_guarded_rows``; ``guard`` is :func:`bounds_guard` of
    ``index``), from an ``image`` of ``(rows, C)`` *without* the zero row
    (at least one row where any point is sampled): no copy of the image with
    a zero row appended. A corner that reads nothing (weight 0 or not finite)
    comes with row 0 and its weight times 0 (0, or NaN for a NaN or infinite
    weight: :func:`gather`'s ``weight * 0``), so that the gather needs no mask
    per channel; that is exact where row 0 is finite, which the guard's
    conditional checks (:func:`first_row_finite`), its other branch masking
    those corners' rows instead. The choice depends on the weights' values, so
    it has no derivative with respect to them (at an integer coordinate the
    far corner has weight 0 but not derivative 0): for values only, e.g. a
    ``custom_jvp``'s primal. Values and derivatives: :func:`gather`. (The
    weights: :func:`read_weights_leading`.)
    """
    rows = functools.partial(_rows_by_corner, corner_axis=0)
    return _guarded(rows, image, index, weights, guard & first_row_finite(image),
                    safe=functools.partial(rows, skip_zero_weights=True))


@jax.custom_batching.custom_vmap
def first_row_finite(image: jax.Array) -> jax.Array:
    """Is every entry of ``image``'s row 0 finite? (:func:`gather_leading`'s fast branch.)

    A ``custom_vmap``, so that under ``vmap`` it stays one scalar (every batch
    member's row 0) and the conditional stays a conditional (see
    :func:`bounds_guard`).
    """
    return _row0_finite(image)


def _row0_finite(image: jax.Array) -> jax.Array:
    if image.shape[-2] == 0:  # nothing is read
        return jnp.asarray(True)
    return jnp.isfinite(image[..., 0, :]).all()


@first_row_finite.def_vmap
def _first_row_finite_vmap(axis_size, in_batched, image):
    del axis_size
    return _row0_finite(image), False
