"""A ResNet-50 with deformable stages, from a torchvision checkpoint, fine-tuned with optax.

What a detection user does with deformjax: take an ImageNet ResNet, turn the 3x3
convolutions of stages c3-c5 into deformable ones whose offset branches start at zero
(mmdet's ``dcn=dict(type='DCNv2')``, ``stage_with_dcn=(False, True, True, True)``), load
the pretrained weights, and fine-tune.

1. Builds ``ResNet(50, stage_with_dcn=(False, True, True, True), norm='frozen')`` and
   loads a torchvision-format checkpoint (``--checkpoint resnet50.safetensors``, e.g.
   saved on a machine with torch by ``safetensors.torch.save_file(model.state_dict(), path)``
   for ``model = torchvision.models.resnet50(weights='DEFAULT')``, or a ``.npz`` of the same
   names) with ``load_torch_state_dict(..., strict=False)``:
   the state dict has no offset branches, which keep their zeros. Its ImageNet
   classifier ``fc.*`` is not used. Without a checkpoint (``--random``; this machine
   cannot download one), random weights.
2. Shows what step 0 computes: with DCNv1 (``--dcnv1``) exactly the plain ResNet; with
   DCNv2 (default) every deformable conv2 at half strength, since a fresh mask is
   ``sigmoid(0) = 0.5`` (as in mmcv / mmdet): the logits are compared with the plain
   ResNet holding the same weights (and, for DCNv2, its conv2 kernels halved).
3. Fine-tunes backbone and a new linear head for a few optax steps on the digits of
   ``deformable_digits.py`` (grey, upsampled to ``--size`` pixels, as 3 channels).
4. Draws where the last c5 deformable layer samples (its 9 taps, mapped back to the
   input's pixels) at its strongest position, beside the regular grid. After a few
   steps from zero the offsets have barely moved; fine-tune longer to see them move.

    python examples/dcn_resnet.py --random               # a few minutes on 2 cores
    python examples/dcn_resnet.py --checkpoint resnet50.safetensors
    python examples/dcn_resnet.py --random --quick       # a smoke run
"""

from __future__ import annotations

import argparse
import pathlib
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deformable_digits import CANVAS, make_data
from deformjax.interop import load_torch_state_dict
from deformjax.models import ResNet

DCN_STAGES = (False, True, True, True)


def read_checkpoint(path: pathlib.Path) -> dict[str, np.ndarray]:
    """torch names -> numpy arrays, without unpickling anything."""
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    raise SystemExit(f"--checkpoint must be a .safetensors or .npz file; got {path}")


class Classifier(nn.Module):
    """The backbone's C5, global average pooling, a new linear head."""

    backbone: ResNet
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        c5 = self.backbone(x)[-1]
        return nn.Dense(self.classes, name="head")(c5.mean(axis=(1, 2)))


def step_zero(depth, width, modulated, variables, evaluate, x):
    """The deformable classifier at step 0 against the same weights in a plain ResNet
    (DCNv2: with the conv2 kernels of c3-c5 halved). Returns (max |diff|, max |logit|)."""

    def plain_params(tree, path=()):
        if isinstance(tree, dict):  # the same tree without the offset branches
            return {k: plain_params(v, path + (k,)) for k, v in tree.items() if k != "offset"}
        halve = modulated and path[-2:] == ("conv2", "kernel") and re.fullmatch(
            r"layer[234]_\d+", path[1])
        return 0.5 * tree if halve else tree

    plain = Classifier(ResNet(depth, norm="frozen", width=width))
    plain_vars = {"params": plain_params(variables["params"]),
                  "batch_stats": variables["batch_stats"]}
    ours = evaluate(variables, x)[0]
    theirs = jax.jit(plain.apply)(plain_vars, x)
    return float(jnp.abs(ours - theirs).max()), float(jnp.abs(theirs).max())


def to_rgb(images, size):
    """(N, 32, 32, 1) digits in [0, 1] -> (N, size, size, 3), normalised as for ImageNet."""
    factor = size // CANVAS
    x = np.kron(images[..., 0], np.ones((factor, factor), np.float32))
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return (x[..., None] - mean) / std


def draw(state, image, rgb, out_dir, blocks):
    """Where the last c5 block's deformable conv2 samples (stride 32 grid -> pixels);
    ``state``: the model's intermediates for a batch whose first image is ``image``."""
    from matplotlib.figure import Figure

    name = f"layer4_{blocks - 1}"
    inter = state["intermediates"]["backbone"][name]["conv2"]
    offsets = np.asarray(inter["offsets"][0][0])  # (h, w, 2 * G * 9), (dy, dx) per tap
    masks = inter.get("masks")
    h, w, _ = offsets.shape
    size = np.linalg.norm(offsets, axis=-1)
    row, col = np.unravel_index(size.argmax(), size.shape)
    taps = np.stack(np.meshgrid(np.arange(3) - 1, np.arange(3) - 1, indexing="ij"),
                    -1).reshape(9, 2)
    off = offsets[row, col].reshape(-1, 9, 2)[0]  # offset group 0
    stride = rgb.shape[0] / h
    fig = Figure(figsize=(6.4, 3.2))
    for k, (points, title) in enumerate(((taps + off, "c5 deformable conv"),
                                         (taps.astype(float), "regular grid"))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.imshow(image[..., 0], cmap="gray",
                  extent=(-0.5, rgb.shape[1] - 0.5, rgb.shape[0] - 0.5, -0.5))
        pix = (np.array([row, col]) + points + 0.5) * stride - 0.5
        weight = (np.asarray(masks[0][0])[row, col][:9] if masks is not None and k == 0
                  else np.ones(9))
        ax.scatter(pix[:, 1], pix[:, 0], s=20 + 60 * weight, c="red", edgecolors="white")
        centre = (np.array([row, col]) + 0.5) * stride - 0.5
        ax.plot(centre[1], centre[0], marker="+", color="yellow", markersize=14)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = out_dir / "dcn_resnet_sampling.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path, float(np.abs(offsets).max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=pathlib.Path,
                        help="torchvision-format weights (.safetensors or .npz)")
    source.add_argument("--random", action="store_true", help="random weights")
    parser.add_argument("--dcnv1", action="store_true", help="DCNv1 instead of DCNv2")
    parser.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101))
    parser.add_argument("--width", type=int, default=64, help="torchvision's 64")
    parser.add_argument("--size", type=int, default=128, help="input pixels (multiple of 32)")
    parser.add_argument("--steps", type=int, default=None, help="default 30, 2 with --quick")
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/dcn_resnet"))
    opts = parser.parse_args(argv)
    steps = opts.steps or (2 if opts.quick else 30)
    batch = 8 if opts.quick else 16
    opts.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    modulated = not opts.dcnv1

    x_train, y_train, x_test, y_test = make_data(opts.seed, 1, limit=200 if opts.quick else 800)
    rgb_train, rgb_test = to_rgb(x_train, opts.size), to_rgb(x_test, opts.size)
    backbone = ResNet(opts.depth, stage_with_dcn=DCN_STAGES, dcn_modulated=modulated,
                      norm="frozen", width=opts.width)
    model = Classifier(backbone)
    variables = jax.jit(model.init)(jax.random.key(opts.seed), rgb_train[:1])
    backbone_vars = {"params": variables["params"]["backbone"],
                     "batch_stats": variables["batch_stats"]["backbone"]}
    if opts.checkpoint:
        state_dict = {k: v for k, v in read_checkpoint(opts.checkpoint).items()
                      if not k.startswith("fc.")}  # the ImageNet classifier is not used
        backbone_vars = load_torch_state_dict(backbone_vars, state_dict, strict=False)
        print(f"loaded {len(state_dict)} tensors from {opts.checkpoint} "
              f"(offset branches kept at zero)")
    else:
        print("random weights (--random): no checkpoint loaded")
    kind = "DCNv2" if modulated else "DCNv1"
    print(f"ResNet-{opts.depth}, width {opts.width}, {kind} in c3-c5, frozen batch norm")

    params = {"backbone": backbone_vars["params"], "head": variables["params"]["head"]}
    stats = {"backbone": backbone_vars["batch_stats"]}
    # One compiled evaluation (logits and the sown offsets) for step 0, the test and the picture.
    evaluate = jax.jit(lambda v, x: model.apply(v, x, mutable="intermediates"))
    test = jnp.asarray(rgb_test[:64])
    diff, scale = step_zero(opts.depth, opts.width, modulated,
                            {"params": params, "batch_stats": stats}, evaluate, test)
    what = ("the plain ResNet with conv2 of c3-c5 halved (fresh mask sigmoid(0) = 0.5)"
            if modulated else "the plain ResNet")
    print(f"step 0: the logits equal {what}'s: max |diff| {diff:.2e} "
          f"(max |logit| {scale:.2f})")
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y):
        def loss_fn(params):
            logits = model.apply({"params": params, "batch_stats": stats}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(opts.seed)
    for step in range(steps):
        idx = rng.choice(len(rgb_train), batch, replace=False)
        params, opt_state, loss = train_step(params, opt_state, rgb_train[idx], y_train[idx])
        if step == 0 or (step + 1) % 10 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}: loss {float(loss):.4f}", flush=True)
    logits, state = evaluate({"params": params, "batch_stats": stats}, test)
    accuracy = float((np.asarray(logits).argmax(-1) == y_test[:len(test)]).mean())
    if opts.quick:
        print("SMOKE RUN (--quick): too few steps to mean anything")
    print(f"test accuracy on {len(test)} digits after {steps} steps: {accuracy:.4f}")
    path, moved = draw(state, x_test[0], rgb_test[0], opts.out,
                       {18: 2, 34: 3, 50: 3, 101: 3}[opts.depth])
    print(f"largest |offset| of the last c5 deformable layer: {moved:.4f} px (on its grid)")
    print(f"wrote {path}")
    print(f"total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
