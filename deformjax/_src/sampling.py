"""The bilinear sampler behind every deformable op.

One gather serves both boundary rules:

* ``"zeros"`` (``deform_conv``, torchvision's ``bilinear_interpolate``): each of
  the four corners that falls outside the image contributes 0, so a sample with
  ``y <= -1``, ``y >= H``, ``x <= -1`` or ``x >= W`` is 0.
* ``"clamp"`` (RoIAlign, ``deform_roi_pool``): a sample with ``y < -1``,
  ``y > H``, ``x < -1`` or ``x > W`` is 0; otherwise coordinates below 0 clamp
  to 0 and coordinates at or past the last row / column clamp onto it.

The image is first packed into a *corner table*: for every cell ``(r, c)`` the
four pixels ``(r, c), (r, c + 1), (r + 1, c), (r + 1, c + 1)`` side by side,
channels last, so one row gather fetches all four corners of a sample as a
contiguous ``4 * C`` vector. The boundary rules live in how the table is padded
(zeros, or the last row / column repeated) and in how a coordinate is turned
into a cell index and a fraction; no corner needs a validity test of its own.

Coordinates, fractions and bilinear weights are computed in ``acc_dtype``
(float32 at least, whatever the image dtype): in bfloat16 a coordinate near 300
has a step of 2 pixels. Gradients come from JAX autodiff through this code; the
cell index is piecewise constant, so the derivative with respect to a
coordinate is the one of the bilinear patch the coordinate lies in, which at
integer coordinates is torchvision's (the patch below / to the right).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Mode = Literal["zeros", "clamp"]

# How far outside the image the zero-padded table reaches. A coordinate is
# clipped into [-_PAD, size] before its cell index is taken: past that range
# all four corners lie in the zero padding, so the value and its gradient are
# already 0 there (as in torchvision), and infinite or huge finite
# coordinates can never overflow the integer index onto a real pixel.
_PAD = 2


def corner_table(image: jax.Array, mode: Mode) -> jax.Array:
    """Packs ``image`` ``(B, H, W, C)`` into the corner table ``(B, Hc, Wc, 4, C)``.

    ``"zeros"``: the image padded with ``_PAD`` zero rows / columns on each
    side, ``Hc = H + 2 * _PAD - 1``. ``"clamp"``: the last row / column
    repeated once, ``Hc = H``.
    """
    if mode == "zeros":
        padded = jnp.pad(image, ((0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0)))
    else:
        padded = jnp.pad(image, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")
    return jnp.stack(
        [
            padded[:, :-1, :-1],
            padded[:, :-1, 1:],
            padded[:, 1:, :-1],
            padded[:, 1:, 1:],
        ],
        axis=3,
    )


def _cell_and_fraction(coord: jax.Array, size: int, mode: Mode):
    """Maps coordinates along one axis to (table cell index, fraction, alive mask).

    NaN coordinates keep a NaN fraction (so the sample, and only it, becomes
    NaN) but get a safe index.
    """
    if mode == "zeros":
        c = jnp.clip(coord, -_PAD, size)
        low = jnp.floor(c)
        cell = jnp.where(low >= -_PAD, low, -_PAD).astype(jnp.int32) + _PAD
        return cell, c - low, None
    alive = (coord >= -1) & (coord <= size)
    c = jnp.where(coord <= 0, 0, coord)
    c = jnp.where(c >= size - 1, size - 1, c)
    low = jnp.floor(c)
    cell = jnp.where(low >= 0, low, 0).astype(jnp.int32)
    return cell, c - low, alive


def bilinear_sample(
    table: jax.Array,
    y: jax.Array,
    x: jax.Array,
    batch: jax.Array,
    *,
    size: tuple[int, int],
    mode: Mode,
    scale: jax.Array | None = None,
) -> jax.Array:
    """Bilinearly samples a corner table at fractional points.

    Args:
      table: ``(B, Hc, Wc, 4, C)`` from :func:`corner_table` with the same ``mode``.
      y, x: row and column coordinates, shape ``S``, in the accumulation dtype.
      batch: integer index into ``B`` of each point, broadcastable to ``S``;
        the caller guarantees ``0 <= batch < B``.
      size: ``(H, W)`` of the image the table was built from.
      mode: the boundary rule, ``"zeros"`` or ``"clamp"``.
      scale: optional factor per point, broadcastable to ``S`` (a modulation
        mask, an averaging weight); folded into the bilinear weights.

    Returns:
      ``S + (C,)`` samples in the dtype of ``y``.
    """
    num, hc, wc, _, channels = table.shape
    acc_dtype = y.dtype
    cy, fy, alive_y = _cell_and_fraction(y, size[0], mode)
    cx, fx, alive_x = _cell_and_fraction(x, size[1], mode)
    gy, gx = 1 - fy, 1 - fx
    weights = [gy * gx, gy * fx, fy * gx, fy * fx]
    if mode == "clamp":
        alive = (alive_y & alive_x).astype(acc_dtype)
        scale = alive if scale is None else scale * alive
    if scale is not None:
        weights = [w * scale for w in weights]

    rows = (jnp.asarray(batch, jnp.int32) * hc + cy) * wc + cx
    flat = table.reshape(num * hc * wc, 4 * channels)
    corners = flat.at[rows].get(mode="promise_in_bounds")
    corners = corners.reshape(rows.shape + (4, channels)).astype(acc_dtype)
    return sum(w[..., None] * corners[..., k, :] for k, w in enumerate(weights))
