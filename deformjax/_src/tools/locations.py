"""Where a stack of (deformable) convolutions samples its input.

Pure NumPy on concrete arrays: a tool for looking at trained models, not for
use under ``jit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from deformjax._src import args, geometry
from deformjax._src.geometry import LayerGeometry

_FN = "sampling_locations"


def layer_geometry(
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    padding: Any = "SAME",
    dilation: int | Sequence[int] = 1,
    *,
    in_hw: Sequence[int] | None = None,
) -> LayerGeometry:
    """Normalises a layer's hyper-parameters (as given to ``DeformConv`` or ``nn.Conv``).

    ``in_hw``, the layer's input ``(H, W)``, is needed for ``'SAME'`` padding.
    The result's ``output_hw(in_hw)`` is the layer's output size.
    """
    return geometry.resolve("layer_geometry", kernel_size, strides, padding, dilation,
                            in_hw=in_hw, names=("kernel_size", "strides", "dilation"))


def sampling_locations(
    layers: Sequence[LayerGeometry],
    offsets: Sequence[Any],
    position: Sequence[float],
) -> np.ndarray:
    """The input points a unit of a convolution stack samples, composed through the stack.

    The construction of the DCN paper's figures (Dai et al. 2017, figure 5):
    start from output ``position`` of the top layer; each layer with offsets
    replaces every point by the ``kh * kw`` points its taps sample there (its
    regular grid moved by the offsets predicted at that output position, which
    is rounded to the nearest one on the layer's output grid); each layer
    without offsets (``None``, a plain convolution) moves a point to the centre
    of its window without spreading it. Three 3x3 deformable layers give
    ``9 ** 3 = 729`` points; zero offsets give the regular (dilated) grid.

    Args:
      layers: the geometry of each layer, bottom (input side) first.
      offsets: per layer, ``None`` or that layer's offsets for one image,
        ``(H_out, W_out, 2 * G * kh * kw)`` in ``deform_conv``'s layout (group
        0 is drawn when ``G > 1``).
      position: ``(row, col)`` on the top layer's output grid.

    Returns:
      ``(P, 2)`` float array of ``(y, x)`` in the bottom layer's input
      coordinates (pixels).

    Example:
      >>> import numpy as np
      >>> from deformjax import layer_geometry, sampling_locations
      >>> layer = layer_geometry(3, padding=1)
      >>> zero = np.zeros((16, 16, 18))
      >>> points = sampling_locations([layer, layer, layer], [zero, zero, zero], (8, 8))
      >>> points.shape, points.min(axis=0).tolist(), points.max(axis=0).tolist()
      ((729, 2), [5.0, 5.0], [11.0, 11.0])
    """
    if len(layers) != len(offsets):
        raise args.fail(
            _FN, f"layers and offsets must have the same length; got {len(layers)} and {len(offsets)}"
        )
    points = np.asarray([position], dtype=np.float64).reshape(1, 2)
    for index in reversed(range(len(layers))):
        (kh, kw), (sh, sw), ((top, _), (left, _)), (dh, dw) = layers[index]
        stride, origin = np.array([sh, sw]), np.array([-top, -left])
        if offsets[index] is None:
            centre = (np.array(LayerGeometry(*layers[index]).window) - 1) / 2
            points = points * stride + origin + centre
            continue
        off = np.asarray(offsets[index], dtype=np.float64)
        if off.ndim != 3 or off.shape[-1] % (2 * kh * kw):
            raise args.fail(
                _FN,
                f"offsets[{index}] must have shape (H_out, W_out, 2 * G * kh * kw) for a "
                f"{kh}x{kw} kernel; got {off.shape}",
            )
        ho, wo = off.shape[:2]
        taps = np.stack(
            np.meshgrid(np.arange(kh) * dh, np.arange(kw) * dw, indexing="ij"), axis=-1
        ).reshape(-1, 2)
        rows = np.clip(np.rint(points[:, 0]).astype(int), 0, ho - 1)
        cols = np.clip(np.rint(points[:, 1]).astype(int), 0, wo - 1)
        moved = off[rows, cols, : 2 * kh * kw].reshape(-1, kh * kw, 2)  # (P, K, (dy, dx))
        base = points * stride + origin  # the window's top-left tap of each point
        points = (base[:, None, :] + taps[None] + moved).reshape(-1, 2)
    return points
