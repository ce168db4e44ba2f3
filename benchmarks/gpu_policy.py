"""deform_conv's forward+backward on an accelerator under alternative policies, interleaved.

    python benchmarks/gpu_policy.py              # batch x8 on an accelerator
    python benchmarks/gpu_policy.py --smoke      # tiny sizes, a few seconds on a CPU

The policy an accelerator gets is chosen from figures measured there, and
this script measures them: deform_conv (modulated, 3x3, padding 1, loss
``sum(y**2)``, gradients of x, offset, mask and kernel), float32, at
gpu.py's shapes, compiled once per policy and timed interleaved in one
process (medians, ms), with each compiled program's temporary bytes
(``memory_analysis``). The policies, applied while tracing by replacing
module-level settings of ``deformjax._src`` (a benchmark of internals, not
an API):

* ``shipped``: what the library does (one chunk; the derivative's sampling
  points written out once behind ``sampling.fenced``);
* ``no_fence``: the same without the fence (XLA fuses the points' arithmetic
  into each reader);
* ``tangent_chunks_NMiB``: the derivative evaluated in chunks of N MiB of
  columns (as on a CPU, where it is 1 MiB), the forward still one chunk;
* ``cpu_layout``: one chunk, with the CPU's flat coordinates and corner-major
  index and weights (``sampled_matmul._rows_flat`` and
  ``_tangent_points_flat``) instead of the per-point layout.

Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from deformjax import deform_conv
from deformjax._src import sampled_matmul, sampling

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench  # noqa: E402
import gpu  # noqa: E402


@contextlib.contextmanager
def policy(name: str):
    """Module settings of one policy while a function is traced."""
    saved_fenced, saved_per_platform = sampling.fenced, sampled_matmul.per_platform
    saved_layout = sampled_matmul._rows_by_point, sampled_matmul._tangent_points_by_point
    saved_tables = (dict(sampled_matmul._PRIMAL_CHUNK_BYTES),
                    dict(sampled_matmul._TANGENT_CHUNK_BYTES))
    try:
        if name == "no_fence":
            sampling.fenced = lambda fn, *operands: fn(*operands)
        elif name.startswith("tangent_chunks_"):
            mib = int(name.removeprefix("tangent_chunks_").removesuffix("MiB"))
            sampled_matmul._PRIMAL_CHUNK_BYTES["cpu"] = (2**62, 2**62)  # the forward: one chunk
            sampled_matmul._TANGENT_CHUNK_BYTES["cpu"] = (mib * 2**20, mib * 2**20)
            sampled_matmul.per_platform = lambda fn, chunk, *operands: fn(chunk, *operands)
        elif name == "cpu_layout":
            sampled_matmul._rows_by_point = sampled_matmul._rows_flat
            sampled_matmul._tangent_points_by_point = sampled_matmul._tangent_points_flat
        elif name != "shipped":
            raise ValueError(f"gpu_policy: unknown policy {name!r}")
        yield
    finally:
        sampling.fenced, sampled_matmul.per_platform = saved_fenced, saved_per_platform
        sampled_matmul._rows_by_point, sampled_matmul._tangent_points_by_point = saved_layout
        sampled_matmul._PRIMAL_CHUNK_BYTES.update(saved_tables[0])
        sampled_matmul._TANGENT_CHUNK_BYTES.update(saved_tables[1])


def case(shape, policies, repeats):
    x, offset, mask, kernel = (jnp.asarray(a) for a in bench.conv_inputs(shape))
    fg = shape[6]

    def loss(x, offset, mask, kernel):
        y = deform_conv(x, offset, kernel, mask, padding=1, feature_group_count=fg)
        return (y ** 2).sum()

    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    compiled, result = {}, {}
    for name in policies:
        with policy(name):
            jax.clear_caches()
            compiled[name] = jax.jit(grad).lower(x, offset, mask, kernel).compile()
        result[f"{name}_temp_bytes"] = int(compiled[name].memory_analysis().temp_size_in_bytes)
    reference = compiled[policies[0]](x, offset, mask, kernel)
    for name in policies[1:]:  # every policy computes the same gradients
        other = compiled[name](x, offset, mask, kernel)
        result[f"{name}_max_rel_diff"] = max(
            float(jnp.abs(a - b).max() / (jnp.abs(a).max() + 1e-30))
            for a, b in zip(reference, other))
    run = jax.block_until_ready
    times = gpu.median_ms({name: (lambda c=c: run(c(x, offset, mask, kernel)))
                           for name, c in compiled.items()}, repeats)
    result.update({f"{name}_ms": t for name, t in times.items()})
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--shapes", nargs="+", default=list(gpu.SHAPES), choices=list(gpu.SHAPES))
    parser.add_argument("--policies", nargs="+",
                        default=["shipped", "no_fence", "tangent_chunks_64MiB",
                                 "tangent_chunks_256MiB"])
    parser.add_argument("--batch-scale", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path("benchmarks/results/gpu-policy-latest.json"))
    opts = parser.parse_args(argv)
    device = jax.devices()[0]
    scale = opts.batch_scale or (8 if device.platform != "cpu" and not opts.smoke else 1)
    repeats = opts.repeats or (2 if opts.smoke else 20)
    report = {"device": f"{device.platform} {device.device_kind}", "jax": jax.__version__,
              "batch_scale": scale, "repeats": repeats, "results": {}}
    print(f"{report['device']}, jax {jax.__version__}, batch x{scale}, float32 fwd+bwd, "
          f"medians of {repeats}, ms (temporaries, MB)")
    print(f"{'shape':<14}" + "".join(f"{p:>24}" for p in opts.policies))
    for name in opts.shapes:
        shape = gpu.smoke_shape(gpu.SHAPES[name]) if opts.smoke else gpu.SHAPES[name]
        shape = (shape[0] * scale,) + shape[1:]
        r = case(shape, opts.policies, repeats)
        report["results"][name] = {"shape": shape, **r}
        print(f"{name:<14}" + "".join(
            f"{r[p + '_ms']:>14.2f} ({r[p + '_temp_bytes'] / 1e6:>7.1f})" for p in opts.policies),
            flush=True)
        bad = {k: v for k, v in r.items() if k.endswith("_max_rel_diff") and not v < 1e-4}
        if bad:
            print(f"  policies disagree: {bad}")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {opts.out}")
    return report


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
