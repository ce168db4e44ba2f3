"""RoI pooling at detection scale, adaptive sampling, against torchvision's roi_align and
ps_roi_align.

    python benchmarks/bench_roi.py            # the four cases; prints a table, writes JSON
    python benchmarks/bench_roi.py --quick    # fewer repeats
    python benchmarks/bench_roi.py --smoke    # tiny sizes, one repeat (the test suite runs this)

Cases (NHWC, 7x7 bins, ``sampling_ratio=0``: torchvision's adaptive
``ceil(roi_size / 7)`` samples per bin and axis, float32):

* ``map200``: features (1, 200, 200, 64), 100 RoIs of 8-24 px.
* ``fpn_p2``: an FPN-P2-sized map (2, 200, 336, 256) at spatial scale 1, 1000 RoIs drawn
  like RPN proposals: log-uniform 4..200 px, aspect 0.5..2, centres over the map and
  10% past each border (so some cross it).
* ``multi_level``: P2..P5 of an 800x1344 image (2, 200/100/50/25, 336/168/84/42, 256),
  1000 RoIs in image pixels (log-uniform 16..800 px, aspect 0.5..2), each pooled from
  its level (mmdet's mapping, finest_scale 56) by ``multi_level_deform_roi_pool``;
  torchvision: one ``roi_align`` per level on that level's RoIs, summed.
* ``ps_rfcn``: the deformable R-FCN head, (1, 38, 63, 7 * 7 * 21) at spatial scale 1/16
  (a 600x1000 image), 300 RoIs of 32..512 image px: ``deform_ps_roi_pool`` against
  ``ps_roi_align``.

deformjax runs with offsets (normal, scale 0.1; they move the bins) and reports
forward and forward+backward (loss ``sum(y**2)``, gradients of the features and
the offsets) times and compiled temporaries (XLA's memory_analysis), and the
total number of bilinear samples the RoIs need. torchvision (optional import)
runs the same RoIs without offsets (it has none), forward and forward+backward
(gradient of the features), on the same numbers in NCHW, on the GPU when JAX runs
on one and torch has CUDA (synchronised after each call), else on the CPU. Timing: interleaved
after a warm-up, medians (bench.py's discipline).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from deformjax import deform_ps_roi_pool, deform_roi_pool, multi_level_deform_roi_pool, roi_levels

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench import interleaved, machine, torch  # noqa: E402  (one timing discipline, torch optional)

if torch is not None:
    import torchvision

OUT = 7
FINEST_SCALE = 56


def uniform_rois(rng, num, lo, hi, n, h, w):
    size = rng.uniform(lo, hi, size=(num, 2))
    centre = rng.uniform([0, 0], [w, h], size=(num, 2))
    batch = rng.integers(0, n, size=(num, 1))
    return np.concatenate([batch, centre - size / 2, centre + size / 2], 1).astype(np.float32)


def proposal_rois(rng, num, lo, hi, n, h, w):
    """RPN-like: log-uniform size, aspect 0.5..2, centres up to 10% past each border."""
    size = np.exp(rng.uniform(np.log(lo), np.log(hi), num))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), num))
    bw, bh = size * np.sqrt(aspect), size / np.sqrt(aspect)
    cx, cy = rng.uniform(-0.1 * w, 1.1 * w, num), rng.uniform(-0.1 * h, 1.1 * h, num)
    batch = rng.integers(0, n, num)
    return np.stack([batch, cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1).astype(
        np.float32)


def samples_needed(rois, scale):
    """Bilinear samples of the adaptive grids: sum over RoIs of 49 * ceil(h/7) * ceil(w/7)."""
    w = (rois[:, 3] - rois[:, 1]) * scale
    h = (rois[:, 4] - rois[:, 2]) * scale
    grid = np.maximum(np.ceil(h / OUT), 0) * np.maximum(np.ceil(w / OUT), 0)
    return int(np.sum(OUT * OUT * grid))


def compiled(fn, *args):
    """(the compiled callable, its temporaries in MiB): one compilation serves both."""
    exe = jax.jit(fn).lower(*args).compile()
    return exe, exe.memory_analysis().temp_size_in_bytes / 2**20


def make_case(name, smoke, rng):
    """(pool(features, offset), features, rois, offset, torch_fns(features) or None, info)."""
    if name == "map200":
        shape, num = ((1, 40, 40, 8), 10) if smoke else ((1, 200, 200, 64), 100)
        features = rng.normal(size=shape).astype(np.float32)
        rois = uniform_rois(rng, num, 8, 24, shape[0], shape[1], shape[2])
        scales = [1.0]
    elif name == "fpn_p2":
        shape, num = ((2, 40, 68, 8), 50) if smoke else ((2, 200, 336, 256), 1000)
        features = rng.normal(size=shape).astype(np.float32)
        rois = proposal_rois(rng, num, 4, 200 * shape[1] / 200, shape[0], shape[1], shape[2])
        scales = [1.0]
    elif name == "multi_level":
        n, h, w, c, num = (2, 40, 64, 8, 50) if smoke else (2, 200, 336, 256, 1000)
        features = [rng.normal(size=(n, h >> l, w >> l, c)).astype(np.float32) for l in range(4)]
        rois = proposal_rois(rng, num, 16, 800 * h / 200, n, 4 * h, 4 * w)
        scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    elif name == "ps_rfcn":
        n, h, w, c_out, num = (1, 10, 16, 2, 20) if smoke else (1, 38, 63, 21, 300)
        features = rng.normal(size=(n, h, w, OUT * OUT * c_out)).astype(np.float32)
        rois = proposal_rois(rng, num, 32, 512 * h / 38, n, 16 * h, 16 * w)
        scales = [1 / 16]
    else:
        raise ValueError(name)
    offset = rng.normal(scale=0.1, size=(rois.shape[0], OUT, OUT, 2)).astype(np.float32)
    rj = jnp.asarray(rois)

    if name == "multi_level":
        def pool(features, offset):
            return multi_level_deform_roi_pool(features, rj, offset, output_size=OUT,
                                               spatial_scales=scales, finest_scale=FINEST_SCALE)
        level = np.asarray(roi_levels(rj, 4, FINEST_SCALE))
        needed = sum(samples_needed(rois[level == l], scales[l]) for l in range(4))
    elif name == "ps_rfcn":
        def pool(features, offset):
            return deform_ps_roi_pool(features, rj, offset, output_size=OUT,
                                      spatial_scale=scales[0])
        needed = samples_needed(rois, scales[0])
    else:
        def pool(features, offset):
            return deform_roi_pool(features, rj, offset, output_size=OUT,
                                   spatial_scale=scales[0])
        needed = samples_needed(rois, scales[0])
    info = {"rois": int(rois.shape[0]), "samples": needed,
            "features": [list(f.shape) for f in features] if isinstance(features, list)
            else list(features.shape)}
    return pool, features, rois, offset, info, scales


def torch_device():
    """"cuda" when JAX runs on a GPU and torch sees one (then both time the GPU), else "cpu"."""
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def torch_fns(name, features, rois, scales):
    """torchvision forward and forward+backward on the same RoIs, no offsets, on the device
    JAX uses when torch has it (a CUDA GPU), else on the CPU."""
    device = torch_device()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if name == "multi_level":
        level = np.asarray(roi_levels(jnp.asarray(rois), 4, FINEST_SCALE))
        maps = [torch.tensor(f.transpose(0, 3, 1, 2).copy(), device=device, requires_grad=True)
                for f in features]
        parts = [(maps[l], torch.tensor(rois[level == l], device=device), scales[l])
                 for l in range(4)]
    else:
        maps = [torch.tensor(features.transpose(0, 3, 1, 2).copy(), device=device,
                             requires_grad=True)]
        parts = [(maps[0], torch.tensor(rois, device=device), scales[0])]
    op = torchvision.ops.ps_roi_align if name == "ps_rfcn" else torchvision.ops.roi_align

    def run(backward):
        loss = 0
        for fmap, r, scale in parts:
            kw = {} if name == "ps_rfcn" else {"aligned": True}
            loss = loss + (op(fmap, r, OUT, scale, 0, **kw) ** 2).sum()
        if backward:
            torch.autograd.grad(loss, maps)
        sync()

    def fwd():
        with torch.no_grad():
            run(False)

    return fwd, lambda: run(True)


def run_case(name, smoke, repeats, torch_repeats, with_torch):
    rng = np.random.default_rng(0)
    pool, features, rois, offset, info, scales = make_case(name, smoke, rng)
    fj = [jnp.asarray(f) for f in features] if isinstance(features, list) else jnp.asarray(features)
    oj = jnp.asarray(offset)

    def loss(f, o):
        return jnp.sum(pool(f, o) ** 2)

    result = dict(info)
    fwd, result["temp_mib_fwd"] = compiled(pool, fj, oj)
    fwd_bwd, result["temp_mib_fwd_bwd"] = compiled(jax.grad(loss, argnums=(0, 1)), fj, oj)
    result.update({k: v for k, v in interleaved({
        "deformjax_fwd": lambda: jax.block_until_ready(fwd(fj, oj)),
        "deformjax_fwd_bwd": lambda: jax.block_until_ready(fwd_bwd(fj, oj)),
    }, repeats).items()})
    if with_torch:
        tv_fwd, tv_fwd_bwd = torch_fns(name, features, rois, scales)
        result.update(interleaved({"torchvision_fwd": tv_fwd,
                                   "torchvision_fwd_bwd": tv_fwd_bwd}, torch_repeats))
        result["fwd_ratio_vs_torchvision"] = result["deformjax_fwd"] / result["torchvision_fwd"]
        result["fwd_bwd_ratio_vs_torchvision"] = (result["deformjax_fwd_bwd"]
                                                  / result["torchvision_fwd_bwd"])
    return result


CASES = ("map200", "fpn_p2", "multi_level", "ps_rfcn")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--repeats", type=int, default=None, help="default 7 (3 with --quick)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--no-torch", action="store_true", help="skip torchvision even if present")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path("benchmarks/results/roi-latest.json"))
    opts = parser.parse_args(argv)
    repeats = 1 if opts.smoke else opts.repeats or (3 if opts.quick else 7)
    with_torch = torch is not None and not opts.no_torch
    on_cuda = with_torch and torch_device() == "cuda"
    # torchvision's CPU kernels take seconds at detection scale: fewer repeats there
    torch_repeats = repeats if on_cuda else max(1, math.ceil(repeats / 2))
    report = {
        "machine": machine(with_torch),
        "smoke": opts.smoke,
        "repeats": repeats,
        "torch_repeats": torch_repeats,
        "torch_device": ("cuda" if on_cuda else "cpu") if with_torch else None,
        "cases": {},
    }
    print(f"jax {jax.__version__} on {report['machine']['device']}, {os.cpu_count()} cores "
          f"({report['machine']['cpu']}); "
          f"torchvision: {report['machine']['torchvision'] or 'not installed'}"
          f"{' (cuda)' if on_cuda else ''}; "
          f"medians, milliseconds; temporaries in MiB\n")
    print(f"{'case':<12}{'samples':>11}{'dj fwd':>9}{'dj f+b':>9}{'tmp fwd':>9}{'tmp f+b':>9}"
          f"{'tv fwd':>9}{'tv f+b':>9}{'f+b / tv':>10}")
    for name in opts.cases:
        r = run_case(name, opts.smoke, repeats, torch_repeats, with_torch)
        line = (f"{name:<12}{r['samples']:>11,}{r['deformjax_fwd'] * 1e3:>9.1f}"
                f"{r['deformjax_fwd_bwd'] * 1e3:>9.1f}{r['temp_mib_fwd']:>9.1f}"
                f"{r['temp_mib_fwd_bwd']:>9.1f}")
        if with_torch:
            line += (f"{r['torchvision_fwd'] * 1e3:>9.1f}{r['torchvision_fwd_bwd'] * 1e3:>9.1f}"
                     f"{r['fwd_bwd_ratio_vs_torchvision']:>10.2f}")
        print(line, flush=True)
        report["cases"][name] = r
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {opts.out}")
    return report


if __name__ == "__main__":
    main()
