"""An InternImage-style network (DCNv3 blocks) on the digits of the main example.

The digits of ``deformable_digits.py`` (scikit-learn's 8x8 digits placed on a
32x32 canvas with a random scale, rotation and translation) are classified
by a small InternImage-style network: a strided stem, then stages of blocks
``x + DCNv3(LayerNorm(x))``, ``x + MLP(LayerNorm(x))``, with a strided
convolution between the stages, global average pooling and a linear head;
trained with optax under jit. The script prints the test accuracy and draws,
for a few test images, where the last DCNv3 layer's points sample (each group
in its own colour) for the position that responds most, beside the regular
3x3 grid a fresh layer samples.

    python examples/dcnv3_block.py            # default run, about six minutes on 2 cores
    python examples/dcnv3_block.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import pathlib
import time

import flax.linen as nn
import jax
import numpy as np

from deformable_digits import CANVAS, count_params, linen_trainer, make_data, train
from deformjax import DCNv3

# (channels, DCNv3 groups, blocks) per stage, 16 channels per group as in
# InternImage; the first strided convolution halves the canvas, each
# later stage halves it again: 16x16, then 8x8.
STAGES = ((32, 2, 2), (64, 4, 2))
STRIDE = 2 ** len(STAGES)  # input pixels per position of the last stage


class Block(nn.Module):
    """InternImage's basic block (pre-norm): ``x + DCNv3(LN(x))``, ``x + MLP(LN(x))``."""

    channels: int
    groups: int

    @nn.compact
    def __call__(self, x):
        x = x + DCNv3(self.channels, groups=self.groups, name="dcn")(nn.LayerNorm()(x))
        y = nn.Dense(4 * self.channels)(nn.LayerNorm()(x))
        return x + nn.Dense(self.channels)(nn.gelu(y, approximate=False))


class DCNv3Net(nn.Module):
    stages: tuple = STAGES

    @nn.compact
    def __call__(self, x):
        for s, (channels, groups, blocks) in enumerate(self.stages):
            x = nn.Conv(channels, (3, 3), strides=2, padding=1, name=f"down_{s}")(x)
            x = nn.LayerNorm()(x)
            for b in range(blocks):
                x = Block(channels, groups, name=f"stage_{s}_block_{b}")(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def points_of(offsets, masks, groups, position):
    """Where a 3x3 DCNv3 layer (padding 1, offset_scale 1) samples at ``position``:
    ``(G, 9, 2)`` (row, col) on its input grid from its offsets ``(H, W, G * 9 * 2)``
    (InternImage's layout: points column-major, ``(dx, dy)`` pairs), and the masks."""
    row, col = position
    off = np.asarray(offsets)[row, col].reshape(groups, 9, 2)
    kc, kr = np.divmod(np.arange(9), 3)  # point q = kc * 3 + kr
    ys = row + (kr - 1) + off[..., 1]
    xs = col + (kc - 1) + off[..., 0]
    return np.stack([ys, xs], -1), np.asarray(masks)[row, col].reshape(groups, 9)


def draw(model, params, images, out_dir):
    from matplotlib.figure import Figure

    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable="intermediates"))
    _, state = apply(params, images)
    name = f"stage_{len(model.stages) - 1}_block_{model.stages[-1][2] - 1}"
    inter = state["intermediates"][name]["dcn"]
    offsets, masks = inter["offsets"][0], inter["masks"][0]
    groups = model.stages[-1][1]
    colours = [f"C{g}" for g in range(groups)]
    fig = Figure(figsize=(2.4 * 2, 2.4 * len(images)))
    for i, image in enumerate(images):
        # The position with the largest offsets away from the border.
        size = np.linalg.norm(np.asarray(offsets[i]), axis=-1)[1:-1, 1:-1]
        position = np.add(np.unravel_index(size.argmax(), size.shape), 1)
        learned, weight = points_of(offsets[i], masks[i], groups, position)
        regular, _ = points_of(np.zeros_like(offsets[i]), masks[i], groups, position)
        for j, (pts, title) in enumerate(((learned, "DCNv3 points"), (regular, "fresh layer"))):
            ax = fig.add_subplot(len(images), 2, 2 * i + j + 1)
            ax.imshow(image[..., 0], cmap="gray", extent=(-0.5, CANVAS - 0.5, CANVAS - 0.5, -0.5))
            canvas = (pts + 0.5) * STRIDE - 0.5  # last-stage grid -> canvas pixels
            for g in range(groups):
                sizes = 8 + 120 * weight[g] if j == 0 else 12
                ax.scatter(canvas[g, :, 1], canvas[g, :, 0], s=sizes, c=colours[g],
                           alpha=0.75, edgecolors="white", linewidths=0.3)
            centre = (position + 0.5) * STRIDE - 0.5
            ax.plot(centre[1], centre[0], marker="+", color="yellow", markersize=12)
            ax.set_xlim(-4, CANVAS + 3)
            ax.set_ylim(CANVAS + 3, -4)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title + (" (size: mask)" if j == 0 else ""), fontsize=9)
    fig.tight_layout()
    path = out_dir / "dcnv3_points.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (under a minute; one block per stage)")
    parser.add_argument("--epochs", type=int, default=None, help="default 5, 1 with --quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/dcnv3"),
                        help="where the figure goes")
    opts = parser.parse_args(argv)
    epochs = opts.epochs or (1 if opts.quick else 5)
    opts.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = make_data(opts.seed, train_copies=1 if opts.quick else 3,
                     limit=600 if opts.quick else None)
    print(f"data: {len(data[0])} train / {len(data[2])} test images of {CANVAS}x{CANVAS} "
          f"(seed {opts.seed})")
    # --quick: one block per stage (the same code, half the compile time)
    model = DCNv3Net(tuple((c, g, 1) for c, g, _ in STAGES) if opts.quick else STAGES)
    steps = epochs * (len(data[0]) // 64)
    trainer = linen_trainer(model, data[0][:1], steps, opts.seed)
    _, params, accuracy = train(trainer, data, epochs=epochs, batch_size=64, seed=opts.seed,
                                name="dcnv3")
    if opts.quick:
        print(f"\nSMOKE RUN (--quick): {steps} steps, too short to mean anything; run without "
              "--quick for the result.")
    print(f"\nDCNv3 network: {count_params(params):,} parameters, test accuracy {accuracy:.4f}")
    path = draw(model, params, data[2][:4], opts.out)
    print(f"wrote {path}")
    print(f"total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
