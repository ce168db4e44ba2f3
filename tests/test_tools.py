"""Tools: sampling locations, effective receptive fields, and the viz figures."""

import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from deformjax import (
    LayerGeometry,
    deform_conv,
    dilated_conv,
    effective_receptive_field,
    layer_geometry,
    sampling_locations,
)
from deformjax import viz

matplotlib.use("Agg")


def test_layer_geometry_resolves_padding():
    assert layer_geometry(3, padding="SAME", in_hw=(8, 8)) == LayerGeometry(
        (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1))
    assert layer_geometry(3, 2, "SAME", in_hw=(32, 32)).padding == ((0, 1), (0, 1))
    assert layer_geometry((3, 1), padding=(1, 0)).padding == ((1, 1), (0, 0))
    with pytest.raises(ValueError, match="layer_geometry: in_hw is needed to resolve padding"):
        layer_geometry(3, padding="SAME")


def test_sampling_locations_regular_grid_and_offsets():
    layer = layer_geometry(3, padding=2, dilation=2)  # "SAME" for a dilated 3x3
    zero = np.zeros((9, 9, 18))
    points = sampling_locations([layer], [zero], (4, 4))
    expected = np.stack(np.meshgrid([2, 4, 6], [2, 4, 6], indexing="ij"), -1).reshape(-1, 2)
    np.testing.assert_array_equal(points, expected)
    # Three stacked 3x3 layers: 9 ** 3 points over the 7x7 receptive field.
    layer = layer_geometry(3, padding=1)
    stacked = sampling_locations([layer] * 3, [np.zeros((9, 9, 18))] * 3, (4, 4))
    assert stacked.shape == (729, 2)
    assert stacked.min() == 1 and stacked.max() == 7
    # Offsets move the taps by (dy, dx) in the layer's input coordinates.
    moved = np.zeros((9, 9, 18))
    moved[4, 4, 0::2], moved[4, 4, 1::2] = 0.5, -1.25
    np.testing.assert_allclose(sampling_locations([layer], [moved], (4, 4)),
                               sampling_locations([layer], [zero], (4, 4)) + [0.5, -1.25])


def test_sampling_locations_match_deform_conv():
    """Each point is where deform_conv samples: a one-hot image lights the tap at its point."""
    rng = np.random.default_rng(0)
    offset = rng.integers(-2, 3, size=(1, 8, 8, 18)).astype(np.float64)
    layer = layer_geometry(3, strides=1, padding=1)
    points = sampling_locations([layer], [offset[0]], (3, 5))
    for tap, (y, x) in enumerate(points.astype(int)):
        if not (0 <= y < 8 and 0 <= x < 8):
            continue
        image = np.zeros((1, 8, 8, 1))
        image[0, y, x, 0] = 1.0
        kernel = np.zeros((3, 3, 1, 1))
        kernel[tap // 3, tap % 3] = 1.0
        assert deform_conv(image, offset, kernel, padding=1)[0, 3, 5, 0] == 1.0


def test_sampling_locations_plain_layers_map_to_window_centres():
    layers = [layer_geometry(3, 2, "SAME", in_hw=(16, 16)), layer_geometry(3, padding=1)]
    centre = sampling_locations(layers, [None, None], (2, 3))
    np.testing.assert_array_equal(centre, [[2 * 2 + 1, 2 * 3 + 1]])
    with pytest.raises(ValueError, match="sampling_locations: layers and offsets must have"):
        sampling_locations(layers, [None], (0, 0))
    with pytest.raises(ValueError, match=r"sampling_locations: offsets\[0\] must have shape"):
        sampling_locations(layers[:1], [np.zeros((8, 8, 7))], (0, 0))


def test_effective_receptive_field_shows_gridding_and_size():
    x = jnp.ones((1, 21, 21, 1))
    kernel = jnp.ones((3, 3, 1, 1))

    def stack(dilations):
        def fn(x):
            for d in dilations:
                x = dilated_conv(x, kernel, dilation=d)
            return x
        return fn

    plain = np.asarray(effective_receptive_field(stack([1, 1, 1]), x))
    assert np.isclose(plain.max(), 1.0) and (plain[10] > 0).sum() == 7
    gridded = np.asarray(effective_receptive_field(stack([2, 2, 2]), x))
    row = np.nonzero(gridded[10])[0]
    assert list(row) == list(range(4, 17, 2))  # holes between the taps: "gridding"
    dense = np.asarray(effective_receptive_field(stack([1, 2, 4]), x))
    assert (dense[10] > 0).sum() == 15
    corner = np.asarray(effective_receptive_field(stack([1]), x, position=(0, 0)))
    assert np.nonzero(corner)[0].max() == 1
    with pytest.raises(ValueError, match="effective_receptive_field: position must lie"):
        effective_receptive_field(stack([1]), x, position=(21, 0))
    with pytest.raises(ValueError, match="effective_receptive_field: inputs must have rank 4"):
        effective_receptive_field(stack([1]), x[0])


def test_plot_sampling_locations():
    points = np.array([[1.0, 2.0], [3.5, 4.0], [5.0, 0.5]])
    fig = viz.plot_sampling_locations(np.zeros((8, 8)), points, centre=(3, 3), title="t")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    np.testing.assert_array_equal(scatters[0].get_offsets(), points[:, ::-1])
    np.testing.assert_array_equal(scatters[1].get_offsets(), [[3, 3]])
    assert ax.get_title() == "t" and isinstance(ax.images[0], AxesImage)


def test_plot_deformed_rois():
    rois = np.array([[0, 4.0, 2.0, 12.0, 10.0]])
    offset = np.zeros((1, 2, 2, 2))
    offset[0, 1, 0] = [0.5, -0.25]
    fig = viz.plot_deformed_rois(np.zeros((16, 16, 3)), rois, offset, output_size=2)
    rects = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert len(rects) == 1 + 4
    roi, bins = rects[0], rects[1:]
    assert roi.get_xy() == (3.5, 1.5) and roi.get_width() == 8.0 and roi.get_edgecolor()[:3] == (
        1.0, 1.0, 0.0)
    # bin (1, 0) moves by gamma * (8 * 0.5) rows and gamma * (8 * -0.25) columns
    np.testing.assert_allclose(bins[2].get_xy(), (3.5 - 0.1 * 8 * 0.25, 1.5 + 4 + 0.1 * 8 * 0.5))
    np.testing.assert_allclose(bins[3].get_xy(), (3.5 + 4, 1.5 + 4))
    plain = viz.plot_deformed_rois(np.zeros((16, 16)), rois, output_size=(2, 3))
    assert len(plain.axes[0].patches) == 1 + 6


def test_plot_receptive_field_growth_and_erf():
    fig = viz.plot_receptive_field_growth([(3, 1, 1), (3, 2, 1), (3, 4, 1)])
    assert len(fig.axes) == 3
    assert [ax.get_title().split("\n")[1] for ax in fig.axes] == [
        "receptive field 3x3", "receptive field 7x7", "receptive field 15x15"]
    shaded = fig.axes[2].patches[0]
    assert shaded.get_width() == 15
    taps = fig.axes[2].collections[0].get_offsets()
    assert len(taps) == 9 and np.ptp(np.asarray(taps)[:, 0]) == 8  # taps 4 apart
    with pytest.raises(ValueError, match="plot_receptive_field_growth: layers must not be empty"):
        viz.plot_receptive_field_growth([])
    fig = viz.plot_effective_receptive_field(np.eye(5), title="erf")
    assert isinstance(fig.axes[0].images[0], AxesImage) and fig.axes[0].get_title() == "erf"


def test_viz_is_not_imported_by_the_package():
    import subprocess
    import sys

    code = "import sys, deformjax; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
