"""deform_conv and dcnv3 on whatever accelerator JAX sees, against lax.conv (cuDNN) and torchvision.

    python benchmarks/gpu.py                      # the real-model shapes, GPU batch sizes
    python benchmarks/gpu.py --smoke              # tiny sizes, a few seconds on a CPU
    python benchmarks/gpu.py --precision highest  # full float32 products, ours and lax.conv's

Shapes (NHWC, 3x3, padding 1, modulated, offsets ~ N(0, 2^2)): the layer shapes of
the performance issue, with the batch multiplied by --batch-scale (default 8 on an
accelerator, 1 on a CPU). For each shape and dtype (float32, bfloat16): deformjax
forward and forward+backward (loss sum(y**2); gradients of x, offset, mask and
kernel), lax.conv_general_dilated of the same size (the backend's own convolution,
cuDNN on NVIDIA GPUs), and, when torch with CUDA is importable, torchvision's
deform_conv2d (float32 only: it has no bfloat16). Each comparison is timed
interleaved (ours, peer, ours, peer, ...) after a warm-up; figures are medians in
milliseconds. deformjax runs with the chunk policy of the backend it is lowered
for (one chunk on accelerators). Matrix products and convolutions run at the
backend's default precision (TF32 for float32 on NVIDIA GPUs since Ampere)
unless --precision highest (full float32: torchvision's numbers).

Then ``dcnv3`` at InternImage-T's stage shapes (bench_dcnv3.py's, batch times
--batch-scale), float32 and bfloat16, forward and forward+backward (gradients
of x, offset and mask), against a depthwise 3x3 ``lax.conv`` of the same size
(the lower bound) and, in float32 when torch with CUDA is importable, the same
aggregation through torchvision's ``deform_conv2d`` with an all-ones depthwise
kernel. Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deformjax import deform_conv

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench  # noqa: E402  (the shapes and timing discipline of the CPU benchmark)
import bench_dcnv3  # noqa: E402
from deformjax import dcnv3  # noqa: E402

SHAPES = {name: shape for name, shape in bench.SHAPES.items() if name != "large"}


def smoke_shape(shape):
    n, h, w, c_in, c_out, groups, fg = shape
    scale = 8 if fg == 1 else 1  # depthwise keeps its channel count divisible
    return (1, max(4, h // 8), max(4, w // 8), c_in // scale, c_out // scale, groups, fg)


def median_ms(fns: dict, repeats: int) -> dict:
    """bench.py's interleaved medians, in milliseconds."""
    return {name: 1e3 * seconds for name, seconds in bench.interleaved(fns, repeats).items()}


def case(shape, dtype, repeats, torch_cuda, precision=None):
    n, h, w, c_in, c_out, groups, fg = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, h, w, c_in)), dtype)
    offset = jnp.asarray(rng.normal(scale=2.0, size=(n, h, w, 2 * groups * 9)), dtype)
    mask = jnp.asarray(rng.uniform(size=(n, h, w, groups * 9)), dtype)
    kernel = jnp.asarray(rng.normal(size=(3, 3, c_in // fg, c_out)) / np.sqrt(9 * c_in // fg),
                         dtype)

    def ours(x, offset, mask, kernel):
        return deform_conv(x, offset, kernel, mask, padding=1, feature_group_count=fg,
                           precision=precision)

    def conv(x, kernel):
        return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=fg, precision=precision)

    def loss(fn):
        return lambda *a: (fn(*a).astype(jnp.float32) ** 2).sum()

    fwd = jax.jit(ours)
    bwd = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2, 3)))
    conv_fwd = jax.jit(conv)
    conv_bwd = jax.jit(jax.grad(loss(conv), argnums=(0, 1)))
    run = jax.block_until_ready
    result = {}
    result.update(median_ms({"deformjax_fwd": lambda: run(fwd(x, offset, mask, kernel)),
                             "lax_conv_fwd": lambda: run(conv_fwd(x, kernel))}, repeats))
    result.update(median_ms({"deformjax_fwd_bwd": lambda: run(bwd(x, offset, mask, kernel)),
                             "lax_conv_fwd_bwd": lambda: run(conv_bwd(x, kernel))}, repeats))
    if torch_cuda is not None and dtype == jnp.float32:
        torch, torchvision = torch_cuda
        device = "cuda"

        def t(a, perm):
            return torch.tensor(np.asarray(a, np.float32).transpose(perm).copy(), device=device,
                                requires_grad=True)

        tx, to, tm = (t(a, (0, 3, 1, 2)) for a in (x, offset, mask))
        tw = t(kernel, (3, 2, 0, 1))

        def torch_fwd():
            with torch.no_grad():
                torchvision.ops.deform_conv2d(tx, to, tw, padding=1, mask=tm)
            torch.cuda.synchronize()

        def torch_fwd_bwd():
            out = torchvision.ops.deform_conv2d(tx, to, tw, padding=1, mask=tm)
            torch.autograd.grad((out ** 2).sum(), (tx, to, tm, tw))
            torch.cuda.synchronize()

        pair = median_ms({"ours": lambda: run(fwd(x, offset, mask, kernel)),
                          "torchvision_fwd": torch_fwd}, repeats)
        result["torchvision_fwd"] = pair["torchvision_fwd"]
        pair = median_ms({"ours": lambda: run(bwd(x, offset, mask, kernel)),
                          "torchvision_fwd_bwd": torch_fwd_bwd}, repeats)
        result["torchvision_fwd_bwd"] = pair["torchvision_fwd_bwd"]
    result["fwd_ratio_vs_lax_conv"] = result["deformjax_fwd"] / result["lax_conv_fwd"]
    result["fwd_bwd_ratio_vs_lax_conv"] = result["deformjax_fwd_bwd"] / result["lax_conv_fwd_bwd"]
    return result


def dcnv3_case(shape, dtype, repeats, torch_cuda):
    n, h, w, c, g = shape
    x, offset, mask = bench_dcnv3.inputs(shape)
    xj, oj, mj = (jnp.asarray(a, dtype) for a in (x, offset, mask))
    kernel = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 1, c)), dtype)

    def ours(x, offset, mask):
        return dcnv3(x, offset, mask, kernel_size=3, padding=1, groups=g)

    def depthwise(x, kernel):
        return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=c)

    def loss(fn):
        return lambda *a: (fn(*a).astype(jnp.float32) ** 2).sum()

    fwd, bwd = jax.jit(ours), jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))
    dw_fwd, dw_bwd = jax.jit(depthwise), jax.jit(jax.grad(loss(depthwise), argnums=(0, 1)))
    run = jax.block_until_ready
    result = {}
    result.update(median_ms({"deformjax_fwd": lambda: run(fwd(xj, oj, mj)),
                             "depthwise_conv_fwd": lambda: run(dw_fwd(xj, kernel))}, repeats))
    result.update(median_ms({"deformjax_fwd_bwd": lambda: run(bwd(xj, oj, mj)),
                             "depthwise_conv_fwd_bwd": lambda: run(dw_bwd(xj, kernel))},
                            repeats))
    if torch_cuda is not None and dtype == jnp.float32:
        torch, torchvision = torch_cuda
        tx, to, tm = (torch.tensor(a, device="cuda", requires_grad=True)
                      for a in bench_dcnv3.to_torchvision(x, offset, mask, g))
        ones = torch.ones(c, 1, 3, 3, device="cuda")

        def tv_out():
            return torchvision.ops.deform_conv2d(tx, to, ones, padding=1, mask=tm)

        def torch_fwd():
            with torch.no_grad():
                tv_out()
            torch.cuda.synchronize()

        def torch_fwd_bwd():
            torch.autograd.grad((tv_out() ** 2).sum(), (tx, to, tm))
            torch.cuda.synchronize()

        pair = median_ms({"ours": lambda: run(fwd(xj, oj, mj)),
                          "torchvision_fwd": torch_fwd}, repeats)
        result["torchvision_fwd"] = pair["torchvision_fwd"]
        pair = median_ms({"ours": lambda: run(bwd(xj, oj, mj)),
                          "torchvision_fwd_bwd": torch_fwd_bwd}, repeats)
        result["torchvision_fwd_bwd"] = pair["torchvision_fwd_bwd"]
    result["fwd_ratio_vs_depthwise"] = result["deformjax_fwd"] / result["depthwise_conv_fwd"]
    result["fwd_bwd_ratio_vs_depthwise"] = (result["deformjax_fwd_bwd"]
                                            / result["depthwise_conv_fwd_bwd"])
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 repeats (CPU test)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dcnv3-stages", nargs="*", default=list(bench_dcnv3.STAGES),
                        choices=list(bench_dcnv3.STAGES), help="none: skip DCNv3")
    parser.add_argument("--batch-scale", type=int, default=None,
                        help="multiply every batch (default 8 on an accelerator, 1 on a CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="default 20 (2 with --smoke)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16"])
    parser.add_argument("--precision", choices=["default", "highest"], default="default",
                        help="of the matrix products and convolutions, ours and lax.conv's "
                             "(default: the backend's, TF32 for float32 on NVIDIA GPUs; "
                             "highest: full float32, torchvision's numbers)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path("benchmarks/results/gpu-latest.json"))
    opts = parser.parse_args(argv)
    device = jax.devices()[0]
    accelerator = device.platform != "cpu"
    scale = opts.batch_scale or (8 if accelerator and not opts.smoke else 1)
    repeats = opts.repeats or (2 if opts.smoke else 20)
    torch_cuda = None
    if not opts.no_torch:
        try:
            import torch
            import torchvision

            if torch.cuda.is_available():
                torch_cuda = (torch, torchvision)
        except ImportError:
            pass
    report = {"device": f"{device.platform} {device.device_kind}", "jax": jax.__version__,
              "batch_scale": scale, "repeats": repeats, "smoke": opts.smoke,
              "precision": opts.precision,
              "torchvision": None if torch_cuda is None else torch_cuda[1].__version__,
              "results": {}}
    print(f"{report['device']}, jax {jax.__version__}, batch x{scale}, medians of {repeats}, ms, "
          f"precision {opts.precision}; "
          f"torchvision CUDA: {report['torchvision'] or 'no'}")
    print(f"{'shape':<14}{'dtype':<10}{'dj fwd':>9}{'conv':>9}{'ratio':>7}{'dj f+b':>9}"
          f"{'conv':>9}{'ratio':>7}{'tv fwd':>9}{'tv f+b':>9}")
    for name in opts.shapes:
        shape = smoke_shape(SHAPES[name]) if opts.smoke else SHAPES[name]
        shape = (shape[0] * scale,) + shape[1:]
        for dtype in (jnp.dtype(d) for d in opts.dtypes):
            r = case(shape, dtype, repeats, torch_cuda,
                     None if opts.precision == "default" else opts.precision)
            report["results"][f"{name}/{jnp.dtype(dtype).name}"] = {"shape": shape, **r}
            tv = "".join(f"{r[k]:>9.2f}" if k in r else f"{'-':>9}"
                         for k in ("torchvision_fwd", "torchvision_fwd_bwd"))
            print(f"{name:<14}{jnp.dtype(dtype).name:<10}{r['deformjax_fwd']:>9.2f}"
                  f"{r['lax_conv_fwd']:>9.2f}{r['fwd_ratio_vs_lax_conv']:>7.2f}"
                  f"{r['deformjax_fwd_bwd']:>9.2f}{r['lax_conv_fwd_bwd']:>9.2f}"
                  f"{r['fwd_bwd_ratio_vs_lax_conv']:>7.2f}{tv}", flush=True)
    if opts.dcnv3_stages:
        print(f"\n{'dcnv3':<14}{'dtype':<10}{'dj fwd':>9}{'dw conv':>9}{'ratio':>7}"
              f"{'dj f+b':>9}{'dw conv':>9}{'ratio':>7}{'tv fwd':>9}{'tv f+b':>9}")
    for name in opts.dcnv3_stages:
        n, h, w, c, g = bench_dcnv3.STAGES[name]
        if opts.smoke:
            n, h, w, c, g = 1, max(4, h // 8), max(4, w // 8), c // 4, g
        shape = (n * scale, h, w, c, g)
        for dtype in (jnp.dtype(d) for d in opts.dtypes):
            r = dcnv3_case(shape, dtype, repeats, torch_cuda)
            report["results"][f"dcnv3_{name}/{jnp.dtype(dtype).name}"] = {"shape": shape, **r}
            tv = "".join(f"{r[k]:>9.2f}" if k in r else f"{'-':>9}"
                         for k in ("torchvision_fwd", "torchvision_fwd_bwd"))
            print(f"{name:<14}{jnp.dtype(dtype).name:<10}{r['deformjax_fwd']:>9.2f}"
                  f"{r['depthwise_conv_fwd']:>9.2f}{r['fwd_ratio_vs_depthwise']:>7.2f}"
                  f"{r['deformjax_fwd_bwd']:>9.2f}{r['depthwise_conv_fwd_bwd']:>9.2f}"
                  f"{r['fwd_bwd_ratio_vs_depthwise']:>7.2f}{tv}", flush=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
