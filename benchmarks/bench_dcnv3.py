"""DCNv3 aggregation at InternImage-T's stage shapes, against its lower bound and torchvision.

    python benchmarks/bench_dcnv3.py            # the four stages, batch 8; prints a table, JSON
    python benchmarks/bench_dcnv3.py --quick    # fewer repeats

Shapes (NHWC, 3x3 points, padding 1, offsets ~ N(0, 2^2), softmax mask, float32),
InternImage-T: channels 64 / 128 / 256 / 512 with 4 / 8 / 16 / 32 groups at
56x56 / 28x28 / 14x14 / 7x7, batch 8 (16 channels per group throughout).

For every stage: ``deformjax.dcnv3`` forward and forward+backward (loss
``sum(y**2)``, gradients of x, offset and mask); a depthwise 3x3
``lax.conv_general_dilated`` of the same size (feature_group_count = C; the
lower bound: the same number of multiply-adds without sampling), forward and
forward+backward (gradients of x and kernel); and, when torch and torchvision
are importable, the same aggregation through ``torchvision.ops.deform_conv2d``
with an all-ones depthwise kernel (the route an InternImage user on a CPU has),
forward and forward+backward (gradients of x, offset and mask), on the same
numbers converted to its layout. Compiled temporaries of deformjax's forward
and forward+backward (XLA's memory_analysis) are reported against the output's
bytes. Timing as in bench.py: interleaved after a warm-up, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deformjax import dcnv3

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench import cpu_model, interleaved, torch  # noqa: E402  (one timing discipline, torch optional)

if torch is not None:
    import torchvision

# name: (N, H, W, C, groups)
STAGES = {
    "stage1": (8, 56, 56, 64, 4),
    "stage2": (8, 28, 28, 128, 8),
    "stage3": (8, 14, 14, 256, 16),
    "stage4": (8, 7, 7, 512, 32),
}
K = 3  # kernel_size
P = K * K


def inputs(shape, seed=0):
    n, h, w, c, g = shape
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, h, w, c)).astype(np.float32)
    offset = rng.normal(scale=2.0, size=(n, h, w, g * P * 2)).astype(np.float32)
    logits = rng.normal(size=(n, h, w, g, P))
    mask = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return x, offset, mask.reshape(n, h, w, g * P).astype(np.float32)


def to_torchvision(x, offset, mask, groups):
    """The same aggregation in deform_conv2d's layout: NCHW, row-major taps, (dy, dx)."""
    n, h, w, c = x.shape
    tap = (np.arange(P) % K) * K + np.arange(P) // K  # point q = kc * K + kr -> kr * K + kc
    off = np.empty_like(offset.reshape(n, h, w, groups, P, 2))
    src = offset.reshape(n, h, w, groups, P, 2)
    off[:, :, :, :, tap, 0], off[:, :, :, :, tap, 1] = src[..., 1], src[..., 0]
    msk = np.empty_like(mask.reshape(n, h, w, groups, P))
    msk[..., tap] = mask.reshape(n, h, w, groups, P)
    return (
        x.transpose(0, 3, 1, 2).copy(),
        off.reshape(n, h, w, -1).transpose(0, 3, 1, 2).copy(),
        msk.reshape(n, h, w, -1).transpose(0, 3, 1, 2).copy(),
    )


def temp_mib(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def stage_case(shape, repeats, with_torch):
    n, h, w, c, g = shape
    x, offset, mask = inputs(shape)
    xj, oj, mj = jnp.asarray(x), jnp.asarray(offset), jnp.asarray(mask)
    kernel = jnp.asarray(np.random.default_rng(1).normal(size=(K, K, 1, c)), jnp.float32)

    def ours(x, offset, mask):
        return dcnv3(x, offset, mask, kernel_size=K, padding=1, groups=g)

    def depthwise(x, kernel):
        return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=c)

    def loss(fn):
        return lambda *a: (fn(*a) ** 2).sum()

    ours_fwd = jax.jit(ours)
    ours_bwd = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))
    dw_fwd = jax.jit(depthwise)
    dw_bwd = jax.jit(jax.grad(loss(depthwise), argnums=(0, 1)))
    run = jax.block_until_ready
    result = {
        "fwd_temp_mib": temp_mib(ours, xj, oj, mj),
        "fwd_bwd_temp_mib": temp_mib(jax.grad(loss(ours), argnums=(0, 1, 2)), xj, oj, mj),
        "output_mib": x.nbytes / 2**20,
    }
    fwd = interleaved({"deformjax_fwd": lambda: run(ours_fwd(xj, oj, mj)),
                       "depthwise_conv_fwd": lambda: run(dw_fwd(xj, kernel))}, repeats)
    bwd = interleaved({"deformjax_fwd_bwd": lambda: run(ours_bwd(xj, oj, mj)),
                       "depthwise_conv_fwd_bwd": lambda: run(dw_bwd(xj, kernel))}, repeats)
    result.update({k: 1e3 * v for k, v in {**fwd, **bwd}.items()})
    result["fwd_vs_depthwise"] = result["deformjax_fwd"] / result["depthwise_conv_fwd"]
    result["fwd_bwd_vs_depthwise"] = result["deformjax_fwd_bwd"] / result["depthwise_conv_fwd_bwd"]
    if with_torch:
        tx, to, tm = (torch.tensor(a, requires_grad=True)
                      for a in to_torchvision(x, offset, mask, g))
        ones = torch.ones(c, 1, K, K)

        def tv_out():
            return torchvision.ops.deform_conv2d(tx, to, ones, padding=1, mask=tm)

        check = np.abs(tv_out().detach().numpy().transpose(0, 2, 3, 1)
                       - np.asarray(ours_fwd(xj, oj, mj))).max()
        result["max_abs_diff_vs_torchvision"] = float(check)

        def torch_fwd():
            with torch.no_grad():
                tv_out()

        def torch_fwd_bwd():
            torch.autograd.grad((tv_out() ** 2).sum(), (tx, to, tm))

        fwd = interleaved({"ours": lambda: run(ours_fwd(xj, oj, mj)),
                           "torchvision_fwd": torch_fwd}, repeats)
        bwd = interleaved({"ours": lambda: run(ours_bwd(xj, oj, mj)),
                           "torchvision_fwd_bwd": torch_fwd_bwd}, repeats)
        result["torchvision_fwd"] = 1e3 * fwd["torchvision_fwd"]
        result["torchvision_fwd_bwd"] = 1e3 * bwd["torchvision_fwd_bwd"]
        result["speedup_vs_torchvision_fwd"] = fwd["torchvision_fwd"] / fwd["ours"]
        result["speedup_vs_torchvision_fwd_bwd"] = bwd["torchvision_fwd_bwd"] / bwd["ours"]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--quick", action="store_true", help="5 repeats instead of 20")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path("benchmarks/results/dcnv3-latest.json"))
    opts = parser.parse_args(argv)
    repeats = 5 if opts.quick else 20
    with_torch = torch is not None and not opts.no_torch
    report = {"machine": platform.processor() or platform.machine(), "cpu": cpu_model(),
              "cpus": os.cpu_count(),
              "jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
              "repeats": repeats, "results": {}}
    print(f"{report['device']}, {report['cpus']} CPUs ({report['cpu']}), jax {jax.__version__}, "
          f"medians of {repeats}, ms; torchvision: {'yes' if with_torch else 'no'}")
    print(f"{'stage':<8}{'dj fwd':>9}{'dw conv':>9}{'ratio':>7}{'dj f+b':>9}{'dw conv':>9}"
          f"{'ratio':>7}{'tv fwd':>9}{'tv f+b':>9}{'x tv':>6}{'temps f/fb MiB':>16}")
    for name in opts.stages:
        r = stage_case(STAGES[name], repeats, with_torch)
        report["results"][name] = {"shape": STAGES[name], **r}
        tv = (f"{r['torchvision_fwd']:>9.2f}{r['torchvision_fwd_bwd']:>9.2f}"
              f"{r['speedup_vs_torchvision_fwd_bwd']:>6.1f}" if with_torch else f"{'-':>9}" * 2
              + f"{'-':>6}")
        print(f"{name:<8}{r['deformjax_fwd']:>9.2f}{r['depthwise_conv_fwd']:>9.2f}"
              f"{r['fwd_vs_depthwise']:>7.2f}{r['deformjax_fwd_bwd']:>9.2f}"
              f"{r['depthwise_conv_fwd_bwd']:>9.2f}{r['fwd_bwd_vs_depthwise']:>7.2f}{tv}"
              f"{r['fwd_temp_mib']:>8.1f}/{r['fwd_bwd_temp_mib']:.1f}", flush=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
