"""deform_conv's CPU forward against its floor: the same program without the sampling arithmetic.

    python benchmarks/sampling_floor.py                  # bench.py's shapes
    python benchmarks/sampling_floor.py --shapes edvr_g8 centernet --repeats 21
    taskset -c 0 python benchmarks/sampling_floor.py     # one core

The floor is deform_conv's forward (modulated, 3x3, padding 1, float32, as in
bench.py) compiled with each chunk's corner index and weights read from a
precomputed array instead of computed from its offsets and mask: chunk 0's,
made to depend on the chunk (XLA would otherwise compute the loop-invariant
gather and product once for all chunks). What remains is the loop, the
slices, the gather of the columns, the matrix product and the output update;
what is gone is the coordinates, the weights and the index
(``sampled_matmul._read_corners_flat``: two fences and the index's select). The
floor's ratio to ``lax.conv_general_dilated`` is the best the forward could
reach with XLA's gather on the machine; its difference to the forward is
what the sampling arithmetic costs. A third program, the product, goes one
step further: each chunk's columns are chunk 0's, precomputed (the kernel
made to depend on the chunk, a small elementwise step, so that XLA cannot
hoist the product out of the loop); what remains is the loop, the matrix
products and the output update, the least any design that gathers the
columns and then multiplies them can take; the floor's difference to it is
what the gather of the columns costs. A benchmark of internals, on a CPU
only (other platforms take another path).

Each program is compiled once and timed interleaved with the others (medians
of per-round medians of 20 calls, ms). Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deformjax import deform_conv
from deformjax._src import sampled_matmul, sampling

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench import SHAPES, conv_inputs, cpu_model  # noqa: E402


def layer_spec(fn, *args) -> sampled_matmul.Spec:
    """The ``sampled_matmul.Spec`` that ``fn`` passes to ``deform_matmul`` when traced."""
    seen = []
    original = sampled_matmul.deform_matmul

    def spy(spec, *operands):
        seen.append(spec)
        return original(spec, *operands)

    sampled_matmul.deform_matmul = spy
    try:
        jax.clear_caches()
        jax.eval_shape(fn, *args)
    finally:
        sampled_matmul.deform_matmul = original
    return seen[0]


def first_chunk_points(spec, offset, mask):
    """Chunk 0's corner index and weights ``(4, chunk * G * K)``, as the forward computes them."""
    rows = spec.chunk or spec.rows
    return sampled_matmul._read_corners_flat(spec, sampled_matmul.origins(spec)[:rows],
                                             offset.reshape(spec.rows, -1)[:rows],
                                             mask.reshape(spec.rows, -1)[:rows])


def floor_corners(index, weights, spec, origin, offset, mask):
    """``_read_corners_flat`` answered with the given index and weights, not computed."""
    if index.shape[1] != offset.shape[0] * spec.groups * spec.taps:
        # not a chunk of the CPU loop (the one-chunk branch traced for other
        # platforms): the real thing, never run here
        return floor_corners.real(spec, origin, offset, mask)
    # depend on the chunk (origin[0, 0] >= 0), so that the gather stays in the loop
    return (jnp.minimum(index, index + origin[0, 0]),
            jnp.where(origin[0, 0] >= 0, weights, 2 * weights))


floor_corners.real = sampled_matmul._read_corners_flat


def first_chunk_columns(image, index, weights):
    """Chunk 0's columns ``(chunk * G * K, C_in / G)`` from its index and weights, as the
    forward gathers them (``image``: the input as rows of channel blocks)."""
    return sampling.gather_leading(image, index, weights, guard=sampling.bounds_guard(index))


def product_rows(cols, spec, image, origin, offset, mask, kmat):
    """``_rows_flat`` answered with the given columns: the chunk's product only."""
    if cols.shape[0] != offset.shape[0] * spec.groups * spec.taps:
        return product_rows.real(spec, image, origin, offset, mask, kmat)  # as floor_corners
    # depend on the chunk through the kernel (small), so that the product stays in the loop
    kmat = jnp.where(origin[0, 0] >= 0, kmat, 2 * kmat)
    return sampled_matmul._times_kernel(spec, cols.reshape(offset.shape[0], -1), kmat)


product_rows.real = sampled_matmul._rows_flat


def case(shape, repeats):
    fg = shape[6]  # feature groups
    x, offset, mask, kernel = (jnp.asarray(a) for a in conv_inputs(shape))

    def layer(x, offset, mask, kernel):
        return deform_conv(x, offset, kernel, mask, padding=1, feature_group_count=fg)

    def plain(x, kernel):
        return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=fg)

    spec = layer_spec(layer, x, offset, mask, kernel)
    index, weights = first_chunk_points(spec, offset, mask)
    cols = first_chunk_columns(x.reshape(-1, spec.c_in // spec.groups), index, weights)
    compiled = {}
    for name in ("forward", "floor", "product"):
        if name == "floor":
            sampled_matmul._read_corners_flat = functools.partial(floor_corners, index,
                                                                  weights)
        if name == "product":
            sampled_matmul._rows_flat = functools.partial(product_rows, cols)
        try:
            # jax.clear_caches() between the variants: deform_conv's inner jit would
            # otherwise keep the first one's trace. Compiled executables are kept,
            # not jitted functions, whose caches clear_caches() empties too.
            jax.clear_caches()
            compiled[name] = jax.jit(lambda *a: layer(*a)).lower(x, offset, mask, kernel).compile()
        finally:
            sampled_matmul._read_corners_flat = floor_corners.real
            sampled_matmul._rows_flat = product_rows.real
    plain_fn = jax.jit(plain).lower(x, kernel).compile()
    calls = {
        "forward": lambda: compiled["forward"](x, offset, mask, kernel),
        "floor": lambda: compiled["floor"](x, offset, mask, kernel),
        "product": lambda: compiled["product"](x, offset, mask, kernel),
        "lax_conv": lambda: plain_fn(x, kernel),
    }
    one_chunk_diff = one_chunk_product_diff = None
    if spec.chunk is None:  # one chunk: the floor's index and weights are the layer's own
        one_chunk_diff = float(jnp.max(jnp.abs(calls["forward"]() - calls["floor"]())))
        one_chunk_product_diff = float(jnp.max(jnp.abs(calls["forward"]() - calls["product"]())))
    for call in calls.values():
        jax.block_until_ready(call())
    rounds = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times = []
            for _ in range(20):
                start = time.perf_counter()
                jax.block_until_ready(call())
                times.append(time.perf_counter() - start)
            rounds[name].append(float(np.median(times)))
    ms = {name: float(np.median(t)) * 1e3 for name, t in rounds.items()}
    return {
        "shape_n_h_w_cin_cout_groups_fgroups": list(shape),
        "chunk_rows": spec.chunk or spec.rows,
        "sampling_points": spec.rows * spec.groups * spec.taps,
        "forward_ms": ms["forward"],
        "floor_ms": ms["floor"],
        "product_ms": ms["product"],
        "lax_conv_ms": ms["lax_conv"],
        "forward_over_lax_conv": ms["forward"] / ms["lax_conv"],
        "floor_over_lax_conv": ms["floor"] / ms["lax_conv"],
        "product_over_lax_conv": ms["product"] / ms["lax_conv"],
        "sampling_ms": ms["forward"] - ms["floor"],
        "gather_ms": ms["floor"] - ms["product"],
        "one_chunk_max_abs_diff": one_chunk_diff,
        "one_chunk_product_max_abs_diff": one_chunk_product_diff,
        # the fences (sampling.fenced) and guards the compiled programs run
        "forward_conditionals": compiled["forward"].as_text().count(" conditional("),
        "floor_conditionals": compiled["floor"].as_text().count(" conditional("),
        # the gathers of the columns (four corners), which the product program has none of
        "forward_gathers": compiled["forward"].as_text().count(" gather("),
        "product_gathers": compiled["product"].as_text().count(" gather("),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES),
                        default=["small", "A", "r50_c3", "r50_c4_g4", "edvr_g8", "centernet",
                                 "depthwise_g4"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    opts = parser.parse_args(argv)
    if jax.default_backend() != "cpu":
        parser.error(f"measures the CPU path; JAX's default backend is {jax.default_backend()}")
    report = {"jax": jax.__version__, "cpu": cpu_model(), "repeats": opts.repeats, "cases": {}}
    print(f"jax {jax.__version__}, {report['cpu']}; medians of {opts.repeats} interleaved "
          "rounds, milliseconds\n")
    print(f"{'shape':<14}{'forward':>9}{'floor':>9}{'product':>9}{'lax.conv':>10}{'fwd/conv':>10}"
          f"{'floor/conv':>12}{'prod/conv':>11}{'sampling':>10}{'gather':>9}")
    for name in opts.shapes:
        r = case(SHAPES[name], opts.repeats)
        report["cases"][name] = r
        print(f"{name:<14}{r['forward_ms']:>9.3f}{r['floor_ms']:>9.3f}{r['product_ms']:>9.3f}"
              f"{r['lax_conv_ms']:>10.3f}{r['forward_over_lax_conv']:>10.2f}"
              f"{r['floor_over_lax_conv']:>12.2f}{r['product_over_lax_conv']:>11.2f}"
              f"{r['sampling_ms']:>10.3f}{r['gather_ms']:>9.3f}", flush=True)
    if opts.out is not None:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
