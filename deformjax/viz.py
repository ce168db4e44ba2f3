"""Pictures of deformable sampling (needs matplotlib: ``pip install 'deformjax[viz]'``).

Every function draws onto a given matplotlib ``Axes`` or, without one, onto a
new ``matplotlib.figure.Figure`` (no pyplot, no global state), and returns the
figure; nothing here calls ``show()``. Save with ``fig.savefig(path)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle
except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "deformjax.viz needs matplotlib, an optional extra: pip install 'deformjax[viz]'"
    ) from error

from deformjax._src import args
from deformjax._src.tools.receptive_field import receptive_field

__all__ = [
    "plot_deformed_rois",
    "plot_effective_receptive_field",
    "plot_receptive_field_growth",
    "plot_sampling_locations",
]


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
    legend: bool = True,
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
      legend: label the points and the unit (off for all but one panel of a grid).

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
    if legend:
        ax.legend(loc="upper right", fontsize=6, framealpha=0.6, markerscale=0.8)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_deformed_rois(
    image: Any,
    rois: Any,
    offset: Any = None,
    *,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    gamma: float = 0.1,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Draws each RoI (yellow) and its bins moved by ``offset`` (red), over an image.

    The DCN paper's picture of deformable RoI pooling: every bin keeps its
    size and moves by ``gamma * roi_height * dy`` rows and
    ``gamma * roi_width * dx`` columns, as in ``deform_roi_pool``.

    Args:
      image: the input image, ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``, in
        the coordinates of ``rois``.
      rois: ``(R, 5)`` ``[batch_index, x1, y1, x2, y2]`` (the batch index is
        ignored: draw the RoIs of one image).
      offset: optional ``(R, oh, ow, 2)`` normalized ``(dy, dx)``; without it,
        the regular bins.
      output_size: int or ``(oh, ow)``.
      spatial_scale: as given to ``deform_roi_pool``: only the half-pixel
        shift of the "aligned" RoI corners depends on it.
      gamma: as given to ``deform_roi_pool``.
      ax: axes to draw on; a new figure when ``None``.
      title: optional axes title.

    Returns:
      The figure holding ``ax``.
    """
    oh, ow = args.as_pair(output_size, "output_size", "plot_deformed_rois")
    rois = np.asarray(rois, dtype=np.float64).reshape(-1, 5)
    offsets = None if offset is None else np.asarray(offset, dtype=np.float64)
    fig, ax = _axes(ax)
    _show_image(ax, image)
    # RoIAlign's "aligned" corners sit half a feature pixel before the box edge.
    shift = 0.5 / spatial_scale
    for r, (_, x1, y1, x2, y2) in enumerate(rois):
        height, width = y2 - y1, x2 - x1
        top, left = y1 - shift, x1 - shift
        ax.add_patch(Rectangle((left, top), width, height, fill=False, edgecolor="yellow",
                               linewidth=2.0))
        for i in range(oh):
            for j in range(ow):
                dy, dx = (0.0, 0.0) if offsets is None else offsets[r, i, j]
                y = top + i * height / oh + gamma * height * dy
                x = left + j * width / ow + gamma * width * dx
                ax.add_patch(Rectangle((x, y), width / ow, height / oh, fill=False,
                                       edgecolor="red", linewidth=0.8))
    bins = "bins moved by the offsets" if offsets is not None else "bins"
    ax.legend(handles=[Patch(fill=False, edgecolor="yellow", linewidth=2.0, label="RoI"),
                       Patch(fill=False, edgecolor="red", linewidth=0.8, label=bins)],
              loc="upper right", fontsize=6, framealpha=0.6)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_receptive_field_growth(
    layers: Sequence[tuple[int, int, int]],
    *,
    fig: Figure | None = None,
) -> Figure:
    """Yu & Koltun's figure 1: how stacked (dilated) convolutions grow the receptive field.

    One panel per layer, on the input grid: the shaded square is the
    receptive field of the centre unit after that layer
    (:func:`deformjax.receptive_field`), and the red dots are the input
    positions the layer's own kernel taps reach (its kernel size, times its
    dilation, times the strides below it). Three 3x3 layers with dilations 1,
    2, 4 give fields of 3, 7 and 15.

    Args:
      layers: ``(kernel_size, dilation, stride)`` per layer.
      fig: a figure to draw into; a new one when ``None``.

    Returns:
      The figure, with one axes per layer.
    """
    layers = [tuple(layer) for layer in layers]
    sizes = receptive_field(layers)
    if not sizes:
        raise args.fail("plot_receptive_field_growth", "layers must not be empty; got []")
    grid = sizes[-1] + 2
    centre = grid // 2
    fig = fig or Figure(figsize=(3.2 * len(layers), 3.4))
    jump = 1
    for index, ((kernel_size, dilation, stride), size) in enumerate(zip(layers, sizes)):
        ax = fig.add_subplot(1, len(layers), index + 1)
        start = centre - size // 2
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), size, size, color="tab:green",
                               alpha=0.35, linewidth=0))
        taps = (np.arange(kernel_size) - (kernel_size - 1) / 2) * dilation * jump + centre
        ty, tx = np.meshgrid(taps, taps, indexing="ij")
        ax.scatter(tx.ravel(), ty.ravel(), c="red", s=14, zorder=3, label="kernel taps")
        if index == 0:
            ax.legend(handles=[Patch(color="tab:green", alpha=0.35, label="receptive field"),
                               *ax.get_legend_handles_labels()[0]],
                      loc="upper right", fontsize=6, framealpha=0.8)
        ax.set_xticks(np.arange(-0.5, grid, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, grid, 1), minor=True)
        ax.grid(which="minor", color="0.8", linewidth=0.5)
        ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
        ax.set_xlim(-0.5, grid - 0.5)
        ax.set_ylim(grid - 0.5, -0.5)
        ax.set_aspect("equal")
        ax.set_title(f"layer {index + 1}: {kernel_size}x{kernel_size}, dilation {dilation}\n"
                     f"receptive field {size}x{size}", fontsize=9)
        jump *= stride
    fig.tight_layout()
    return fig


def plot_effective_receptive_field(
    erf: Any,
    *,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Shows an effective receptive field (``deformjax.effective_receptive_field``).

    Args:
      erf: ``(H, W)`` map, larger where the input matters more.
      ax: axes to draw on; a new figure when ``None``.
      title: optional axes title.

    Returns:
      The figure holding ``ax``.
    """
    fig, ax = _axes(ax)
    shown = ax.imshow(np.asarray(erf, dtype=np.float64), cmap="magma", interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04).set_label(
        "input's influence on the unit", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return fig
