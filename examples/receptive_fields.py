"""Receptive fields of plain, dilated and deformable stacks, as pictures.

1. The dilated-convolution figure of Yu & Koltun (2016): three stacked 3x3
   convolutions with dilations 1, 2 and 4 see 3, 7 and 15 pixels.
2. Effective receptive fields (the gradient of a centre unit with respect to
   the input) of four stacks of three 3x3 layers, side by side: plain,
   dilated 1-2-4, dilated 2-2-2 (whose holes show the "gridding" artefact),
   and deformable, whose offsets (here from an offset branch with random
   weights, evaluated on a digit) bend the field to the image.

    python examples/receptive_fields.py --out out/receptive_fields
"""

from __future__ import annotations

import argparse
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage
from sklearn.datasets import load_digits

from deformjax import DeformConv, DilatedConv, effective_receptive_field, receptive_field
from deformjax.viz import plot_effective_receptive_field, plot_receptive_field_growth


class Stack(nn.Module):
    """Three 3x3 layers of one kind, single channel, all-ones kernels (linear)."""

    kind: str
    dilations: tuple[int, int, int] = (1, 1, 1)
    offset_scale: float = 0.0

    @nn.compact
    def __call__(self, x):
        for dilation in self.dilations:
            if self.kind == "deformable":
                layer = DeformConv(1, 3, kernel_dilation=dilation, use_bias=False,
                                   kernel_init=nn.initializers.ones)
            else:
                layer = DilatedConv(1, 3, kernel_dilation=dilation, use_bias=False,
                                    kernel_init=nn.initializers.ones)
            x = layer(x)
        return x


def randomize_offsets(params, scale, key):
    """Gives every offset branch random weights, so that the layers deform."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, leaf), k in zip(flat, keys):
        names = [getattr(p, "key", "") for p in path]
        if "offset" in names and names[-1] == "kernel":
            leaf = scale * jax.random.normal(k, leaf.shape, leaf.dtype)
        leaves.append(leaf)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)


def digit_canvas(size):
    """A few scikit-learn digits, scaled up and centred on a size x size canvas."""
    digits = load_digits().images[:8] / 16.0
    canvas = np.zeros((len(digits), size, size, 1), np.float32)
    for i, digit in enumerate(digits):
        big = ndimage.zoom(digit, size * 0.6 / 8, order=1)
        top = (size - big.shape[0]) // 2
        canvas[i, top:top + big.shape[0], top:top + big.shape[1], 0] = big
    return canvas


def spread(erf):
    """Standard deviation (pixels) of the field around its mean, as a size measure."""
    erf = np.asarray(erf, np.float64)
    ys, xs = np.indices(erf.shape)
    total = erf.sum()
    my, mx = (erf * ys).sum() / total, (erf * xs).sum() / total
    return float(np.sqrt((erf * ((ys - my) ** 2 + (xs - mx) ** 2)).sum() / total))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/receptive_fields"))
    parser.add_argument("--quick", action="store_true", help="a smaller canvas")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    opts.out.mkdir(parents=True, exist_ok=True)

    layers = [(3, 1, 1), (3, 2, 1), (3, 4, 1)]
    sizes = receptive_field(layers)
    print("receptive field of 3x3 layers with dilations 1, 2, 4:", sizes)
    fig = plot_receptive_field_growth(layers)
    path = opts.out / "dilated_receptive_fields.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")

    size = 33 if opts.quick else 49
    images = jnp.asarray(digit_canvas(size))
    stacks = {
        "plain 3x3 x3": Stack("plain"),
        "dilated 1-2-4": Stack("dilated", (1, 2, 4)),
        "dilated 2-2-2 (gridding)": Stack("dilated", (2, 2, 2)),
        "deformable 3x3 x3": Stack("deformable"),
    }
    fig = Figure(figsize=(3.0 * (len(stacks) + 1), 3.3))
    ax = fig.add_subplot(1, len(stacks) + 1, 1)
    ax.imshow(np.asarray(images[0, ..., 0]), cmap="gray")
    ax.set_title("input (one of 8 averaged)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    print(f"\n{'stack':<26}{'theoretical':>12}{'nonzero px':>12}{'spread (px)':>13}")
    for i, (name, stack) in enumerate(stacks.items()):
        params = stack.init(jax.random.key(opts.seed), images[:1])["params"]
        if stack.kind == "deformable":
            params = randomize_offsets(params, 0.05, jax.random.key(opts.seed + 1))
        erf = effective_receptive_field(
            lambda x, stack=stack, params=params: stack.apply({"params": params}, x), images
        )
        theory = receptive_field([(3, d, 1) for d in stack.dilations])[-1]
        print(f"{name:<26}{theory:>12}{int((np.asarray(erf) > 0).sum()):>12}"
              f"{spread(erf):>13.2f}")
        plot_effective_receptive_field(erf, ax=fig.add_subplot(1, len(stacks) + 1, i + 2),
                                       title=name)
    fig.tight_layout()
    path = opts.out / "effective_receptive_fields.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
