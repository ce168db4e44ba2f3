"""Deformable vs plain CNN on digits of varied scale, rotation and position.

scikit-learn's bundled 8x8 digits (no download) are placed on a 32x32 canvas
with a random scale, rotation and translation (seeded), so the geometry of
each digit varies. Two CNNs of equal depth and about the same number of
parameters are trained with optax under jit: a plain one, and one whose last
two 3x3 convolutions are ``DeformConv`` layers that learn where to sample.
The script prints both test accuracies and the parameter counts, then draws,
for a few test images, where the deformable layers sample for the unit of the
last layer that responds most (composed through both deformable layers:
9 x 9 = 81 red points), beside the regular grid of the plain layers.

    python examples/deformable_digits.py              # default run, a few minutes on 2 cores
    python examples/deformable_digits.py --api nnx    # the same with Flax NNX modules
    python examples/deformable_digits.py --quick      # a smoke run (too short to compare)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage
from sklearn.datasets import load_digits
from tqdm import tqdm

import deformjax.nnx as djnnx
from deformjax import DeformConv, layer_geometry, sampling_locations

CANVAS = 32


def transformed_digits(images, rng, copies):
    """Each 8x8 image ``copies`` times on the canvas: scale 1.5-3.5, rotation +-45 deg, shift."""
    out = np.zeros((len(images) * copies, CANVAS, CANVAS), np.float32)
    centre_in = np.array([3.5, 3.5])
    for k, image in enumerate(np.repeat(images, copies, axis=0)):
        scale = rng.uniform(1.5, 3.5)
        angle = rng.uniform(-np.pi / 4, np.pi / 4)
        room = max(0.0, (CANVAS - 8 * scale) / 2)
        shift = rng.uniform(-room, room, size=2)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        # affine_transform maps output (canvas) coordinates to input coordinates.
        matrix = rotation / scale
        centre_out = np.array([CANVAS / 2 - 0.5, CANVAS / 2 - 0.5]) + shift
        out[k] = ndimage.affine_transform(
            image, matrix, offset=centre_in - matrix @ centre_out,
            output_shape=(CANVAS, CANVAS), order=1, cval=0.0,
        )
    return out


def make_data(seed, train_copies, limit=None):
    digits = load_digits()
    images, labels = digits.images / 16.0, digits.target
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    if limit:
        order = order[:limit]
    split = int(0.75 * len(order))
    train, test = order[:split], order[split:]
    x_train = transformed_digits(images[train], rng, train_copies)
    y_train = np.repeat(labels[train], train_copies)
    x_test = transformed_digits(images[test], rng, 1)
    return x_train[..., None], y_train, x_test[..., None], labels[test]


class DigitNet(nn.Module):
    """Five 3x3 convolutions (two with stride 2), global average pooling, a linear head."""

    widths: tuple[int, ...]
    deformable: bool

    @nn.compact
    def __call__(self, x):
        strides = (1, 2, 1, 2, 1)
        for i, (width, stride) in enumerate(zip(self.widths, strides)):
            conv = DeformConv if self.deformable and i >= 3 else nn.Conv
            x = nn.relu(conv(width, (3, 3), strides=stride, padding="SAME")(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


class NnxDigitNet(nnx.Module):
    """``DigitNet`` in Flax NNX: the same layers, ``deformjax.nnx.DeformConv`` for the last two."""

    def __init__(self, widths, deformable, *, rngs):
        strides, channels = (1, 2, 1, 2, 1), (1,) + tuple(widths)
        self.convs = nnx.List([
            (djnnx.DeformConv if deformable and i >= 3 else nnx.Conv)(
                channels[i], width, (3, 3), strides=stride, padding="SAME", rngs=rngs)
            for i, (width, stride) in enumerate(zip(widths, strides))
        ])
        self.head = nnx.Linear(widths[-1], 10, rngs=rngs)

    def __call__(self, x):
        for conv in self.convs:
            x = nnx.relu(conv(x))
        return self.head(x.mean(axis=(1, 2)))


# Widths chosen so that both models have about the same number of parameters:
# the plain one is wider where the other spends parameters on offset branches.
PLAIN_WIDTHS = (16, 32, 32, 74, 74)
DEFORM_WIDTHS = (16, 32, 32, 64, 64)


def count_params(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def train_step(model, tx):
    """One optax step on a batch: (params, opt_state, x, y) -> (params, opt_state, loss)."""

    def step(params, opt_state, x, y):
        def loss_fn(params):
            logits = model.apply({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def linen_trainer(model, x_first, steps, seed):
    """(state, step, predict, parameters) for a linen model: state is (params, opt_state)."""
    params = jax.jit(model.init)(jax.random.key(seed), x_first)["params"]
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, max(steps, 1)))
    update = jax.jit(train_step(model, tx))

    def step(state, x, y):
        params, opt_state, loss = update(*state, x, y)
        return (params, opt_state), loss

    predict = jax.jit(lambda state, x: model.apply({"params": state[0]}, x).argmax(-1))
    return (params, tx.init(params)), step, predict, lambda state: state[0]


def nnx_trainer(model, steps):
    """The same for an NNX model: state is (model, optimizer), updated in place."""
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, max(steps, 1)))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def update(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    def step(state, x, y):
        return state, update(*state, x, y)

    predict = nnx.jit(lambda state, x: state[0](x).argmax(-1))
    return (model, optimizer), step, predict, lambda state: nnx.state(state[0], nnx.Param)


def train(trainer, data, *, epochs, batch_size, seed, name):
    """The training loop of both APIs; returns (parameters, test accuracy)."""
    x_train, y_train, x_test, y_test = data
    state, step, predict, parameters = trainer
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        batches = range(len(x_train) // batch_size)
        bar = tqdm(batches, desc=f"{name} epoch {epoch + 1}/{epochs}", leave=False,
                   disable=not sys.stderr.isatty())  # quiet in logs and pipes
        losses = []
        for b in bar:
            idx = order[b * batch_size:(b + 1) * batch_size]
            state, loss = step(state, x_train[idx], y_train[idx])
            losses.append(float(loss))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        print(f"{name} epoch {epoch + 1}/{epochs}: mean loss {np.mean(losses):.4f}", flush=True)
    # Batches of one shape (the last padded), so that predict compiles once.
    batches = -(-len(x_test) // 256)
    padded = np.concatenate([x_test, np.zeros((batches * 256 - len(x_test),) + x_test.shape[1:],
                                              x_test.dtype)])
    predictions = np.concatenate(
        [predict(state, padded[i:i + 256]) for i in range(0, len(padded), 256)]
    )[:len(x_test)]
    return state, parameters(state), float((predictions == y_test).mean())


def linen_offsets(model, params, images):
    """The two DeformConv layers' offsets and the last one's output, from one pass."""
    _, state = model.apply(
        {"params": params}, images, mutable="intermediates",
        capture_intermediates=lambda module, _: isinstance(module, DeformConv),
    )
    inter = state["intermediates"]
    offsets = [inter["DeformConv_0"]["offsets"][0], inter["DeformConv_1"]["offsets"][0]]
    return offsets, inter["DeformConv_1"]["__call__"][0]


def nnx_offsets(model, images):
    """The same, read the NNX way: nnx.capture of the sown offsets and of each call's output."""
    _, captured = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(images)
    convs = captured["convs"]
    offsets = [convs[3]["offsets"][0], convs[4]["offsets"][0]]
    return offsets, convs[4]["__call__"][0]


def draw_sampling(offsets, top, images, out_dir):
    """For each image, the 81 points where the two deformable layers sample vs the plain grid.

    ``offsets``: the two deformable layers' offsets; ``top``: the last one's output (N, 8, 8, C).
    """
    from matplotlib.figure import Figure

    from deformjax.viz import plot_sampling_locations

    # The stack's geometry, bottom first: conv 32 -> conv/2 16 -> conv 16 -> deform/2 8 -> deform 8.
    sizes = (CANVAS, CANVAS, CANVAS // 2, CANVAS // 2, CANVAS // 4)
    layers = [
        layer_geometry(3, s, "SAME", in_hw=(size, size))
        for s, size in zip((1, 2, 1, 2, 1), sizes)
    ]
    fig = Figure(figsize=(2.2 * 2, 2.2 * len(images)))
    for row, image in enumerate(images):
        # The strongest unit away from the border, so that its grid fits on the canvas.
        energy = np.asarray(jnp.linalg.norm(top[row], axis=-1))[1:-1, 1:-1]
        position = np.add(np.unravel_index(energy.argmax(), energy.shape), 1)
        learned = sampling_locations(
            layers, [None, None, None, offsets[0][row], offsets[1][row]], position
        )
        zeros = [None, None, None, np.zeros_like(offsets[0][row]), np.zeros_like(offsets[1][row])]
        regular = sampling_locations(layers, zeros, position)
        centre = sampling_locations(layers, [None] * 5, position)[0]
        plot_sampling_locations(image[..., 0], learned, centre=centre, title="deformable",
                                ax=fig.add_subplot(len(images), 2, 2 * row + 1),
                                legend=row == 0)
        plot_sampling_locations(image[..., 0], regular, centre=centre, title="regular grid",
                                ax=fig.add_subplot(len(images), 2, 2 * row + 2), legend=False)
    fig.tight_layout()
    path = out_dir / "sampling_locations.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (under a minute): too short to compare the models")
    parser.add_argument("--api", choices=("linen", "nnx"), default="linen",
                        help="build the models with deformjax's linen or NNX modules")
    parser.add_argument("--epochs", type=int, default=None, help="default 12, 2 with --quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/digits"),
                        help="where the figure goes")
    opts = parser.parse_args(argv)
    epochs = opts.epochs or (2 if opts.quick else 12)
    opts.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    data = make_data(opts.seed, train_copies=1 if opts.quick else 3,
                     limit=600 if opts.quick else None)
    print(f"data: {len(data[0])} train / {len(data[2])} test images of {CANVAS}x{CANVAS} "
          f"(seed {opts.seed})")
    print(f"API: {opts.api}")
    steps = epochs * (len(data[0]) // 64)
    results = {}
    for name, widths, deformable in (("plain", PLAIN_WIDTHS, False),
                                     ("deformable", DEFORM_WIDTHS, True)):
        if opts.api == "nnx":
            model = NnxDigitNet(widths, deformable, rngs=nnx.Rngs(opts.seed))
            trainer = nnx_trainer(model, steps)
        else:
            model = DigitNet(widths, deformable)
            trainer = linen_trainer(model, data[0][:1], steps, opts.seed)
        t0 = time.perf_counter()
        state, params, accuracy = train(trainer, data, epochs=epochs, batch_size=64,
                                        seed=opts.seed, name=name)
        results[name] = (model, state, params, accuracy, time.perf_counter() - t0)

    if opts.quick:
        print(f"\nSMOKE RUN (--quick): {steps} steps on {len(data[0])} digits, too short to "
              "compare the models; run without --quick for the result.")
    print(f"\n{'model':<12}{'parameters':>12}{'test accuracy':>16}{'train time':>12}")
    for name, (_, _, params, accuracy, seconds) in results.items():
        print(f"{name:<12}{count_params(params):>12,}{accuracy:>16.4f}{seconds:>11.1f}s")

    model, state, params, _, _ = results["deformable"]
    images = data[2][:4]
    if opts.api == "nnx":
        offsets, top = nnx_offsets(model, images)
    else:
        offsets, top = linen_offsets(model, params, images)
    path = draw_sampling(offsets, top, images, opts.out)
    print(f"\nwrote {path}")
    print(f"total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
