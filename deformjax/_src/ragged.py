"""Exact adaptive RoI sampling at the cost of the samples it needs.

RoIAlign's adaptive rule (``sampling_ratio <= 0``) gives bin ``b`` a grid of
``ceil(bin_h) x ceil(bin_w)`` bilinear samples, so the number of samples
depends on the data and cannot be a static shape. Here the samples of every
bin are enumerated as one ragged list and visited ``K`` at a time by a
``lax.while_loop``:

* Per bin, only the grid rows ``iy`` (columns ``ix``) whose sample can touch
  the map (``-1 <= y <= H``, RoIAlign's rule; one row of margin on each side)
  are listed: a sample outside reads 0 but still counts in the average, so the
  divisor stays ``ceil(bin_h) * ceil(bin_w)`` while the work is bounded by the
  samples that read pixels, at most ``(2 H + 5) x (2 W + 5)`` per bin (the
  grid step is at least half a pixel), whatever the RoI's size.
* The loop's state is a cursor ``(bin, sample within bin)``. Each trip takes
  the sample counts of the next ``K`` bins, assigns its ``K`` slots to samples
  by a prefix sum, gathers their four corner rows (whole channel rows) and
  scatter-adds them into their bins. A trip consumes ``K`` samples or passes
  ``K`` bins, so the trip count is ``ceil(samples / K) + ceil(bins / K)`` at
  most: time scales with the samples actually needed, and the temporaries with
  ``K`` (plus the output, or the image's cotangent in the backward pass).

Derivatives: the sum is linear in the image (its transpose, :func:`scatter`,
is the same loop scattering into the image's cotangent) and depends on the
bins' origins ``y0``, ``x0`` through the bilinear weights, whose derivatives
are the same loop with the weights differentiated (bilinear weights are linear
in each coordinate, so the family value, d/dy, d/dx, d2/dxdy closes). Both
are ``custom_vjp`` functions whose backward passes are made of each other, so
reverse mode of every order follows (``grad`` of ``grad``); forward mode does
not (a ``while_loop`` with a data-dependent trip count has no transpose, so
the derivative cannot be a ``custom_jvp``). Tried for forward mode as well:
``linear_call`` (no batching rule in jax 0.10) and ``lax.custom_linear_solve``
embedding the map as ``(image, bins) -> (0, sums(image) + bins)`` (forward,
reverse and ``vmap`` right, but it drops the tangents of its solve's
constants, the bin origins, so second derivatives came out wrong).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from deformjax._src import sampling

# Bytes of one corner's gathered rows per trip (K * C * itemsize); K is clipped to
# [_MIN_SLOTS, _MAX_SLOTS]. On a CPU a trip's rows stay within the caches. On an
# accelerator every trip has a fixed cost (its body's kernels, one after another), so a
# trip takes up to ACCELERATOR_SLOT_BYTES per corner: with the CPU's K, an H100 ran
# 40-270x slower than torchvision's CUDA roi_align and ps_roi_align (docs/performance.md).
SLOT_BYTES = 2**18
ACCELERATOR_SLOT_BYTES = 2**26
_MIN_SLOTS, _MAX_SLOTS = 64, 4096
_MAX_ACCELERATOR_SLOTS = 2**18


class Bins(NamedTuple):
    """Per bin (shape ``(B,)``): where its grid is and which samples to visit."""

    bin_h: jax.Array  # bin height (float)
    bin_w: jax.Array
    count_h: jax.Array  # grid rows ceil(bin_h), >= 1 (float)
    count_w: jax.Array
    first_iy: jax.Array  # first grid row visited (float, integral)
    first_ix: jax.Array
    cols: jax.Array  # grid columns visited (int32)
    samples: jax.Array  # samples visited: rows * cols (int32)
    batch: jax.Array  # int32 image index
    first_row: jax.Array  # int32 row of the bin's image (level) in the matrix
    height: jax.Array  # int32 size of the bin's image
    width: jax.Array
    group: jax.Array  # int32 channel block (position-sensitive pooling)


class Static(NamedTuple):
    groups: int
    zero_row: int
    slots: int
    # The weights' derivative orders in (y, x), one output (or input) per order.
    orders: tuple[tuple[int, int], ...] = ((0, 0),)


def slots_for(channels: int, itemsize: int, *, accelerator: bool = False) -> int:
    """``K``: the samples per trip, a power of two (a CPU's, or an accelerator's)."""
    budget, cap = ((ACCELERATOR_SLOT_BYTES, _MAX_ACCELERATOR_SLOTS) if accelerator
                   else (SLOT_BYTES, _MAX_SLOTS))
    k = max(1, budget // max(1, channels * itemsize))
    k = 1 << (k.bit_length() - 1)
    return int(min(max(k, _MIN_SLOTS), cap))


def pooled_sums(image, y0, x0, bins: Bins, *, groups: int, zero_row: int):
    """``(B, C)``: per bin, the sum of its adaptive grid's bilinear samples (:func:`sums`).

    ``K`` is the CPU's when lowered for a CPU and the accelerators' elsewhere
    (``lax.platform_dependent``), so one exported program keeps both.
    """
    itemsize = jnp.dtype(y0.dtype).itemsize

    def run(slots):
        static = Static(groups=groups, zero_row=zero_row, slots=slots)
        return lambda *operands: sums(*operands, static)[0]

    channels = image.shape[1]
    return lax.platform_dependent(
        image, y0, x0, bins,
        cpu=run(slots_for(channels, itemsize)),
        default=run(slots_for(channels, itemsize, accelerator=True)),
    )


def visited(origin, bin_size, count, size):
    """First grid index visited and the number visited along one axis.

    Samples ``origin + (i + 0.5) * bin_size / count`` for ``i`` in
    ``[0, count)``; those within ``[-1, size]`` (plus one on each side) are
    visited. ``count`` is 0 for an empty bin; a non-finite origin visits none.
    """
    size_f = jnp.asarray(size, origin.dtype)
    step = bin_size / jnp.maximum(count, 1)
    ok = (count > 0) & jnp.isfinite(origin) & (step > 0)
    step = jnp.where(ok, step, 1)
    origin = jnp.where(ok, origin, 0)
    first = jnp.ceil((-1 - origin) / step - 0.5) - 1
    last = jnp.floor((size_f - origin) / step - 0.5) + 1
    first = jnp.clip(first, 0, jnp.maximum(count - 1, 0))
    last = jnp.minimum(last, count - 1)
    number = jnp.where(ok & (last >= first), last - first + 1, 0)
    # At most 2 * size + 5 (the step is at least half a pixel when count > 1).
    number = jnp.minimum(number, 2 * jnp.asarray(size, number.dtype) + 5)
    return first, number.astype(jnp.int32)


def _loop(y0, x0, bins: Bins, static: Static, visit, init):
    """Runs ``visit(carry, slot_bin, index, weights)`` over every listed sample, K at a time.

    ``index``: ``(K, 4)`` corner rows; ``weights``: per order of ``static.orders``,
    ``(K, 4)`` (differentiated) bilinear weights. Slots without a sample have
    weight 0 and read the zero row; ``slot_bin`` is then ``B`` (out of range).
    """
    num_bins = y0.shape[0]
    k = static.slots
    # Per-bin values in two matrices (one gather each per trip), padded by K bins.
    floats = jnp.stack([y0, x0, bins.bin_h, bins.bin_w, bins.count_h, bins.count_w,
                        bins.first_iy, bins.first_ix], axis=1)
    ints = jnp.stack([bins.cols, bins.batch, bins.first_row, bins.height, bins.width,
                      bins.group], axis=1)
    floats, ints = (jnp.concatenate([a, jnp.zeros((k, a.shape[1]), a.dtype)])
                    for a in (floats, ints))
    counts = jnp.concatenate([bins.samples, jnp.zeros((k,), jnp.int32)])
    slot = jnp.arange(k, dtype=jnp.int32)

    def body(state):
        b, offset, carry = state
        window = lax.dynamic_slice(counts, (b,), (k,))
        window = window.at[0].add(-offset)
        window = jnp.minimum(window, k + 1)  # no int32 overflow; K + 1 still says "not done"
        cum = jnp.cumsum(window)
        before = cum - window
        j = jnp.searchsorted(cum, slot, side="right").astype(jnp.int32)
        live = j < k
        j = jnp.minimum(j, k - 1)
        local = slot - before[j] + jnp.where(j == 0, offset, 0)
        at = b + j
        y0_, x0_, bin_h, bin_w, count_h, count_w, first_iy, first_ix = floats[at].T
        cols, batch, first_row, height, width, group = ints[at].T
        cols = jnp.maximum(cols, 1)
        iy = first_iy + (local // cols).astype(floats.dtype)
        ix = first_ix + (local % cols).astype(floats.dtype)
        # The order of evaluation of the static-grid path (and of torchvision).
        y = y0_ + (iy + 0.5) * bin_h / count_h
        x = x0_ + (ix + 0.5) * bin_w / count_w

        def locate(y, x):
            return sampling.locate(
                y, x, batch, size=(height, width), mode="clamp", zero_row=static.zero_row,
                groups=static.groups, group=group, reads=live, first_row=first_row,
            )

        # Written out once (sampling.fenced): left to itself XLA fuses the index
        # arithmetic into each corner's gather and repeats it per channel.
        index = sampling.fenced(lambda y, x: locate(y, x)[0], y, x)
        weights = [jnp.where(live[:, None], _weights(lambda y, x: locate(y, x)[1], y, x, o), 0)
                   for o in static.orders]
        carry = visit(carry, jnp.where(live, at, num_bins), index, weights)
        done = jnp.sum(cum <= k).astype(jnp.int32)
        nxt = jnp.minimum(done, k - 1)
        new_offset = jnp.where(done < k, k - before[nxt] + jnp.where(done == 0, offset, 0), 0)
        return b + done, new_offset.astype(jnp.int32), carry

    def cond(state):
        return state[0] < num_bins

    _, _, out = lax.while_loop(cond, body, (jnp.int32(0), jnp.int32(0), init))
    return out


def _weights(fn, y, x, order):
    """``fn(y, x)`` differentiated ``order[0]`` times in ``y`` and ``order[1]`` in ``x``."""
    for axis, times in enumerate(order):
        for _ in range(times):
            fn = functools.partial(_derivative, fn, axis=axis)
    return fn(y, x)


def _derivative(fn, y, x, *, axis):
    """d fn / d y (axis 0) or d x (axis 1), elementwise."""
    tangents = (jnp.ones_like(y), jnp.zeros_like(x)) if axis == 0 else (
        jnp.zeros_like(y), jnp.ones_like(x))
    return jax.jvp(fn, (y, x), tangents)[1]


def _sums(image, y0, x0, bins, static):
    """``(O, B, C)``: per order and bin, its samples' (differentiated) weights times pixels."""

    def visit(out, at, index, weights):
        rows = [image.at[index[:, q]].get(mode="promise_in_bounds").astype(y0.dtype)
                for q in range(4)]
        new = []
        for order, w in zip(static.orders, weights):
            total = 0
            for q in range(4):
                r = rows[q]
                if order == (0, 0):  # a corner whose weight is 0 reads nothing (inf pixels)
                    r = jnp.where(sampling.reads(w[:, q, None]), r, 0)
                total = total + w[:, q, None] * r
            new.append(total)
        return out.at[:, at].add(jnp.stack(new), mode="drop", indices_are_sorted=True)

    init = jnp.zeros((len(static.orders), y0.shape[0], image.shape[1]), y0.dtype)
    return _loop(y0, x0, bins, static, visit, init)


def _sums_transpose(cotangent, y0, x0, bins, static, image_shape, image_dtype):
    """The transpose of ``_sums`` in the image: ``(O, B, C)`` -> ``(rows + 1, C)``."""

    def visit(grad, at, index, weights):
        rows = cotangent.at[:, at].get(mode="fill", fill_value=0)  # (O, K, C)
        for q in range(4):
            total = 0
            for o, (order, w) in enumerate(zip(static.orders, weights)):
                term = w[:, q, None] * rows[o]
                if order == (0, 0):  # nothing (not even 0 * inf) reaches an unread pixel
                    term = jnp.where(sampling.reads(w[:, q, None]), term, 0)
                total = total + term
            # A slot that reads the zero row (no sample, or an unread corner) adds
            # nothing: its index is moved out of range and dropped, rather than every
            # such slot adding zeros into the same row (on a GPU, one row's atomics).
            into = jnp.where(index[:, q] == static.zero_row, static.zero_row + 1, index[:, q])
            grad = grad.at[into].add(total, mode="drop")
        return grad

    init = jnp.zeros(image_shape, y0.dtype)
    return _loop(y0, x0, bins, static, visit, init).astype(image_dtype)


class Transposed(NamedTuple):
    sums: Static
    image_shape: tuple[int, int]
    image_dtype: str


def _origin_cotangents(static, g, values_of):
    """``(d_y0, d_x0)``: per bin, ``sum_o <g[o], values(order o + 1 along the axis)>``.

    ``values_of(orders)`` gives the sums for ``orders``; bilinear weights are
    linear in each coordinate, so an order already 1 along an axis adds 0.
    """
    raised = []  # (output index o, axis, raised order)
    for o, order in enumerate(static.orders):
        for axis in (0, 1):
            if not order[axis]:
                up = list(order)
                up[axis] += 1
                raised.append((o, axis, tuple(up)))
    out = [jnp.zeros(g.shape[1:2], g.dtype), jnp.zeros(g.shape[1:2], g.dtype)]
    if not raised:
        return out
    orders = tuple(dict.fromkeys(r for _, _, r in raised))
    values = values_of(static._replace(orders=orders))
    for o, axis, up in raised:
        out[axis] = out[axis] + jnp.sum(g[o] * values[orders.index(up)], axis=-1)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def sums(image, y0, x0, bins, static):
    """Per order and bin, the sum of its adaptive grid's bilinear samples: ``(O, B, C)``.

    Reverse-mode derivatives of every order (through :func:`scatter`); no
    forward mode (``jax.jvp``) since the loop runs a data-dependent number of
    trips.

    Args:
      image: ``(rows + 1, C)`` image matrix with its zero row (``sampling``).
      y0, x0: ``(B,)`` bin origins (float32 or wider), differentiable.
      bins: :class:`Bins`, not differentiated.
      static: :class:`Static`; ``O = len(static.orders)``.
    """
    return _sums(image, y0, x0, bins, static)


def _sums_fwd(image, y0, x0, bins, static):
    return sums(image, y0, x0, bins, static), (image, y0, x0, bins)


def _sums_bwd(static, residuals, g):
    image, y0, x0, bins = residuals
    transposed = Transposed(static, image.shape, jnp.dtype(image.dtype).name)
    d_image = scatter(g, y0, x0, bins, transposed)
    d_y0, d_x0 = _origin_cotangents(static, g, lambda s: sums(image, y0, x0, bins, s))
    return d_image, d_y0, d_x0, None


sums.defvjp(_sums_fwd, _sums_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def scatter(g, y0, x0, bins, transposed):
    """The transpose of :func:`sums` in the image: ``g`` ``(O, B, C)`` -> ``(rows + 1, C)``."""
    return _sums_transpose(g, y0, x0, bins, transposed.sums, transposed.image_shape,
                           transposed.image_dtype)


def _scatter_fwd(g, y0, x0, bins, transposed):
    return scatter(g, y0, x0, bins, transposed), (g, y0, x0, bins)


def _scatter_bwd(transposed, residuals, ct):
    g, y0, x0, bins = residuals
    static = transposed.sums
    d_g = sums(ct, y0, x0, bins, static).astype(g.dtype)
    d_y0, d_x0 = _origin_cotangents(static, g, lambda s: sums(ct, y0, x0, bins, s))
    return d_g, d_y0, d_x0, None


scatter.defvjp(_scatter_fwd, _scatter_bwd)
