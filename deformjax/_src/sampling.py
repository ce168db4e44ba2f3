"""The bilinear sampler behind every deformable op.

Two boundary rules, one gather:

* ``"zeros"`` (``deform_conv``, torchvision's ``bilinear_interpolate``): each of
  the four corners that falls outside the image contributes 0, so a sample with
  ``y <= -1``, ``y >= H``, ``x <= -1`` or ``x >= W`` is 0.
* ``"clamp"`` (RoIAlign, ``deform_roi_pool``): a sample with ``y < -1``,
  ``y > H``, ``x < -1`` or ``x > W`` is 0; otherwise coordinates below 0 clamp
  to 0 and coordinates at or past the last row / column clamp onto it.

Sampling is split in two steps so that the expensive one stays simple:

1. :func:`locate` turns coordinates into, per sample, the rows of its four
   corners in the image viewed as a ``(rows, channels)`` matrix and their
   bilinear weights, with each boundary rule folded into the weights (a
   corner outside the image gets weight 0 and a row index clamped into the
   image, so no index can leave it). It works on small per-sample arrays
   without channels, in float32 at least: in bfloat16 a coordinate near 300
   has a step of 2 pixels.
2. :func:`gather` fetches the four corners' whole channel rows and sums them
   with the weights.

Gradients come from JAX autodiff through this code. The rows are piecewise
constant, so the derivative with respect to a coordinate is that of the
bilinear patch the coordinate lies in, which at integer coordinates is
torchvision's (the patch below / to the right, with the corners outside the
image counting 0, as in its ``get_coordinate_weight``).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Mode = Literal["zeros", "clamp"]

# Zeros rule: coordinates are clipped into [_LOW, size] first. Beyond that range
# both corners along the axis are outside the image, so value and gradient are
# already 0 there (as in torchvision), infinite or huge finite coordinates
# cannot overflow an integer, and the clip's own kink never lands on -1, the
# border row a fresh layer samples.
_LOW = -2


def _axis(coord: jax.Array, size: int, mode: Mode):
    """One axis: (low row, high row, fraction, low weight mask, high weight mask).

    Rows are clamped into ``[0, size - 1]`` and safe for NaN coordinates, whose
    fraction stays NaN (so their sample, and only it, becomes NaN).
    """
    if mode == "zeros":
        c = jnp.clip(coord, _LOW, size)
        low = jnp.floor(c)
        keep_low = ((low >= 0) & (low <= size - 1)).astype(coord.dtype)
        keep_high = ((low >= -1) & (low <= size - 2)).astype(coord.dtype)
    else:
        alive = ((coord >= -1) & (coord <= size)).astype(coord.dtype)
        c = jnp.where(coord <= 0, 0, coord)
        c = jnp.where(c >= size - 1, size - 1, c)
        low = jnp.floor(c)
        keep_low = keep_high = alive
    return _row(low, size), _row(low + 1, size), c - low, keep_low, keep_high


def _row(value: jax.Array, size: int) -> jax.Array:
    """A float row clamped into ``[0, size - 1]`` as int32 (NaN -> 0)."""
    value = jnp.where(value > 0, value, 0)
    return jnp.where(value < size - 1, value, size - 1).astype(jnp.int32)


def locate(
    y: jax.Array,
    x: jax.Array,
    batch: jax.Array,
    *,
    size: tuple[int, int],
    mode: Mode,
    scale: jax.Array | None = None,
    groups: int = 1,
    group: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array]:
    """The four corner rows of each sample and their bilinear weights.

    Rows index the image viewed as ``(B * H * W * groups, C / groups)``, i.e.
    ``image.reshape(-1, C // groups)`` for an image ``(B, H, W, C)`` whose
    channels are split into ``groups`` contiguous blocks.

    Args:
      y, x: row and column coordinates, shape ``S``, in float32 or wider.
      batch: integer image index of each point, broadcastable to ``S``; the
        caller guarantees ``0 <= batch < B``.
      size: ``(H, W)`` of the image.
      mode: the boundary rule, ``"zeros"`` or ``"clamp"``.
      scale: optional factor per point, broadcastable to ``S`` (a modulation
        mask, an averaging weight), folded into the weights.
      groups, group: the channel block of each point, broadcastable to ``S``.

    Returns:
      ``(index, weights)``: int32 and float ``S + (4,)``, the corners ordered
      ``(r, c), (r, c + 1), (r + 1, c), (r + 1, c + 1)``.
    """
    height, width = size
    y_low, y_high, fy, ky_low, ky_high = _axis(y, height, mode)
    x_low, x_high, fx, kx_low, kx_high = _axis(x, width, mode)
    gy, gx = 1 - fy, 1 - fx
    weights = jnp.stack(
        [
            gy * gx * (ky_low * kx_low),
            gy * fx * (ky_low * kx_high),
            fy * gx * (ky_high * kx_low),
            fy * fx * (ky_high * kx_high),
        ],
        axis=-1,
    )
    if scale is not None:
        weights = weights * jnp.asarray(scale)[..., None]
    base = jnp.asarray(batch, jnp.int32) * height
    group = jnp.asarray(group, jnp.int32)

    def row(r, c):
        return ((base + r) * width + c) * groups + group

    index = jnp.stack(
        [row(y_low, x_low), row(y_low, x_high), row(y_high, x_low), row(y_high, x_high)],
        axis=-1,
    )
    return jnp.broadcast_to(index, weights.shape), weights


def gather(image: jax.Array, index: jax.Array, weights: jax.Array) -> jax.Array:
    """Bilinear samples: ``sum_q weights[..., q] * image[index[..., q]]``.

    Args:
      image: ``(rows, C)``, e.g. ``x.reshape(-1, C // groups)``.
      index, weights: from :func:`locate`, shape ``S + (4,)``.

    Returns:
      ``S + (C,)`` in the dtype of ``weights``: one gather of whole,
      contiguous channel rows per corner.
    """
    out = None
    for corner in range(4):
        rows = image.at[index[..., corner]].get(mode="promise_in_bounds")
        term = weights[..., corner, None] * rows.astype(weights.dtype)
        out = term if out is None else out + term
    return out
