"""Speed and memory of deformjax against lax.conv_general_dilated and torchvision.

    python benchmarks/bench.py                 # all shapes, prints a table, writes JSON
    python benchmarks/bench.py --shapes A      # shape A only
    python benchmarks/bench.py --quick         # fewer repeats

Shapes (NHWC, 3x3 kernel, padding 1, modulated (DCN v2), offsets ~ N(0, 2^2),
float32), the layer shapes of real models:
  small         N=2, 16x16, 32->32
  A             N=4, 32x32, 128->128
  r50_c3        N=2, 100x168, 128->128           (ResNet-50-DCNv2, stage c3)
  r50_c4_g4     N=2, 50x84, 256->256, 4 offset groups (stage c4)
  edvr_g8       N=4, 64x64, 64->64, 8 offset groups   (EDVR alignment)
  centernet     N=2, 128x128, 64->64            (CenterNet's DCN up-sampling)
  depthwise_g4  N=8, 56x56, 64 channels, feature_group_count 64, 4 offset groups
  large         N=8, 64x64, 256->256            (not run by default)

For every shape: deformjax forward and forward+backward (loss sum(y**2), so
that XLA can drop nothing; gradients of x, offset, mask and kernel), the same
for lax.conv_general_dilated (gradients of x and kernel), the temporary memory
of the compiled forward and of the compiled forward+backward (XLA's
memory_analysis) against the im2col buffer N*H*W*9*C_in*4 bytes, and, when
torch and torchvision are importable, torchvision.ops.deform_conv2d forward and
forward+backward with the same inputs and loss.
Then jax.vmap over 4 single images of shape A against one batched call of the
same work, forward and gradient. Then deform_roi_pool forward+backward (2
feature maps of 64x64x256, 256 RoIs, 7x7 bins, sampling_ratio 2, with offsets)
against torchvision.ops.roi_align (aligned=True, no offsets) forward+backward.

Each comparison is timed interleaved (deformjax, peer, deformjax, peer, ...)
after a warm-up; each figure is the median over the repeats, and every ratio
is taken within its own interleaved pair. JAX and torch both use every core
(torch.set_num_threads(os.cpu_count())).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deformjax import deform_conv, deform_roi_pool

# torch's OpenMP threads spin after each op by default, stealing the cores from
# the JAX call timed next; passive waiting keeps the interleaved runs fair.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:  # torch is optional: a peer to compare with, never a dependency
    import torch
    import torchvision

    torch.set_num_threads(os.cpu_count() or 1)
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

# name: (N, H, W, C_in, C_out, offset_groups, feature_group_count)
SHAPES = {
    "small": (2, 16, 16, 32, 32, 1, 1),
    "A": (4, 32, 32, 128, 128, 1, 1),
    "r50_c3": (2, 100, 168, 128, 128, 1, 1),
    "r50_c4_g4": (2, 50, 84, 256, 256, 4, 1),
    "edvr_g8": (4, 64, 64, 64, 64, 8, 1),
    "centernet": (2, 128, 128, 64, 64, 1, 1),
    "depthwise_g4": (8, 56, 56, 64, 64, 4, 64),
    "large": (8, 64, 64, 256, 256, 1, 1),
}
DEFAULT_SHAPES = [name for name in SHAPES if name != "large"]


def cpu_model() -> str:
    """The CPU's model, family and L2 size where Linux says (``/proc/cpuinfo``, sysfs).

    ``platform.processor()`` says only "x86_64" on Linux, and two "AMD EPYC"
    machines of this project, Zen generations apart, differed 3-5x in
    lax.conv's time: a result names the CPU it came from.
    """
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    model = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        model += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            model += f", L2 {f.read().strip()} per core"
    except OSError:
        pass
    return model


def machine(with_torch: bool) -> dict:
    """What a result was measured on: jax and its device, the CPU, torch if it was timed."""
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "device": f"{device.platform} {device.device_kind}",
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        "torch": torch.__version__ if with_torch else None,
        "torchvision": torchvision.__version__ if with_torch else None,
    }


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each zero-argument callable, timed in turn, after a warm-up."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def conv_inputs(shape, dtype=np.float32):
    """x, offset, mask, kernel of a shape (numpy), the same for every library."""
    n, h, w, c_in, c_out, groups, fg = shape
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, h, w, c_in)).astype(dtype)
    offset = rng.normal(scale=2.0, size=(n, h, w, 2 * groups * 9)).astype(dtype)
    mask = rng.uniform(size=(n, h, w, groups * 9)).astype(dtype)
    kernel = (rng.normal(size=(3, 3, c_in // fg, c_out)) / np.sqrt(9 * c_in // fg)).astype(dtype)
    return x, offset, mask, kernel


def temp_bytes(jitted, *operands) -> int:
    return int(jitted.lower(*operands).compile().memory_analysis().temp_size_in_bytes)


def conv_case(shape, repeats, with_torch):
    n, h, w, c_in, c_out, groups, fg = shape
    x, offset, mask, kernel = conv_inputs(shape)
    xj, oj, mj, kj = (jnp.asarray(a) for a in (x, offset, mask, kernel))

    def deform(x, offset, mask, kernel):
        return deform_conv(x, offset, kernel, mask, padding=1, feature_group_count=fg)

    def plain(x, kernel):
        return lax.conv_general_dilated(
            x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=fg,
        )

    def loss(fn):  # uses every output element, so XLA can drop nothing
        return lambda *a: (fn(*a) ** 2).sum()

    deform_fwd = jax.jit(deform)
    deform_bwd = jax.jit(jax.grad(loss(deform), argnums=(0, 1, 2, 3)))
    plain_fwd = jax.jit(plain)
    plain_bwd = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))
    ours = {
        "deformjax_fwd": lambda: jax.block_until_ready(deform_fwd(xj, oj, mj, kj)),
        "deformjax_fwd_bwd": lambda: jax.block_until_ready(deform_bwd(xj, oj, mj, kj)),
    }
    peers = {
        "lax_conv_fwd": lambda: jax.block_until_ready(plain_fwd(xj, kj)),
        "lax_conv_fwd_bwd": lambda: jax.block_until_ready(plain_bwd(xj, kj)),
    }
    if with_torch:
        def t(a, perm):
            return torch.tensor(a.transpose(perm).copy(), requires_grad=True)

        tx, to, tm = (t(a, (0, 3, 1, 2)) for a in (x, offset, mask))
        tw = t(kernel, (3, 2, 0, 1))

        def torch_fwd():
            with torch.no_grad():
                torchvision.ops.deform_conv2d(tx, to, tw, padding=1, mask=tm)

        def torch_fwd_bwd():
            out = torchvision.ops.deform_conv2d(tx, to, tw, padding=1, mask=tm)
            torch.autograd.grad((out ** 2).sum(), (tx, to, tm, tw))

        peers["torchvision_fwd"] = torch_fwd
        peers["torchvision_fwd_bwd"] = torch_fwd_bwd
    # Each peer is timed interleaved with the deformjax call it is compared with
    # (A, B, A, B, ...), so that both see the same state of the machine.
    result = {}
    for name, peer in peers.items():
        mine = "deformjax_fwd_bwd" if name.endswith("fwd_bwd") else "deformjax_fwd"
        pair = interleaved({mine: ours[mine], name: peer}, repeats)
        result[name] = pair[name]
        result[f"{mine}_vs_{name}"] = pair[mine]
    result["deformjax_fwd"] = result["deformjax_fwd_vs_lax_conv_fwd"]
    result["deformjax_fwd_bwd"] = result["deformjax_fwd_bwd_vs_lax_conv_fwd_bwd"]
    result["temp_bytes_fwd"] = temp_bytes(deform_fwd, xj, oj, mj, kj)
    result["temp_bytes_fwd_bwd"] = temp_bytes(deform_bwd, xj, oj, mj, kj)
    result["lax_conv_temp_bytes_fwd"] = temp_bytes(plain_fwd, xj, kj)
    result["lax_conv_temp_bytes_fwd_bwd"] = temp_bytes(plain_bwd, xj, kj)
    result["im2col_bytes"] = n * h * w * 9 * c_in * 4
    return result


def vmap_case(repeats):
    """jax.vmap over N single images against one batched call of the same work (shape A)."""
    n, h, w, c_in, c_out, _, _ = SHAPES["A"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, 1, h, w, c_in)), jnp.float32)
    offset = jnp.asarray(rng.normal(scale=2.0, size=(n, 1, h, w, 18)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(n, 1, h, w, 9)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)) / np.sqrt(9 * c_in), jnp.float32)

    def layer(x, offset, mask, kernel):
        return deform_conv(x, offset, kernel, mask, padding=1)

    def loss(x, offset, mask, kernel):  # uses the output, so XLA can drop nothing
        return (layer(x, offset, mask, kernel) ** 2).sum()

    mapped = jax.vmap(layer, in_axes=(0, 0, 0, None))
    fns = {
        "vmap_fwd": jax.jit(mapped),
        "batched_fwd": jax.jit(lambda x, o, m, k: layer(x[:, 0], o[:, 0], m[:, 0], k)),
        "vmap_grad": jax.jit(jax.grad(
            lambda x, o, m, k: (mapped(x, o, m, k) ** 2).sum(), argnums=(0, 1, 2, 3))),
        "batched_grad": jax.jit(jax.grad(
            lambda x, o, m, k: loss(x[:, 0], o[:, 0], m[:, 0], k), argnums=(0, 1, 2, 3))),
    }
    result = {}
    for kind in ("fwd", "grad"):
        pair = interleaved(
            {name: (lambda fn=fns[name]: jax.block_until_ready(fn(x, offset, mask, kernel)))
             for name in (f"vmap_{kind}", f"batched_{kind}")},
            repeats,
        )
        result.update(pair)
        result[f"vmap_over_batched_{kind}"] = pair[f"vmap_{kind}"] / pair[f"batched_{kind}"]
    return result


def roi_case(repeats, with_torch):
    rng = np.random.default_rng(0)
    n, h, w, c, num, out = 2, 64, 64, 256, 256, 7
    features = rng.normal(size=(n, h, w, c)).astype(np.float32)
    xy = rng.uniform(0, 48, size=(num, 2))
    wh = rng.uniform(4, 16, size=(num, 2))
    rois = np.concatenate(
        [rng.integers(0, n, size=(num, 1)), xy, xy + wh], axis=1
    ).astype(np.float32)
    offset = rng.normal(scale=0.1, size=(num, out, out, 2)).astype(np.float32)
    fj, rj, oj = jnp.asarray(features), jnp.asarray(rois), jnp.asarray(offset)

    def pool(features, offset):
        return deform_roi_pool(features, rj, offset, output_size=out, sampling_ratio=2)

    pool_bwd = jax.jit(jax.grad(lambda f, o: pool(f, o).sum(), argnums=(0, 1)))
    fns = {"deformjax_roi_fwd_bwd": lambda: jax.block_until_ready(pool_bwd(fj, oj))}
    if with_torch:
        tf = torch.tensor(features.transpose(0, 3, 1, 2).copy(), requires_grad=True)
        tr = torch.tensor(rois)

        def torch_fwd_bwd():
            pooled = torchvision.ops.roi_align(
                tf, tr, output_size=out, sampling_ratio=2, aligned=True
            )
            torch.autograd.grad(pooled.sum(), (tf,))

        fns["torchvision_roi_align_fwd_bwd"] = torch_fwd_bwd
    return interleaved(fns, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=None, help="default 15 (5 with --quick)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-torch", action="store_true", help="skip torchvision even if present")
    parser.add_argument("--no-roi", action="store_true", help="skip the RoI pooling case")
    parser.add_argument("--no-vmap", action="store_true", help="skip the vmap case")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/latest.json"))
    opts = parser.parse_args(argv)
    repeats = opts.repeats or (5 if opts.quick else 15)
    with_torch = torch is not None and not opts.no_torch

    report = {
        "machine": machine(with_torch),
        "repeats": repeats,
        "conv": {},
    }
    print(f"jax {jax.__version__} on {report['machine']['device']}, {os.cpu_count()} cores "
          f"({report['machine']['cpu']}); "
          f"torchvision: {report['machine']['torchvision'] or 'not installed'}; "
          f"medians of {repeats} interleaved runs, milliseconds\n")
    header = (f"{'shape':<13}{'dj fwd':>9}{'conv fwd':>10}{'ratio':>7}{'dj f+b':>9}{'conv f+b':>10}"
              f"{'ratio':>7}{'tmp fwd':>9}{'tmp f+b':>9}{'tv fwd':>9}{'speedup':>9}{'tv f+b':>9}"
              f"{'speedup':>9}")
    print(header)
    print(" " * 62 + "(temps over im2col)")
    for name in opts.shapes:
        r = conv_case(SHAPES[name], repeats, with_torch)
        r["fwd_ratio_vs_lax_conv"] = r["deformjax_fwd"] / r["lax_conv_fwd"]
        r["fwd_bwd_ratio_vs_lax_conv"] = r["deformjax_fwd_bwd"] / r["lax_conv_fwd_bwd"]
        r["temp_fwd_over_im2col"] = r["temp_bytes_fwd"] / r["im2col_bytes"]
        r["temp_fwd_bwd_over_im2col"] = r["temp_bytes_fwd_bwd"] / r["im2col_bytes"]
        line = (f"{name:<13}{r['deformjax_fwd'] * 1e3:>9.1f}{r['lax_conv_fwd'] * 1e3:>10.1f}"
                f"{r['fwd_ratio_vs_lax_conv']:>7.2f}{r['deformjax_fwd_bwd'] * 1e3:>9.1f}"
                f"{r['lax_conv_fwd_bwd'] * 1e3:>10.1f}{r['fwd_bwd_ratio_vs_lax_conv']:>7.2f}"
                f"{r['temp_fwd_over_im2col']:>9.2f}{r['temp_fwd_bwd_over_im2col']:>9.2f}")
        if with_torch:
            r["speedup_vs_torchvision_fwd"] = (
                r["torchvision_fwd"] / r["deformjax_fwd_vs_torchvision_fwd"]
            )
            r["speedup_vs_torchvision_fwd_bwd"] = (
                r["torchvision_fwd_bwd"] / r["deformjax_fwd_bwd_vs_torchvision_fwd_bwd"]
            )
            line += (f"{r['torchvision_fwd'] * 1e3:>9.1f}{r['speedup_vs_torchvision_fwd']:>9.1f}"
                     f"{r['torchvision_fwd_bwd'] * 1e3:>9.1f}"
                     f"{r['speedup_vs_torchvision_fwd_bwd']:>9.1f}")
        print(line, flush=True)
        report["conv"][name] = {"shape_n_h_w_cin_cout_groups_fgroups": SHAPES[name], **r}
    if not opts.no_vmap:
        r = vmap_case(repeats)
        print(f"\nvmap over 4 single images vs one batched call (shape A, modulated, loss "
              f"sum(y**2)): forward {r['vmap_fwd'] * 1e3:.1f} vs {r['batched_fwd'] * 1e3:.1f} ms "
              f"({r['vmap_over_batched_fwd']:.2f}x), grad {r['vmap_grad'] * 1e3:.1f} vs "
              f"{r['batched_grad'] * 1e3:.1f} ms ({r['vmap_over_batched_grad']:.2f}x)", flush=True)
        report["vmap"] = r
    if not opts.no_roi:
        r = roi_case(repeats, with_torch)
        line = (f"\ndeform_roi_pool fwd+bwd (2x64x64x256, 256 RoIs, 7x7, ratio 2, offsets): "
                f"{r['deformjax_roi_fwd_bwd'] * 1e3:.1f} ms")
        if with_torch:
            r["ratio_vs_torchvision_roi_align"] = (
                r["deformjax_roi_fwd_bwd"] / r["torchvision_roi_align_fwd_bwd"]
            )
            line += (f"; torchvision roi_align fwd+bwd (no offsets): "
                     f"{r['torchvision_roi_align_fwd_bwd'] * 1e3:.1f} ms; ratio "
                     f"{r['ratio_vs_torchvision_roi_align']:.2f}")
        print(line)
        report["roi_pool"] = r
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
