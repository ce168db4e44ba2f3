"""Deformable RoI pooling learns to move its bins onto an object.

A small detection-style task generated in code: each 48x48 image holds one
shape (ellipse, rectangle, triangle or cross) of random size, aspect ratio
and position; its box is known. The head sees a *jittered* box (shifted and
rescaled by up to about a third), pools it to 4x4 bins and classifies the
shape. Two heads train on the same backbone design: plain RoIAlign pooling,
and ``DeformRoIPool`` whose fully connected branch predicts an offset per bin.
The script prints both test accuracies and how far the bins moved, and draws
the input RoI (yellow) and the deformed bins (red) on test images, as in the
DCN paper. Last, it pools boxes of very different sizes from a four-level
feature pyramid with ``multi_level_deform_roi_pool`` (each box from the level
mmdet's mapping picks, adaptive sampling) and draws each box in its level's
colour beside what it pooled.

    python examples/roi_pooling.py --out out/roi_pooling
    python examples/roi_pooling.py --quick
"""

from __future__ import annotations

import argparse
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure

from deformjax import DeformRoIPool, deform_roi_pool, multi_level_deform_roi_pool, roi_levels
from deformjax.viz import plot_deformed_rois

SIZE = 48
CLASSES = ("ellipse", "rectangle", "triangle", "cross")
OUTPUT_SIZE = 4
SCALE = 0.5  # the backbone has stride 2


def make_shapes(count, rng):
    """Images (count, 48, 48, 1), labels, true boxes and jittered boxes [x1, y1, x2, y2]."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    images = np.zeros((count, SIZE, SIZE, 1), np.float32)
    labels = rng.integers(0, len(CLASSES), size=count)
    boxes = np.zeros((count, 4), np.float32)
    for i, label in enumerate(labels):
        h = rng.uniform(10, 30)
        w = np.clip(h * np.exp(rng.uniform(-0.9, 0.9)), 8, 40)
        cy, cx = rng.uniform(h / 2 + 1, SIZE - h / 2 - 1), rng.uniform(w / 2 + 1, SIZE - w / 2 - 1)
        u, v = (xs - cx) / (w / 2), (ys - cy) / (h / 2)  # in [-1, 1] inside the box
        if CLASSES[label] == "ellipse":
            shape = u**2 + v**2 <= 1
        elif CLASSES[label] == "rectangle":
            shape = (np.abs(u) <= 0.95) & (np.abs(v) <= 0.95)
        elif CLASSES[label] == "triangle":
            shape = (v <= 0.95) & (np.abs(u) <= (v + 1) / 2)
        else:
            shape = ((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)) & (np.abs(u) <= 1) & (np.abs(v) <= 1)
        images[i, ..., 0] = shape * rng.uniform(0.6, 1.0)
        boxes[i] = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    images += rng.normal(scale=0.05, size=images.shape).astype(np.float32)
    # The head sees a shifted, rescaled box: the object is only partly inside.
    size = boxes[:, 2:] - boxes[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + rng.uniform(-0.3, 0.3, size=(count, 2)) * size
    jitter_size = size * np.exp(rng.uniform(-0.35, 0.35, size=(count, 2)))
    jittered = np.concatenate([centre - jitter_size / 2, centre + jitter_size / 2], axis=1)
    return images, labels, boxes, np.clip(jittered, 0, SIZE).astype(np.float32)


class Detector(nn.Module):
    """A stride-2 backbone, RoI pooling of the given box, and a classifier."""

    deformable: bool

    @nn.compact
    def __call__(self, images, rois):
        x = nn.relu(nn.Conv(16, (3, 3))(images))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        if self.deformable:
            pooled = DeformRoIPool(OUTPUT_SIZE, spatial_scale=SCALE, sampling_ratio=2,
                                   gamma=0.1, deform_fc_channels=128)(x, rois)
        else:
            pooled = deform_roi_pool(x, rois, output_size=OUTPUT_SIZE, spatial_scale=SCALE,
                                     sampling_ratio=2)
        h = nn.relu(nn.Dense(64)(pooled.reshape(pooled.shape[0], -1)))
        return nn.Dense(len(CLASSES))(h)


def with_batch_index(boxes):
    return jnp.concatenate([jnp.arange(boxes.shape[0], dtype=boxes.dtype)[:, None], boxes], 1)


def train(model, data, *, steps, batch_size, seed):
    images, labels, _, rois = data
    params = model.init(jax.random.key(seed), images[:2], with_batch_index(rois[:2]))["params"]
    tx = optax.adam(optax.cosine_decay_schedule(2e-3, steps))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, r, y):
        def loss_fn(params):
            logits = model.apply({"params": params}, x, with_batch_index(r))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for i in range(steps):
        idx = rng.choice(len(images), batch_size, replace=False)
        params, opt_state, loss = step(params, opt_state, images[idx], rois[idx], labels[idx])
        if (i + 1) % max(1, steps // 5) == 0:
            print(f"  step {i + 1:4d}/{steps}  loss {float(loss):.3f}", flush=True)
    return params


def evaluate(model, params, data):
    images, labels, _, rois = data
    logits, state = jax.jit(
        lambda p, x, r: model.apply({"params": p}, x, with_batch_index(r), mutable="intermediates")
    )(params, images, rois)
    accuracy = float((np.asarray(logits).argmax(-1) == labels).mean())
    inter = state.get("intermediates", {})
    offsets = inter["DeformRoIPool_0"]["offsets"][0] if "DeformRoIPool_0" in inter else None
    return accuracy, offsets


LEVEL_COLOURS = ("tab:blue", "tab:green", "tab:orange", "tab:red")


def pyramid_picture(path):
    """Boxes from 12 to 150 px pooled from a 4-level pyramid (finest_scale 16: a box of
    sqrt(area) < 32 px reads P0, < 64 P1, < 128 P2, else P3)."""
    canvas = 256
    image = np.zeros((1, canvas, canvas, 1), np.float32)
    ys, xs = np.mgrid[0:canvas, 0:canvas] + 0.5
    boxes = []
    # (size, left, top): one object per box, apart, crosses and discs in turn
    for k, (size, x1, y1) in enumerate(((12, 60, 210), (24, 196, 212), (44, 190, 150),
                                        (80, 168, 14), (150, 8, 8))):
        cx, cy = x1 + size / 2, y1 + size / 2
        u, v = (xs - cx) / (size / 2), (ys - cy) / (size / 2)
        shape = u**2 + v**2 <= 1 if k % 2 else (np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)
        shape = shape & (np.abs(u) <= 1) & (np.abs(v) <= 1)
        image[0, ..., 0] = np.maximum(image[0, ..., 0], shape * (0.6 + 0.1 * k))
        boxes.append([0.0, x1, y1, x1 + size, y1 + size])
    boxes = np.array(boxes, np.float32)
    # P0..P3: the image average-pooled by 1, 2, 4, 8 (a stand-in for a backbone's FPN).
    levels = [jnp.asarray(image.reshape(1, canvas // s, s, canvas // s, s, 1).mean((2, 4)))
              for s in (1, 2, 4, 8)]
    scales = (1.0, 1 / 2, 1 / 4, 1 / 8)
    pooled = multi_level_deform_roi_pool(levels, jnp.asarray(boxes), output_size=7,
                                         spatial_scales=scales, finest_scale=16)
    level = np.asarray(roi_levels(jnp.asarray(boxes), 4, 16))
    fig = Figure(figsize=(2.2 * (len(boxes) + 2), 4.6))
    grid = fig.add_gridspec(2, len(boxes) + 2)
    ax = fig.add_subplot(grid[:, :2])
    ax.imshow(image[0, ..., 0], cmap="gray")
    for box, l in zip(boxes, level):
        x1, y1, x2, y2 = box[1:]
        ax.add_patch(_rectangle((x1, y1), x2 - x1, y2 - y1, LEVEL_COLOURS[l]))
    ax.set_title("boxes, coloured by FPN level")
    ax.set_axis_off()
    for k, l in enumerate(level):
        ax = fig.add_subplot(grid[0, k + 2])
        ax.imshow(np.asarray(levels[l][0, ..., 0]), cmap="gray")
        x1, y1, x2, y2 = boxes[k, 1:] * scales[l]
        ax.add_patch(_rectangle((x1, y1), x2 - x1, y2 - y1, LEVEL_COLOURS[l]))
        ax.set_title(f"P{l} ({canvas >> l}x{canvas >> l})", color=LEVEL_COLOURS[l])
        ax.set_axis_off()
        ax = fig.add_subplot(grid[1, k + 2])
        ax.imshow(np.asarray(pooled[k, ..., 0]), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{int(boxes[k, 3] - boxes[k, 1])} px box, 7x7")
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return level


def _rectangle(corner, width, height, colour):
    from matplotlib.patches import Rectangle

    return Rectangle(corner, width, height, fill=False, edgecolor=colour, linewidth=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--steps", type=int, default=None, help="default 1500, 150 with --quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/roi_pooling"))
    opts = parser.parse_args(argv)
    steps = opts.steps or (150 if opts.quick else 1500)
    opts.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(opts.seed)
    train_data = make_shapes(600 if opts.quick else 4000, rng)
    test_data = make_shapes(400, rng)
    start = time.perf_counter()

    results = {}
    for name, deformable in (("RoIAlign", False), ("deformable", True)):
        print(f"training the {name} head")
        model = Detector(deformable)
        params = train(model, train_data, steps=steps, batch_size=32, seed=opts.seed)
        results[name] = (model, params) + evaluate(model, params, test_data)

    print(f"\n{'head':<12}{'test accuracy':>15}")
    for name, (_, _, accuracy, _) in results.items():
        print(f"{name:<12}{accuracy:>15.3f}")
    offsets = np.asarray(results["deformable"][3])
    gamma = 0.1
    print(f"bins moved by gamma * offset * RoI size: mean |gamma * offset| = "
          f"{gamma * np.abs(offsets).mean():.3f} of the RoI size, "
          f"max {gamma * np.abs(offsets).max():.3f}")

    images, labels, boxes, rois = test_data
    shown = 6
    fig = Figure(figsize=(2.6 * 3, 2.8 * 2))
    for i in range(shown):
        ax = fig.add_subplot(2, 3, i + 1)
        roi = np.concatenate([[0.0], rois[i]])[None]
        plot_deformed_rois(images[i], roi, offsets[i:i + 1], output_size=OUTPUT_SIZE,
                           spatial_scale=SCALE, gamma=gamma, ax=ax, title=CLASSES[labels[i]])
    fig.tight_layout()
    path = opts.out / "deformed_rois.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"\nwrote {path}")

    path = opts.out / "fpn_levels.png"
    level = pyramid_picture(path)
    print(f"FPN pooling: boxes of 12, 24, 44, 80, 150 px read levels {level.tolist()}")
    print(f"wrote {path}")
    print(f"total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
