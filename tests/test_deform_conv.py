"""deform_conv against the float64 loop reference, identities, and autodiff checks."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from deformjax import deform_conv
from reference import deform_conv_reference


def make_inputs(rng, *, n=2, hw=(6, 6), c_in=4, c_out=4, kernel=(3, 3), groups=1, fg=1,
                out_hw=None, offsets="normal", mask=False, bias=True):
    h, w = hw
    ho, wo = out_hw if out_hw is not None else hw
    taps = kernel[0] * kernel[1]
    size = (n, ho, wo, 2 * groups * taps)
    if offsets == "normal":
        off = rng.normal(scale=1.5, size=size)
    elif offsets == "integer":
        off = rng.integers(-3, 4, size=size).astype(np.float64)
    elif offsets == "half":
        off = rng.integers(-6, 7, size=size) / 2.0
    elif offsets == "far":
        off = rng.normal(scale=10.0, size=size)
    elif offsets == "zero":
        off = np.zeros(size)
    elif offsets == "fractional":  # away from the kinks at integers, for finite differences
        off = rng.integers(-2, 3, size=size) + rng.uniform(0.2, 0.8, size=size)
    else:
        raise ValueError(offsets)
    return dict(
        x=rng.normal(size=(n, h, w, c_in)),
        offset=off,
        kernel=rng.normal(size=kernel + (c_in // fg, c_out)),
        mask=rng.uniform(0.1, 1.0, size=(n, ho, wo, groups * taps)) if mask else None,
        bias=rng.normal(size=(c_out,)) if bias else None,
    )


# (hw, c_in, c_out, kernel, strides, padding (pairs), dilation, fg, offset groups, mask, offsets)
GRID = {
    "base": ((6, 6), 4, 4, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, 1, False, "normal"),
    "integer_mask": ((6, 6), 4, 3, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, 1, True, "integer"),
    "fresh_layer_border": ((5, 6), 3, 2, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, 1, True, "zero"),
    "stride2_groups": ((7, 7), 4, 6, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), 2, 2, False, "normal"),
    "nonsquare_asym_pad": ((6, 7), 4, 2, (2, 3), (1, 2), ((1, 0), (2, 1)), (2, 1), 1, 1, True, "half"),
    "valid_dilation2": ((8, 7), 4, 3, (3, 3), (1, 1), ((0, 0), (0, 0)), (2, 2), 1, 2, False, "normal"),
    "far_outside": ((5, 5), 2, 3, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, 1, True, "far"),
    "pointwise_g4": ((5, 5), 4, 2, (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, 4, True, "normal"),
    "fg2_stride2_half": ((7, 6), 4, 4, (3, 3), (2, 2), ((2, 2), (2, 2)), (1, 1), 2, 1, True, "half"),
    "wide_kernel": ((5, 8), 2, 2, (3, 2), (1, 1), ((1, 1), (0, 0)), (1, 2), 1, 1, False, "integer"),
    "negative_padding": ((7, 7), 2, 2, (3, 3), (1, 1), ((-1, 1), (0, -1)), (1, 1), 1, 1, True, "normal"),
    # the kernel's rearrangements to the group-major columns (sampled_matmul._times_kernel):
    # offset groups finer than feature groups, and neither dividing the other
    "fg2_groups8": ((6, 6), 8, 4, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 2, 8, True, "normal"),
    "fg3_groups2": ((5, 5), 6, 3, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 3, 2, True, "normal"),
}


def out_hw(hw, kernel, strides, pads, dilation):
    return tuple(
        (s + lo + hi - (k - 1) * d - 1) // st + 1
        for s, k, st, (lo, hi), d in zip(hw, kernel, strides, pads, dilation)
    )


@pytest.mark.parametrize("case", sorted(GRID))
def test_matches_loop_reference(case, rng):
    hw, c_in, c_out, kernel, strides, pads, dilation, fg, groups, mask, offsets = GRID[case]
    inputs = make_inputs(
        rng, hw=hw, c_in=c_in, c_out=c_out, kernel=kernel, groups=groups, fg=fg, mask=mask,
        offsets=offsets, out_hw=out_hw(hw, kernel, strides, pads, dilation),
    )
    fn = functools.partial(
        deform_conv, strides=strides, padding=pads, dilation=dilation, feature_group_count=fg
    )
    keys = ["x", "offset", "kernel", "mask", "bias"]
    args = [inputs[k] for k in keys]
    out_ref = deform_conv_reference(
        *args, strides=strides, padding=pads, dilation=dilation, groups=fg
    )
    cotangent = rng.normal(size=out_ref.shape)
    _, grads_ref = deform_conv_reference(
        *args, strides=strides, padding=pads, dilation=dilation, groups=fg, cotangent=cotangent
    )

    @jax.jit
    def run(args, cotangent):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cotangent)

    out, grads = run(args, cotangent)
    np.testing.assert_allclose(out, out_ref, rtol=1e-10, atol=1e-10)
    for key, grad in zip(keys, grads):
        if inputs[key] is not None:
            np.testing.assert_allclose(grad, grads_ref[key], rtol=1e-10, atol=1e-10, err_msg=key)


CONV_CASES = [
    # strides, padding as given, dilation, fg, kernel
    ((1, 1), 1, (1, 1), 1, (3, 3)),
    ((2, 1), "SAME", (2, 2), 2, (3, 3)),
    ((1, 2), "VALID", (1, 3), 1, (2, 3)),
    (2, ((2, 0), (1, 2)), 1, 4, (3, 1)),
]


@pytest.mark.parametrize("strides, padding, dilation, fg, kernel", CONV_CASES)
def test_zero_offsets_equal_lax_conv(strides, padding, dilation, fg, kernel, rng):
    x = jnp.asarray(rng.normal(size=(2, 9, 8, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=kernel + (4 // fg, 8)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
    sp = (strides, strides) if isinstance(strides, int) else strides
    dl = (dilation, dilation) if isinstance(dilation, int) else dilation
    pads = padding
    if isinstance(padding, int):
        pads = ((padding, padding), (padding, padding))

    def plain(x, k, b):
        return lax.conv_general_dilated(
            x, k, sp, pads, rhs_dilation=dl, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=fg, precision="highest",
        ) + b

    expected = plain(x, k, b)
    n, ho, wo, _ = expected.shape
    offset = jnp.zeros((n, ho, wo, 2 * kernel[0] * kernel[1]), jnp.float32)
    ones = jnp.ones((n, ho, wo, kernel[0] * kernel[1]), jnp.float32)

    def deform(x, k, b, mask=None):
        return deform_conv(
            x, offset, k, mask, b, strides=strides, padding=padding, dilation=dilation,
            feature_group_count=fg, precision="highest",
        )

    out = jax.jit(deform)(x, k, b)
    assert out.dtype == jnp.float32 and out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(deform)(x, k, b, ones), expected, rtol=1e-5, atol=1e-5)
    ct = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)
    grads = jax.vjp(deform, x, k, b)[1](ct)
    grads_plain = jax.vjp(plain, x, k, b)[1](ct)
    for g, gp in zip(grads, grads_plain):
        np.testing.assert_allclose(g, gp, rtol=1e-4, atol=1e-4)


def test_integer_offsets_shift_the_input(rng):
    """All taps moved by the same integer (dy, dx) = a convolution of the shifted image."""
    x = rng.normal(size=(1, 7, 8, 3))
    k = rng.normal(size=(3, 3, 3, 2))
    dy, dx = 2, -1
    offset = np.tile([dy, dx], (1, 7, 8, 9)).astype(np.float64)
    # Sample (y, x) of the padded grid reads pixel (y + dy, x + dx), zero outside.
    big = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    shifted = big[:, 3 + dy: 3 + dy + 9, 3 + dx: 3 + dx + 10]
    expected = lax.conv_general_dilated(
        shifted, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(deform_conv(x, offset, k, padding=1), expected, atol=1e-12)


def test_shared_offset_groups_equal_one_group(rng):
    inputs = make_inputs(rng, c_in=4, groups=1, mask=True)
    one = deform_conv(**inputs, padding=1)
    offset2 = np.concatenate([inputs["offset"]] * 2, axis=-1)
    mask2 = np.concatenate([inputs["mask"]] * 2, axis=-1)
    two = deform_conv(inputs["x"], offset2, inputs["kernel"], mask2, inputs["bias"], padding=1)
    np.testing.assert_allclose(two, one, atol=1e-12)


def test_padding_forms_agree(rng):
    inputs = make_inputs(rng, hw=(6, 6), mask=True)
    results = [
        deform_conv(**inputs, padding=p) for p in (1, (1, 1), ((1, 1), (1, 1)), "SAME", "same")
    ]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_check_grads_non_integer_offsets(rng):
    inputs = make_inputs(rng, n=1, hw=(5, 5), c_in=2, c_out=2, groups=2, mask=True,
                         offsets="fractional")
    fn = functools.partial(deform_conv, strides=1, padding=1, dilation=1)
    args = tuple(inputs[k] for k in ("x", "offset", "kernel", "mask", "bias"))
    check_grads(fn, args, order=1, modes=("fwd", "rev"))


def test_vmap_matches_loop(rng):
    batched = [make_inputs(rng, n=1, mask=True) for _ in range(3)]
    stack = {k: np.stack([b[k] for b in batched]) for k in batched[0]}
    fn = functools.partial(deform_conv, padding=1)
    out = jax.jit(jax.vmap(fn))(stack["x"], stack["offset"], stack["kernel"], stack["mask"],
                                stack["bias"])
    for i, b in enumerate(batched):
        np.testing.assert_allclose(out[i], fn(**b), rtol=1e-12, atol=1e-12)


def test_dtypes(rng):
    inputs = make_inputs(rng, mask=True)
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    assert deform_conv(**f32, padding=1).dtype == jnp.float32
    assert deform_conv(**inputs, padding=1).dtype == jnp.float64
    with jax.numpy_dtype_promotion("standard"):
        mixed = dict(f32, offset=jnp.asarray(inputs["offset"], jnp.float64))
        assert deform_conv(**mixed, padding=1).dtype == jnp.float64


def test_derivative_chunks_grow_with_the_layer_within_bounds():
    """A derivative chunk holds 1/48 of the layer's im2col columns, within its
    smallest and largest size, and is a divisor of the rows where one of at
    least half the size exists (benchmarks/bench.py shapes: rows, K * C_in * 4)."""
    from deformjax._src import sampled_matmul

    smallest, largest = sampled_matmul._TANGENT_CHUNK_BYTES["cpu"]
    share = sampled_matmul._TANGENT_SHARE
    for rows, row_bytes in ((4096, 9 * 128 * 4), (32768, 9 * 64 * 4), (33600, 9 * 128 * 4),
                            (16384, 9 * 64 * 4), (8400, 9 * 256 * 4)):
        chunk = sampled_matmul.chunk_rows(rows, row_bytes, tangent=True)
        budget = min(max(smallest, rows * row_bytes // share), largest)
        assert rows % chunk == 0 and chunk * row_bytes <= budget < 2 * chunk * row_bytes
    # shape A (18.9 MB of columns) keeps the smallest chunks, CenterNet's 75.5 MB
    # get twice as many rows per chunk, R50 c3's 155 MB the largest
    assert sampled_matmul.chunk_rows(4096, 9 * 128 * 4, tangent=True) == 128
    assert sampled_matmul.chunk_rows(32768, 9 * 64 * 4, tangent=True) == 512
    assert sampled_matmul.chunk_rows(33600, 9 * 128 * 4, tangent=True) * 9 * 128 * 4 > smallest


def test_forward_chunks_grow_with_the_layer_within_bounds():
    """A forward chunk's columns and per-point arrays (``point_bytes`` per row)
    are at most 1/6 of the layer's im2col columns, within the chunk's smallest
    and largest size in columns (benchmarks/bench.py shapes)."""
    from deformjax._src import sampled_matmul

    smallest, largest = sampled_matmul._PRIMAL_CHUNK_BYTES["cpu"]
    share = sampled_matmul._PRIMAL_SHARE
    shapes = {"A": (4096, 128, 1), "centernet": (32768, 64, 1), "r50_c3": (33600, 128, 1),
              "r50_c4": (8400, 256, 4), "edvr": (16384, 64, 8), "depthwise": (25088, 64, 4)}
    chunks = {}
    for name, (rows, c_in, groups) in shapes.items():
        row_bytes, point_bytes = 9 * c_in * 4, 9 * groups * 48
        chunk = chunks[name] = sampled_matmul.chunk_rows(rows, row_bytes, tangent=False,
                                                         point_bytes=point_bytes)
        target = min(max(smallest // row_bytes,
                         rows * row_bytes // (share * (row_bytes + point_bytes))),
                     largest // row_bytes)
        assert rows % chunk == 0 and chunk <= target < 2 * chunk, name
    # the small layers keep the smallest chunks (4 MiB of columns); CenterNet's
    # 75.5 MB of columns get 4096-row chunks (9.4 MB), R50 c3's 155 MB the
    # largest (10 MiB: 2240 rows of 4608 bytes)
    assert chunks["A"] == 512 and chunks["edvr"] == 1024 and chunks["depthwise"] == 1792
    assert chunks["centernet"] == 4096 and chunks["r50_c3"] == 2240 and chunks["r50_c4"] == 1050


@pytest.mark.parametrize("shape", [(4, 64, 64, 64, 8), (2, 128, 128, 64, 1)],
                         ids=["edvr_g8", "centernet"])
def test_temporaries_stay_a_fraction_of_im2col(shape):
    """The chunk rules' promise (compiled, not run): forward temporaries at most
    0.25x and forward+backward at most 0.6x the im2col bytes N*H*W*9*C_in*4, at
    the benchmark shapes with the most per-point data (EDVR: 8 channels per
    offset group) and the largest chunks of the two (CenterNet)."""
    n, h, w, c, groups = shape
    x = jax.ShapeDtypeStruct((n, h, w, c), jnp.float32)
    offset = jax.ShapeDtypeStruct((n, h, w, 2 * groups * 9), jnp.float32)
    mask = jax.ShapeDtypeStruct((n, h, w, groups * 9), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, c, c), jnp.float32)

    def layer(x, offset, mask, kernel):
        return deform_conv(x, offset, kernel, mask, padding=1)

    def temps(fn):
        compiled = jax.jit(fn).lower(x, offset, mask, kernel).compile()
        return compiled.memory_analysis().temp_size_in_bytes / (n * h * w * 9 * c * 4)

    assert temps(layer) <= 0.25
    assert temps(jax.grad(lambda *a: (layer(*a) ** 2).sum(), argnums=(0, 1, 2, 3))) <= 0.6


def _kernel_sized_copies(fn, *args, size):
    """``(computation, instruction)`` of each copy or transpose of ``size`` elements
    that the compiled ``fn`` runs as a step of its own (not inside a fusion)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    bodies, name = {}, None
    for line in text.splitlines():
        header = re.match(r"(ENTRY )?%(\S+) .*\{$", line)
        if header:
            name = ("ENTRY " if header.group(1) else "") + header.group(2)
            bodies[name] = []
        elif name is not None:
            bodies[name].append(line.strip())
    fused = set(re.findall(r" fusion\(.*calls=%([\w.\-]+)", text))
    moves = {"parameter", "bitcast", "reshape", "copy", "transpose"}
    found = []
    for comp, lines in bodies.items():
        if comp in fused:
            continue
        for line in lines:
            match = re.match(r"(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* ([\w-]+)\(", line)
            if not match or math.prod(int(d) for d in match.group(1).split(",") if d) != size:
                continue
            op = match.group(2)
            if op == "fusion":
                called = re.search(r"calls=%([\w.\-]+)", line).group(1)
                steps = (re.match(r"(?:ROOT )?%\S+ = \S+ ([\w-]+)\(", x) for x in bodies[called])
                ops = {m.group(1) for m in steps if m}
                if not ops <= moves:
                    continue
            elif op not in ("copy", "transpose"):
                continue
            found.append((comp, line))
    return found


@pytest.mark.parametrize("groups", [1, 2])
def test_kernel_enters_the_chunk_loops_as_it_is(monkeypatch, groups):
    """The kernel reaches the chunks' matrix products without a copy in the loops.

    ``sampled_matmul.kernel_matrix`` arranges it once, before the loops: with
    several offset groups, into the columns' group-major row order (inside the
    loops XLA repeated that transpose in every chunk: R50 c4's forward -3%);
    with one, not at all (as ``(K, C_in / F, F, C_out / F)``, its degenerate
    ``F = 1`` axis made XLA copy all of it into another layout of the same
    bytes: shape A's forward -1..-6%, temporaries 0.17 -> 0.14x im2col)."""
    from deformjax._src import sampled_matmul

    monkeypatch.setitem(sampled_matmul._PRIMAL_CHUNK_BYTES, "cpu", (2**16, 2**16))
    monkeypatch.setitem(sampled_matmul._TANGENT_CHUNK_BYTES, "cpu", (2**16, 2**16))
    c = 16
    args = (jnp.ones((2, 12, 12, c)), jnp.zeros((2, 12, 12, 18 * groups)),
            jnp.ones((2, 12, 12, 9 * groups)), jnp.ones((3, 3, c, c)))

    def layer(x, offset, mask, kernel):
        return deform_conv(x, offset, kernel, mask, padding=1)

    assert "while" in jax.jit(layer).lower(*args).compile().as_text()  # chunked
    for fn in (layer, jax.grad(lambda *a: (layer(*a) ** 2).sum(), argnums=(0, 1, 2, 3))):
        copies = _kernel_sized_copies(fn, *args, size=9 * c * c)
        if groups == 1:
            assert copies == []
        else:  # the rearrangement (and, in the gradient, its transpose) once per call
            assert copies and all(comp.startswith("ENTRY") for comp, _ in copies), copies


def test_chunked_paths_match_one_chunk(rng, monkeypatch):
    """The row-chunked primal and derivative paths equal the single-chunk ones, to order 2.

    49 output rows: the primal's chunks of 6 overlap at the end, the derivatives'
    chunks of 4 pad the rows to 52."""
    from deformjax._src import sampled_matmul

    inputs = make_inputs(rng, n=1, hw=(7, 7), c_in=2, c_out=3, groups=2, mask=True,
                         offsets="fractional")
    args = tuple(inputs[k] for k in ("x", "offset", "kernel", "mask", "bias"))
    fn = functools.partial(deform_conv, padding=1)

    def grads(*args):
        return jax.grad(lambda *a: (fn(*a) ** 2).sum(), argnums=(0, 1, 2, 3, 4))(*args)

    one_out, one_grads = fn(*args), grads(*args)
    monkeypatch.setitem(sampled_matmul._PRIMAL_CHUNK_BYTES, "cpu", (6 * 144, 6 * 144))
    monkeypatch.setitem(sampled_matmul._TANGENT_CHUNK_BYTES, "cpu", (4 * 144, 4 * 144))
    jax.clear_caches()
    try:
        row_bytes = 9 * 2 * 8  # K * C_in * float64
        assert sampled_matmul.chunk_rows(49, row_bytes, tangent=False) == 6
        assert sampled_matmul.chunk_rows(49, row_bytes, tangent=True) == 4
        assert sampled_matmul.chunk_rows(48, row_bytes, tangent=False) == 6  # a divisor
        np.testing.assert_allclose(fn(*args), one_out, rtol=1e-12, atol=1e-12)
        for g, g1 in zip(grads(*args), one_grads):
            np.testing.assert_allclose(g, g1, rtol=1e-12, atol=1e-12)
        check_grads(fn, args, order=1, modes=("fwd",))
        check_grads(fn, args, order=2, modes=("rev",))
    finally:
        jax.clear_caches()
