"""Pictures of deformable sampling (needs matplotlib: ``pip install 'deformjax[viz]'``).

Every function draws onto a given matplotlib ``Axes`` or, without one, onto a
new ``matplotlib.figure.Figure`` (no pyplot, no global state), and returns the
figure; nothing here calls ``show()``. Save with ``fig.savefig(path)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["plot_sampling_locations"]


def _axes(ax: Axes | None, size: tuple[float, float] = (4.0, 4.0)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size)
    return fig, fig.add_subplot()


def _show_image(ax: Axes, image: Any) -> None:
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3:
        lo, hi = image.min(), image.max()
        ax.imshow((image - lo) / (hi - lo + 1e-12), interpolation="nearest")
    else:
        ax.imshow(image, cmap="gray", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_sampling_locations(
    image: Any,
    points: Any,
    *,
    centre: Sequence[float] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    color: str = "red",
    size: float = 6.0,
) -> Figure:
    """Draws sampling points over an image (the DCN paper's red dots).

    Args:
      image: ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``.
      points: ``(P, 2)`` ``(y, x)`` in image pixels, e.g. from
        ``deformjax.sampling_locations``.
      centre: optional ``(y, x)`` of the unit they belong to, drawn in green.
      ax: axes to draw on; a new figure when ``None``.
      title: optional axes title.
      color, size: of the points.

    Returns:
      The figure holding ``ax``.
    """
    fig, ax = _axes(ax)
    _show_image(ax, image)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    ax.scatter(points[:, 1], points[:, 0], s=size, c=color, alpha=0.7, linewidths=0,
               label="sampling points")
    if centre is not None:
        ax.scatter([centre[1]], [centre[0]], s=60, c="lime", marker="o", edgecolors="black",
                   label="unit")
    height, width = np.asarray(image).shape[:2]
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    if title:
        ax.set_title(title, fontsize=9)
    return fig
