"""Deformable convolution's sampled matrix product, a chunk of output rows at a time.

``deform_conv`` reduces to ``out = cols @ kernel`` where each row of ``cols``
holds the bilinear samples of one output position (``sampling.gather``). On a
CPU the speed of this step is set by memory traffic, and its memory by what
is kept per sample: the im2col matrix ``cols`` (``K * C_in`` values per output
position) and the corner rows and weights of every sample (``K * G * 8``
values, as large as ``cols`` when an offset group has 8 channels). So nothing
of either is built for the whole output:

* the primal is a loop over chunks of output rows (``lax.fori_loop``); each
  chunk computes its sampling points from its rows of ``offset`` and ``mask``
  (``sampling.points`` and ``corners``), gathers its columns and multiplies
  them with the kernel, so the forward pass's temporaries are one chunk's;
* derivatives (a ``custom_jvp`` whose tangent is linear, so reverse mode is
  its transpose) are computed chunk by chunk in a ``lax.map`` under
  ``jax.checkpoint``: each chunk recomputes its points and samples instead of
  saving them, and the chunk's columns, its scatter into the image's cotangent
  and its matrix products stay in cache. There the points are written out
  once (``sampling.fenced``) for their many readers, and the weights' tangent
  is built from the points' derivatives corner by corner
  (``sampling.weights_jvp``), so that its transpose sums no corner axis.

Points and columns are in the offsets' own order, group-major (``(G, K)``
per output row): the offsets, the mask and their cotangents are never
transposed; the kernel, which is small, is rearranged to match
(:func:`_times_kernel`).

On a CPU the points are computed from flat coordinates written out first
(:func:`_coordinates` behind ``sampling.fenced``), and their corner rows and
weights with the corner axis first (``sampling.corners_leading``; in the
forward, the index from the weights written out, ``read_index_leading``), so
that LLVM vectorizes the loops over the points (:func:`_rows_flat`,
:func:`_tangent_points_flat`); other platforms keep the per-point layout
(``(rows, G, K, 4)``), the one measured on GPUs. Both give the same values
and derivatives (tested).

The tangent rule is ordinary differentiable JAX, so forward mode, reverse
mode, and derivatives of any order all work, and all of them equal those of
the plain formula (the tests compare them with torchvision's gradients).
Accelerators get a single chunk; the choice is made per lowering platform.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from deformjax._src import sampling


class Spec(NamedTuple):
    """Static description of a deformable convolution's sampled product (hashable)."""

    batch: int  # N
    image_hw: tuple[int, int]  # (H, W)
    out_hw: tuple[int, int]  # (H_out, W_out)
    kernel_hw: tuple[int, int]  # (kh, kw)
    strides: tuple[int, int]
    dilation: tuple[int, int]
    origin: tuple[int, int]  # (top, left) padding
    groups: int  # offset groups G
    modulated: bool
    feature_groups: int  # F
    c_in: int
    c_out: int
    dtype: Any  # dtype of the columns and the kernel in the product
    acc_dtype: Any  # dtype of points, samples, weights and sums
    precision: Any
    chunk: int | None  # output rows per chunk on a CPU; None: one chunk
    tangent_chunk: int | None  # output rows per chunk of derivatives on a CPU

    @property
    def taps(self) -> int:
        return self.kernel_hw[0] * self.kernel_hw[1]

    @property
    def rows(self) -> int:
        return self.batch * self.out_hw[0] * self.out_hw[1]


# Chunks on the CPU, in bytes of columns (a chunk's im2col rows), grow with
# the layer: bigger chunks make bigger matrix products, which run faster, and
# fewer loop steps, each with a fixed cost; a share of the layer's im2col
# matrix keeps their temporaries a fraction of it. Measured (benchmarks/
# bench.py shapes; interleaved A/B runs, docs/performance.md):
# - forward: a chunk's columns plus its per-point index, weights and
#   coordinates (``point_bytes`` per row: as many bytes as the columns with
#   8-channel offset groups) at most 1/6 of the im2col matrix, within 4-10
#   MiB of columns. The forward samples the input without a zero row appended
#   (``sampling.gather_leading``), so its temporaries are the chunk's. On a
#   Zen 5 EPYC, against 2 MiB chunks and the image copied with a zero row
#   (interleaved A/B, two runs): shape A -6%, EDVR -6%, CenterNet -8..-9%, the
#   depthwise layer -8%, R50 c4 -5%, R50 c3 -3..-7%, forward temporaries <=
#   0.17x im2col (from <= 0.23x). Then 1/6 and 10 MiB instead of 1/8 and 8
#   MiB: CenterNet's chunks 2048 -> 4096 rows (forward -6..-7%, twice; with
#   the machine in its one-core state, docs/performance.md, -17..-20%), R50
#   c4's 840 -> 1050 (-2..-4%), R50 c3's 1680 -> 2240 (-1%), the rest as
#   they were; forward temporaries <= 0.20x. Bigger chunks are faster still
#   at CenterNet (8192 rows), but their temporaries grow with the per-point
#   arrays, hence counted, and R50 c3's 15.5 MB chunks of columns (3360 rows)
#   were 2-7% slower than 7.7 MB ones (this CPU: a 32 MiB L3).
# - derivatives: chunks hold the four corners' rows and their scatter besides
#   (about 5x a chunk's columns in temporaries), so they are smaller: 1/48 of
#   the im2col matrix, within 1-2 MiB. CenterNet's forward+backward was 11%
#   faster with 512-row chunks than with 256 on the Zen 5 EPYC (1 MiB chunks
#   were ~5% faster than 0.5 MiB ones on the earlier EPYC); 2 MiB chunks
#   everywhere took shape A's forward+backward temporaries to 0.69x im2col
#   (0.53x with 1 MiB) and EDVR's to 0.56x (0.40x), for 5-10% less time.
# Accelerators get one chunk.
# The policy is chosen when the computation is lowered
# (``lax.platform_dependent``), so ``jax.export`` for another platform, or for
# several, gets each platform's own.
_PRIMAL_CHUNK_BYTES = {"cpu": (2**22, 10 * 2**20)}  # (smallest, largest)
_PRIMAL_SHARE = 6  # a forward chunk's columns and points: at most 1/6 of the im2col matrix
_TANGENT_CHUNK_BYTES = {"cpu": (2**20, 2**21)}  # (smallest, largest)
_TANGENT_SHARE = 48  # a derivative chunk's columns: at most 1/48 of the im2col matrix


def chunk_rows(rows: Any, row_bytes: int, *, tangent: bool, point_bytes: int = 0) -> int | None:
    """Rows per chunk on the CPU; None for one chunk.

    At most the rows of the chunk size: a forward chunk's ``row_bytes +
    point_bytes`` per row (its columns and per-point arrays) at most 1/6 of
    the layer's columns ``rows * row_bytes``, a derivative chunk's columns at
    most 1/48 of them, each within its smallest and largest size in bytes of
    columns; a divisor of ``rows`` where
    one of at least half that size exists (chunks of a derivative then need no
    padded copies of the offsets, the mask, their tangents and cotangents),
    else evened out over the chunks. A symbolic row count (``jax.export`` with
    a symbolic batch or image size) gets one chunk: the number of chunks must
    be static.
    """
    if not isinstance(rows, int) or rows <= 1:
        return None
    if tangent:
        smallest, largest = _TANGENT_CHUNK_BYTES["cpu"]
        target = min(max(smallest, rows * row_bytes // _TANGENT_SHARE), largest) // row_bytes
    else:
        smallest, largest = _PRIMAL_CHUNK_BYTES["cpu"]
        work = row_bytes + point_bytes
        target = min(max(smallest // row_bytes, rows * row_bytes // (_PRIMAL_SHARE * work)),
                     largest // row_bytes)
    target = max(1, target)
    if rows <= target:
        return None
    divisor = max(d for d in _divisors(rows) if d <= target)
    if 2 * divisor >= target:
        return divisor
    return -(-rows // -(-rows // target))


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return small + [n // d for d in small]


def per_platform(fn, chunk, *operands):
    """``fn(chunk, *operands)`` on a CPU, ``fn(None, *operands)`` elsewhere."""
    if chunk is None:
        return fn(None, *operands)
    return lax.platform_dependent(
        *operands,
        cpu=functools.partial(fn, chunk),
        default=functools.partial(fn, None),
    )


def origins(spec: Spec) -> jax.Array:
    """``(M, 3)`` int32: per output row, its image and the top-left of its window.

    Computed once for all rows and sliced per chunk: an integer division
    inside a chunk would be fused into, and repeated by, every sample.
    """
    ho, wo = spec.out_hw
    ids = jnp.arange(spec.rows, dtype=jnp.int32)
    pos = ids % (ho * wo)
    return jnp.stack([ids // (ho * wo), (pos // wo) * spec.strides[0] - spec.origin[0],
                      (pos % wo) * spec.strides[1] - spec.origin[1]], axis=-1)


def _points(spec: Spec, origin, offset, mask, *, derivatives: bool):
    """The sampling points of some output rows: ``(sampling.Points, scale)``, ``(rows, G, K)`` each.

    Args:
      spec: the layer.
      origin: ``(rows, 3)`` int32, these rows of :func:`origins`.
      offset: ``(rows, G * K * 2)`` offsets of these rows, indexed ``(g, t, {dy, dx})``.
      mask: ``(rows, G * K)`` modulation, or anything when not ``spec.modulated``
        (``scale`` is then None).
      derivatives: whether the points carry their coordinates' derivatives
        (``sampling.weights_jvp``'s input; None otherwise).

    Group-major, the offsets' own order: no transposition of the offsets, the
    mask, or their cotangents. The samples come out as rows ``(rows, G * K *
    C_in / G)``; :func:`_times_kernel` takes them in that order.
    """
    rows = offset.shape[0]
    (kh, kw), (dh, dw) = spec.kernel_hw, spec.dilation
    groups, taps, acc = spec.groups, spec.taps, spec.acc_dtype
    tap_y = np.repeat(np.arange(kh) * dh, kw).astype(np.int32)  # (K,), tap t = i * kw + j
    tap_x = np.tile(np.arange(kw) * dw, kh).astype(np.int32)
    # The integer grid is exact; it becomes acc_dtype before the offset is added.
    grid_y = origin[:, 1, None] + tap_y  # (rows, K)
    grid_x = origin[:, 2, None] + tap_x
    dy, dx = _split(spec, offset.astype(acc))
    pts = sampling.points(
        grid_y.astype(acc)[:, None, :] + dy,
        grid_x.astype(acc)[:, None, :] + dx,
        origin[:, 0, None, None],
        size=spec.image_hw,
        mode="zeros",
        groups=groups,
        group=jnp.arange(groups)[:, None],
        derivatives=derivatives,
    )
    scale = mask.astype(acc).reshape(rows, groups, taps) if spec.modulated else None
    return pts, scale


def _split(spec: Spec, offset):
    """``(rows, G * K * 2)`` offsets (or tangents) -> ``dy``, ``dx``, ``(rows, G, K)`` each."""
    off = offset.reshape(offset.shape[0], spec.groups, spec.taps, 2)
    return off[..., 0], off[..., 1]


def locate(spec: Spec, origin, offset, mask, *, fence: bool, derivatives: bool = False):
    """Corner rows and weights of some output rows (arguments as in :func:`_points`).

    With ``fence``, the points are computed apart from the corners
    (``sampling.fenced``) and written out once: every per-corner and
    per-channel consumer (the index, the weights, a scatter's rows, the
    derivatives) then reads them instead of repeating their arithmetic. That
    pays where there are many consumers (derivatives: EDVR's forward+backward
    342 -> 277 ms), not in the forward pass, whose two consumers are cheaper
    than writing the points out (measured, 2-core EPYC).

    Returns:
      ``(index, weights, pts, scale)``: ``(rows, G, K, 4)`` index and weights
      (``sampling.corners``), and the points they came from.
    """
    points = functools.partial(_points, spec, derivatives=derivatives)
    pts, scale = (sampling.fenced(points, origin, offset, mask) if fence
                  else points(origin, offset, mask))
    h, w = spec.image_hw
    index, weights = sampling.corners(pts, zero_row=spec.batch * h * w * spec.groups, scale=scale)
    return index, weights, pts, scale


def _flat(a):
    """``(rows, G, K, 4)`` -> ``(rows, G * K, 4)``."""
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2], 4)


def kernel_matrix(spec: Spec, kernel) -> jax.Array:
    """The kernel ``(kh, kw, C_in / F, C_out)`` as :func:`deform_matmul` takes it.

    ``(K * C_in / F, C_out)``; with one feature group its rows are in the
    columns' group-major order ``(G, K, C_in / G)``, else in the kernel's own
    ``(K, C_in / F)``. Arranged once, outside the chunk loops: inside them XLA
    repeated the rearrangement in every chunk (R50 c4's 2.25 MiB kernel, in
    each forward and derivative chunk). A 2-D matrix: a degenerate axis, such
    as ``F = 1`` in ``(K, C_in / F, F, C_out / F)``, made XLA copy the kernel
    to another layout of the same bytes before the loops.
    """
    if spec.feature_groups == 1 and spec.groups > 1:
        cg = spec.c_in // spec.groups
        kernel = kernel.reshape(spec.taps, spec.groups, cg, spec.c_out).transpose(1, 0, 2, 3)
    return kernel.reshape(-1, spec.c_out)


def _times_kernel(spec: Spec, cols, kmat) -> jax.Array:
    """Group-major columns ``(rows, G * K * C_in / G)`` times the kernel: ``(rows, C_out)``.

    In acc_dtype. ``kmat`` as :func:`kernel_matrix` arranges it: with one
    feature group one plain matrix product, else the kernel is rearranged to
    the columns' order (cheap: it is small), not the columns to the kernel's.
    """
    rows, fg, groups, taps = cols.shape[0], spec.feature_groups, spec.groups, spec.taps
    cg = spec.c_in // groups  # channels per offset group
    cols = cols.astype(spec.dtype)
    dot = functools.partial(jnp.einsum, precision=spec.precision,
                            preferred_element_type=spec.acc_dtype)
    if fg == 1:  # one plain matrix product, which XLA lays out best
        return jnp.dot(cols, kmat, precision=spec.precision,
                       preferred_element_type=spec.acc_dtype)
    c_f, o_f = spec.c_in // fg, spec.c_out // fg  # per feature group
    if fg % groups == 0:  # an offset group holds whole feature groups
        a = fg // groups
        out = dot("rgkac,kcgao->rgao", cols.reshape(rows, groups, taps, a, c_f),
                  kmat.reshape(taps, c_f, groups, a, o_f))
    elif groups % fg == 0:  # a feature group holds whole offset groups
        b = groups // fg
        out = dot("rfbkc,kbcfo->rfo", cols.reshape(rows, fg, b, taps, cg),
                  kmat.reshape(taps, b, cg, fg, o_f))
    else:  # neither: the columns to tap-major order
        cols = cols.reshape(rows, groups, taps, cg).transpose(0, 2, 1, 3)
        out = dot("mkfc,kcfo->mfo", cols.reshape(rows, taps, fg, c_f),
                  kmat.reshape(taps, c_f, fg, o_f))
    return out.reshape(rows, spec.c_out)


def _rows(spec: Spec, image, origin, offset, mask, kmat) -> jax.Array:
    """Output rows ``(rows, C_out)`` in acc_dtype (arguments as in :func:`locate`).

    On a CPU from flat coordinates and corner-major index and weights
    (:func:`_rows_flat`); elsewhere as measured on GPUs (:func:`_rows_by_point`).
    """
    return lax.platform_dependent(image, origin, offset, mask, kmat,
                                  cpu=functools.partial(_rows_flat, spec),
                                  default=functools.partial(_rows_by_point, spec))


def _rows_by_point(spec: Spec, image, origin, offset, mask, kmat) -> jax.Array:
    """:func:`_rows` from :func:`locate`'s ``(rows, G, K, 4)`` index and weights.

    ``image`` without its zero row, which is appended here (one chunk: once).
    """
    index, weights, _, _ = locate(spec, origin, offset, mask, fence=False)
    index, weights = _flat(index), _flat(weights)
    cols = sampling.gather(sampling.with_zero_row(image), index, weights,
                           guard=sampling.bounds_guard(index))
    return _times_kernel(spec, cols.reshape(offset.shape[0], spec.taps * spec.c_in), kmat)


def _rows_flat(spec: Spec, image, origin, offset, mask, kmat) -> jax.Array:
    """:func:`_rows` from flat coordinates, written out once (``sampling.fenced``).

    Their weights, corner axis first, then come from a vectorized loop over
    the points and are written out too (``sampling.read_weights_leading``),
    with the low corners' rows (each image's first row computed there, not
    written out with the coordinates); the index from both
    (``sampling.read_index_leading``). EDVR's forward 52 -> 35 ms with the
    flat, corner-major layout, the depthwise shape's 56 -> 40, the small
    one's 0.49 -> 0.36, the others 2-6% faster (2-core EPYC); then, with the
    index from the weights instead of repeating their arithmetic and without a
    per-point array of first rows, EDVR's 11.2-11.7 -> 10.0-10.2 ms and
    CenterNet's -2..-5%; then, with the low rows written out beside the
    weights, -3..-5% at EDVR, CenterNet, A and the depthwise layer (Zen 5 EPYC;
    interleaved A/B, benchmarks/bench.py shapes). With the coordinates
    computed inside the index's and weights' loops, from the offsets'
    ``(rows, G, K)`` layout, those stayed scalar.
    """
    index, weights = _read_corners_flat(spec, origin, offset, mask)
    cols = sampling.gather_leading(image, index, weights, guard=sampling.bounds_guard(index))
    return _times_kernel(spec, cols.reshape(offset.shape[0], spec.taps * spec.c_in), kmat)


def _read_corners_flat(spec: Spec, origin, offset, mask):
    """:func:`_rows_flat`'s index and weights ``(4, rows * G * K)`` for ``gather_leading``.

    (``benchmarks/sampling_floor.py`` replaces this step to time the forward
    without it.)
    """
    y, x, scale = sampling.fenced(functools.partial(_coordinates, spec), origin, offset, mask)

    def weights_and_low(y, x, scale, origin):
        pts = _flat_points(spec, y, x, _first_rows(spec, origin))
        return sampling.read_weights_leading(pts, scale), pts.low

    weights, low = sampling.fenced(weights_and_low, y, x, scale, origin)
    # steps to the corner below (an image row of pixels, G blocks each) and to the right (one pixel)
    index = sampling.read_index_leading(low, weights, y_rows=spec.image_hw[1] * spec.groups,
                                        x_rows=spec.groups)
    return index, weights


def _coordinates(spec: Spec, origin, offset, mask):
    """Flat ``(rows * G * K,)`` coordinates of some output rows, in the offsets' order.

    Returns ``(y, x, scale)``: the sampling points' row and column and the
    modulation (None when not ``spec.modulated``).
    """
    (kh, kw), (dh, dw) = spec.kernel_hw, spec.dilation
    acc = spec.acc_dtype
    tap_y = np.repeat(np.arange(kh) * dh, kw).astype(np.int32)  # (K,), tap t = i * kw + j
    tap_x = np.tile(np.arange(kw) * dw, kh).astype(np.int32)
    dy, dx = _split(spec, offset.astype(acc))  # (rows, G, K)
    y = (origin[:, 1, None] + tap_y).astype(acc)[:, None, :] + dy
    x = (origin[:, 2, None] + tap_x).astype(acc)[:, None, :] + dx
    scale = mask.astype(acc).reshape(-1) if spec.modulated else None
    return y.reshape(-1), x.reshape(-1), scale


def _first_rows(spec: Spec, origin):
    """Flat ``(rows * G * K,)`` ``first_row`` (``sampling.points``) of :func:`_coordinates`' points.

    Per point, the image matrix's row of its image's first pixel plus its group.
    """
    h, w = spec.image_hw
    group = np.arange(spec.groups, dtype=np.int32)[:, None]
    rows = origin[:, 0, None, None] * (h * w * spec.groups) + group
    return jnp.broadcast_to(rows, (origin.shape[0], spec.groups, spec.taps)).reshape(-1)


def _flat_points(spec: Spec, y, x, first_row, *, derivatives=False) -> sampling.Points:
    """``sampling.points`` of :func:`_coordinates`' flat coordinates."""
    return sampling.points(y, x, 0, size=spec.image_hw, mode="zeros", groups=spec.groups,
                           first_row=first_row, derivatives=derivatives)


def _flat_corners(spec: Spec, origin, y, x, scale):
    """Index and weights ``(4, rows * G * K)`` of :func:`_coordinates`' flat coordinates."""
    h, w = spec.image_hw
    return sampling.corners_leading(_flat_points(spec, y, x, _first_rows(spec, origin)),
                                    zero_row=spec.batch * h * w * spec.groups, scale=scale)


def _mask_rows(spec: Spec, mask):
    """The rows of ``mask`` to slice along with the offsets (a placeholder when unmodulated)."""
    return mask if spec.modulated else jnp.zeros((spec.rows, 0), spec.acc_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def deform_matmul(spec: Spec, image, offset, mask, kmat) -> jax.Array:
    """``gather(image, *locate(offset, mask)) @ kmat``, chunk by chunk of output rows.

    Args:
      spec: static shapes and settings.
      image: ``(N * H * W * G, C_in / G)``, the input as rows of channel
        blocks. The forward samples it as it is (on a CPU,
        ``sampling.gather_leading``: a corner that reads nothing reads row 0
        and counts as 0); the derivatives append the zero row once
        (``sampling.with_zero_row``), for their gathers and the scatter.
      offset: ``(M, G * K * 2)`` with ``M = N * H_out * W_out`` rows.
      mask: ``(M, G * K)``; ignored (any array) when not ``spec.modulated``.
      kmat: ``(K * C_in / F, C_out)``, the kernel arranged by :func:`kernel_matrix`.

    Returns:
      ``(M, C_out)`` in ``spec.acc_dtype``.
    """
    return per_platform(functools.partial(_primal, spec), spec.chunk,
                        image, offset, _mask_rows(spec, mask), kmat)


def _primal(spec, chunk, image, offset, mask, kmat):
    m = spec.rows
    if chunk is None:
        return _rows(spec, image, origins(spec), offset, mask, kmat)
    origin = origins(spec)

    def step(i, out):
        # The last chunk ends at the last row (it may overlap the one before;
        # the overlapped rows are written twice with the same values).
        start = jnp.minimum(i * chunk, m - chunk).astype(jnp.int32)
        rows = _rows(spec, image, *(lax.dynamic_slice_in_dim(a, start, chunk)
                                    for a in (origin, offset, mask)), kmat)
        return lax.dynamic_update_slice_in_dim(out, rows, start, 0)

    return lax.fori_loop(0, -(-m // chunk), step, jnp.zeros((m, spec.c_out), spec.acc_dtype))


def _deform_matmul_jvp(spec, primals, tangents):
    image, offset, mask, kmat = primals
    d_image, d_offset, d_mask, d_kmat = tangents
    out = deform_matmul(spec, image, offset, mask, kmat)
    mask = _mask_rows(spec, mask)
    zero = lambda t: isinstance(t, SymbolicZero)  # noqa: E731
    has_image, has_kmat = not zero(d_image), not zero(d_kmat)
    # the derivatives' gathers and the image cotangent's scatter read the zero row
    image = sampling.with_zero_row(image)
    if has_image:
        d_image = sampling.with_zero_row(d_image)
    has_points = not zero(d_offset) or (spec.modulated and not zero(d_mask))
    if not (has_image or has_points or has_kmat):
        return out, jnp.zeros_like(out)
    if has_points:  # the one that is symbolically zero becomes a real zero
        d_offset = jnp.zeros(offset.shape, offset.dtype) if zero(d_offset) else d_offset
        d_mask = (_mask_rows(spec, d_mask) if not zero(d_mask)
                  else jnp.zeros(mask.shape, mask.dtype))
    else:  # placeholders, so that every operand can be chunked alike
        d_offset = d_mask = jnp.zeros((spec.rows, 0), spec.acc_dtype)

    def tangent_rows(origin, offset, mask, d_offset, d_mask):
        rows = offset.shape[0]
        index, weights, d_weights = lax.platform_dependent(
            origin, offset, mask, d_offset, d_mask,
            cpu=functools.partial(_tangent_points_flat, spec, has_points),
            default=functools.partial(_tangent_points_by_point, spec, has_points))
        guard = sampling.bounds_guard(index)
        t_cols = None
        if has_image:
            # One gather of all four corners, so that its transpose is one
            # scatter-add into the image's cotangent (sampling.linear_rows); no
            # guard, so that the scatter stays visible to XLA. In the weights'
            # dtype (float32 at least): its transpose then accumulates the
            # image's cotangent in float32, not bfloat16 (more exact, and 3-4x
            # faster on a GPU, measured on an H200). Corners that read nothing
            # send nothing back.
            t_cols = sampling.linear_rows(d_image.astype(weights.dtype), index, weights,
                                          sampling.reads(weights))
        if has_points:
            t = sampling.weighted_rows(image, index, d_weights, guard=guard, stacked=True)
            t_cols = t if t_cols is None else t_cols + t
        t_out = None
        if t_cols is not None:
            t_out = _times_kernel(spec, t_cols.reshape(rows, spec.taps * spec.c_in), kmat)
        if has_kmat:
            cols = sampling.gather(image, index, weights, guard=guard)
            t = _times_kernel(spec, cols.reshape(rows, spec.taps * spec.c_in), d_kmat)
            t_out = t if t_out is None else t_out + t
        return t_out

    fn = jax.checkpoint(tangent_rows)

    def tangent(chunk, offset, mask, d_offset, d_mask):
        operands = (origins(spec), offset, mask, d_offset, d_mask)
        if chunk is None:
            return fn(*operands)
        count = -(-spec.rows // chunk)
        # Padding rows are the last row again (its origin stays in the image)
        # with zero tangents; their outputs are dropped.
        chunked = [
            jnp.pad(a, [(0, count * chunk - spec.rows), (0, 0)], mode="edge" if k == 0 else "constant"
                    ).reshape((count, chunk) + a.shape[1:])
            for k, a in enumerate(operands)
        ]
        t_out = lax.map(lambda a: fn(*a), chunked)
        return t_out.reshape(count * chunk, spec.c_out)[:spec.rows]

    return out, per_platform(tangent, spec.tangent_chunk, offset, mask, d_offset, d_mask)


deform_matmul.defjvp(_deform_matmul_jvp, symbolic_zeros=True)


def _tangent_points_by_point(spec: Spec, has_points: bool, origin, offset, mask, d_offset,
                             d_mask):
    """A derivative chunk's ``(index, weights, d_weights)``, ``(rows, G * K, 4)`` each.

    ``d_weights`` is the weights' tangent (None without ``has_points``), built
    corner by corner (``sampling.weights_jvp``) so that its transpose sums no
    corner axis. The points are written out once (``locate(fence=True)``).
    """
    rows = offset.shape[0]
    index, weights, pts, scale = locate(spec, origin, offset, mask, fence=True,
                                        derivatives=has_points)
    d_weights = None
    if has_points:
        d_scale = d_mask.reshape(rows, spec.groups, spec.taps) if spec.modulated else None
        _, d_weights = sampling.weights_jvp(pts, scale, *_split(spec, d_offset), d_scale)
        d_weights = _flat(d_weights)
    return _flat(index), _flat(weights), d_weights


def _tangent_points_flat(spec: Spec, has_points: bool, origin, offset, mask, d_offset, d_mask):
    """:func:`_tangent_points_by_point` from flat coordinates and corner-major points (CPU).

    As in the forward (:func:`_rows_flat`): the coordinates are written out
    flat, the index and weights are computed from them with the corner axis
    first (vectorized; each image's first row computed in the index's loop,
    not written out with the coordinates: EDVR's forward+backward -10%) and
    written out once for their many readers, and the
    weights' tangent is stacked on the leading corner axis
    (``sampling.weights_tangent_leading``). Returned in the per-point layout
    (small transposes) for the gathers, the scatter and the batched product.
    """
    y, x, scale = sampling.fenced(functools.partial(_coordinates, spec), origin, offset, mask)
    index, weights = sampling.fenced(functools.partial(_flat_corners, spec), origin, y, x, scale)
    d_weights = None
    if has_points:
        # The offsets' tangent split into flat dy and dx behind a fence too:
        # in reverse mode its transpose then interleaves cotangents computed
        # by vectorized loops over the points, where XLA otherwise fused their
        # per-point arithmetic into the interleaved (2-step innermost) loop.
        d_y, d_x = sampling.fenced(
            lambda offset, d_offset: tuple(d.reshape(-1) for d in _split(spec, d_offset)),
            offset, d_offset)
        d_scale = d_mask.reshape(-1) if spec.modulated else None
        pts = _flat_points(spec, y, x, 0, derivatives=True)  # for the weights only
        d_weights = sampling.weights_tangent_leading(pts, scale, d_y, d_x, d_scale).T
    shape = (offset.shape[0], spec.groups * spec.taps, 4)
    return (index.T.reshape(shape), weights.T.reshape(shape),
            None if d_weights is None else d_weights.reshape(shape))
