"""The three ops of deformjax on random data, with shapes and a gradient.

    python examples/quickstart.py                      # prints shapes (seconds)
    python examples/quickstart.py --out out/quickstart # also draws where one unit samples

It is already short: --quick is accepted, like every example's, and changes nothing.
"""

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from deformjax import (deform_conv, deform_roi_pool, dilated_conv, layer_geometry,
                       receptive_field, sampling_locations)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="draw where unit (16, 16) of the deformable layer samples, here")
    parser.add_argument("--quick", action="store_true", help="no effect: already quick")
    opts = parser.parse_args(argv)

    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k1, (2, 32, 32, 16))

    # Deformable convolution v2: offsets and a modulation mask per tap.
    offset = 2.0 * jax.random.normal(k2, (2, 32, 32, 2 * 3 * 3))
    mask = jax.nn.sigmoid(jax.random.normal(k3, (2, 32, 32, 3 * 3)))
    kernel = 0.1 * jax.random.normal(k4, (3, 3, 16, 32))
    y = deform_conv(x, offset, kernel, mask, padding=1)  # jit-compiled on first call
    print("deform_conv     ", x.shape, "->", y.shape)
    grad = jax.grad(lambda o: deform_conv(x, o, kernel, mask, padding=1).sum())(offset)
    print("  d sum / d offset", grad.shape, "nonzero:", bool(jnp.any(grad != 0)))

    # Dilated convolution: a 3x3 kernel spread 4 pixels apart, same resolution.
    z = dilated_conv(x, kernel, dilation=4)
    print("dilated_conv    ", x.shape, "->", z.shape)
    print("  receptive field of 3x3 with dilations 1, 2, 4:",
          receptive_field([(3, 1, 1), (3, 2, 1), (3, 4, 1)]))

    # Deformable RoI pooling: 7x7 bins per box, each moved by its own offset.
    rois = jnp.array([[0, 2.0, 3.0, 20.0, 28.0], [1, 10.0, 0.0, 31.0, 15.0]])
    bins = 0.1 * jax.random.normal(k2, (2, 7, 7, 2))
    pooled = deform_roi_pool(x, rois, bins, output_size=7, sampling_ratio=2)
    print("deform_roi_pool ", x.shape, rois.shape, "->", pooled.shape)

    if opts.out is not None:
        from deformjax.viz import plot_sampling_locations

        opts.out.mkdir(parents=True, exist_ok=True)
        points = sampling_locations([layer_geometry(3, padding=1)], [np.asarray(offset[0])],
                                    (16, 16))
        fig = plot_sampling_locations(np.asarray(x[0, ..., 0]), points, centre=(16, 16),
                                      title="deform_conv: the 9 taps of unit (16, 16)")
        fig.savefig(opts.out / "quickstart.png", dpi=110, bbox_inches="tight")
        print("wrote", opts.out / "quickstart.png")


if __name__ == "__main__":
    main()
