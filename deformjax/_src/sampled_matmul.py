"""The deformable im2col matrix times a kernel, computed a chunk of rows at a time.

``deform_conv`` reduces to ``out = cols @ kernel`` where each row of ``cols``
holds the bilinear samples of one output position (``sampling.gather``). On a
CPU the speed of this step is set by memory traffic: a full ``cols`` matrix and
the per-corner temporaries of its backward pass do not fit in the caches. So:

* the primal is computed in a few statically unrolled chunks of rows, each a
  gather feeding a matrix product;
* derivatives (a ``custom_jvp`` whose tangent is linear, so reverse mode is
  its transpose) are computed chunk by chunk in a ``lax.map`` under
  ``jax.checkpoint``: each chunk recomputes its samples instead of saving them,
  and the chunk's columns, its four corner scatters and its matrix products
  stay in cache. Temporaries of a forward + backward pass stay below one
  im2col matrix.

The tangent rule is ordinary differentiable JAX, so forward mode, reverse
mode, and derivatives of any order all work, and all of them equal those of
the plain formula (the tests compare them with torchvision's gradients).
Accelerators get a single chunk; the choice is made per lowering platform.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from deformjax._src import sampling


class Spec(NamedTuple):
    """Static description of a sampled matrix product (hashable)."""

    taps: int  # K = kh * kw
    feature_groups: int  # F
    c_in: int
    c_out: int
    dtype: Any  # dtype of the columns and the kernel in the product
    acc_dtype: Any  # dtype of samples, weights and sums
    precision: Any
    primal_chunk: int | None  # rows per chunk of the primal on a CPU; None: one chunk
    tangent_chunk: int | None  # rows per chunk of derivatives on a CPU; None: one chunk


# Bytes of columns per chunk on the CPU, measured on a 2-core machine
# (benchmarks/bench.py): unrolled primal chunks of about 2.5 MB,
# derivative chunks of about 1.2 MB; at most _MAX_UNROLLED primal chunks.
# Accelerators get a single chunk. The policy is chosen when the computation
# is lowered (``lax.platform_dependent``), so ``jax.export`` for another
# platform, or for several, gets each platform's own.
_PRIMAL_CHUNK_BYTES = {"cpu": 5 * 2**19}
_TANGENT_CHUNK_BYTES = {"cpu": 5 * 2**18}
_MAX_UNROLLED = 32


def chunk_rows(rows: Any, row_bytes: int, *, tangent: bool) -> int | None:
    """Rows per chunk on the CPU, evened out over the chunks; None for one chunk.

    A symbolic row count (``jax.export`` with a symbolic batch or image size)
    gets one chunk: the number of chunks must be static.
    """
    table = _TANGENT_CHUNK_BYTES if tangent else _PRIMAL_CHUNK_BYTES
    if not isinstance(rows, int) or rows <= 1:
        return None
    count = -(-rows * row_bytes // table["cpu"])
    if not tangent:
        count = min(count, _MAX_UNROLLED)
    count = max(1, min(count, rows))
    return None if count == 1 else -(-rows // count)


def per_platform(fn, chunk, *operands):
    """``fn(chunk, *operands)`` on a CPU, ``fn(None, *operands)`` elsewhere."""
    if chunk is None:
        return fn(None, *operands)
    return lax.platform_dependent(
        *operands,
        cpu=functools.partial(fn, chunk),
        default=functools.partial(fn, None),
    )


def _rows(spec: Spec, image, index, weights, kmat, guard) -> jax.Array:
    """Output rows ``(M, C_out)`` in acc_dtype from samples ``(M, K * G)``."""
    rows = index.shape[0]
    cols = sampling.gather(image, index, weights, guard=guard)
    return _times_kernel(spec, cols.reshape(rows, spec.taps * spec.c_in), kmat)


def _times_kernel(spec: Spec, cols, kmat) -> jax.Array:
    rows, fg = cols.shape[0], spec.feature_groups
    cols = cols.astype(spec.dtype)
    if fg == 1:  # one plain matrix product, which XLA lays out best
        return jnp.dot(
            cols,
            kmat.reshape(spec.taps * spec.c_in, spec.c_out),
            precision=spec.precision,
            preferred_element_type=spec.acc_dtype,
        )
    out = jnp.einsum(
        "mkfc,kcfo->mfo",
        cols.reshape(rows, spec.taps, fg, spec.c_in // fg),
        kmat,
        precision=spec.precision,
        preferred_element_type=spec.acc_dtype,
    )
    return out.reshape(rows, spec.c_out)


def _pad_rows(array, total):
    return jnp.pad(array, [(0, total - array.shape[0])] + [(0, 0)] * (array.ndim - 1))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def sampled_matmul(spec: Spec, image, index, weights, kmat) -> jax.Array:
    """``gather(image, index, weights) @ kmat``, row chunk by row chunk.

    Args:
      spec: static shapes and settings.
      image: ``(N * H * W * G + 1, C_in / G)``, the input as rows of channel
        blocks, then the zero row (``sampling.with_zero_row``).
      index: ``(M, K * G, 4)`` int32 corner rows (``sampling.locate``).
      weights: ``(M, K * G, 4)`` bilinear weights (mask folded in).
      kmat: ``(K, C_in / F, F, C_out / F)`` kernel.

    Returns:
      ``(M, C_out)`` in ``spec.acc_dtype``.
    """
    return per_platform(functools.partial(_primal, spec), spec.primal_chunk,
                         image, index, weights, kmat)


def _primal(spec, chunk, image, index, weights, kmat):
    rows = index.shape[0]
    guard = sampling.bounds_guard(index)
    if chunk is None:
        return _rows(spec, image, index, weights, kmat, guard)
    pieces = [
        _rows(spec, image, index[start:start + chunk], weights[start:start + chunk], kmat, guard)
        for start in range(0, rows, chunk)
    ]
    return jnp.concatenate(pieces, axis=0)


def _sampled_matmul_jvp(spec, primals, tangents):
    image, index, weights, kmat = primals
    d_image, _, d_weights, d_kmat = tangents
    out = sampled_matmul(spec, image, index, weights, kmat)
    zero = lambda t: isinstance(t, SymbolicZero)  # noqa: E731
    if zero(d_image) and zero(d_weights) and zero(d_kmat):
        return out, jnp.zeros_like(out)

    has_image, has_weights, has_kmat = (not zero(t) for t in (d_image, d_weights, d_kmat))
    guard = sampling.bounds_guard(index)  # here, where index is a plain primal value

    def tangent_rows(index, weights, d_weights):
        rows = index.shape[0]
        t_cols = None
        if has_image:
            # No guard here: its transpose, the scatter into the image's
            # cotangent, must stay visible to XLA, which then accumulates it in
            # place across chunks instead of adding a full-size array per chunk.
            # In the weights' dtype (float32 at least): its transpose then
            # accumulates the image's cotangent in float32, not bfloat16 (more
            # exact, and 3-4x faster on a GPU, measured on an H200).
            t_cols = sampling.gather(d_image.astype(weights.dtype), index, weights)
        if has_weights:
            t = sampling.weighted_rows(image, index, d_weights, guard=guard)
            t_cols = t if t_cols is None else t_cols + t
        t_out = None
        if t_cols is not None:
            t_out = _times_kernel(spec, t_cols.reshape(rows, spec.taps * spec.c_in), kmat)
        if has_kmat:
            cols = sampling.gather(image, index, weights, guard=guard)
            t = _times_kernel(spec, cols.reshape(rows, spec.taps * spec.c_in), d_kmat)
            t_out = t if t_out is None else t_out + t
        return t_out

    if not has_weights:  # a placeholder, so that every operand can be chunked alike
        d_weights = jnp.zeros((index.shape[0], 0), weights.dtype)
    fn = jax.checkpoint(tangent_rows)

    def tangent(chunk, index, weights, d_weights):
        if chunk is None:
            return fn(index, weights, d_weights)
        rows = index.shape[0]
        count = -(-rows // chunk)
        chunked = [
            _pad_rows(a, count * chunk).reshape((count, chunk) + a.shape[1:])
            for a in (index, weights, d_weights)
        ]
        t_out = lax.map(lambda a: fn(*a), chunked)
        return t_out.reshape(count * chunk, spec.c_out)[:rows]

    return out, per_platform(tangent, spec.tangent_chunk, index, weights, d_weights)


sampled_matmul.defjvp(_sampled_matmul_jvp, symbolic_zeros=True)
