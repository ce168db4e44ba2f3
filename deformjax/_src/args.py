"""Argument normalisation and static validation shared by every op and module.

Each public function validates the static facts of its inputs (ranks, sizes,
dtypes, hyper-parameters) once, up front, and raises ``ValueError`` (or
``TypeError`` for a wrong kind of dtype) whose message names the function, the
argument, the rule and the values seen.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jax import lax
import numpy as np

Pair = tuple[int, int]
Padding = tuple[Pair, Pair]


def fail(fn: str, message: str) -> ValueError:
    """Returns (for the caller to raise) a ValueError prefixed by the function name."""
    return ValueError(f"{fn}: {message}")


def is_int(value: Any) -> bool:
    """True for Python / NumPy integers, False for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """True for Python / NumPy real numbers, False for bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def as_pair(value: Any, name: str, fn: str, *, minimum: int = 1) -> Pair:
    """Normalises an int-or-pair argument (``strides``, ``dilation``, ...) to ``(h, w)``.

    Raises ValueError unless it is an int or a sequence of two ints, each at
    least ``minimum``.
    """
    if is_int(value):
        pair = (int(value), int(value))
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(is_int(v) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise fail(fn, f"{name} must be an int or a pair of ints (h, w); got {value!r}")
    if min(pair) < minimum:
        raise fail(fn, f"{name} must be >= {minimum}; got {value!r}")
    return pair


def as_padding(
    padding: Any,
    fn: str,
    *,
    in_hw: Pair,
    window_hw: Pair,
    strides: Pair,
) -> Padding:
    """Normalises ``padding`` to ``((top, bottom), (left, right))``.

    Accepts what ``lax.conv_general_dilated`` accepts, plus the int and
    ``(ph, pw)`` shorthands: an int pads every side alike, ``(ph, pw)`` pads top
    and bottom by ``ph`` and left and right by ``pw``, and ``'SAME'`` /
    ``'VALID'`` (any case) have lax's meaning for the dilated window
    ``window_hw``.
    """
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "SAME_LOWER", "VALID"):
            raise fail(
                fn,
                "padding must be 'SAME', 'SAME_LOWER', 'VALID', an int or pairs; "
                f"got {padding!r}",
            )
        (top, bottom), (left, right) = lax.padtype_to_pads(
            in_hw, window_hw, strides, padding.upper()
        )
        return ((int(top), int(bottom)), (int(left), int(right)))
    if is_int(padding):
        p = int(padding)
        return ((p, p), (p, p))
    if isinstance(padding, Sequence) and len(padding) == 2:
        if all(is_int(p) for p in padding):
            ph, pw = (int(p) for p in padding)
            return ((ph, ph), (pw, pw))
        if all(
            isinstance(p, Sequence) and len(p) == 2 and all(is_int(q) for q in p)
            for p in padding
        ):
            (top, bottom), (left, right) = padding
            return ((int(top), int(bottom)), (int(left), int(right)))
    raise fail(
        fn,
        "padding must be an int, (ph, pw), ((top, bottom), (left, right)), 'SAME' or "
        f"'VALID'; got {padding!r}",
    )


def check_conv_kernel(fn: str, kernel_shape: tuple[int, ...], c_in: int, groups: int) -> None:
    """Checks an HWIO kernel against the input channels and ``feature_group_count``."""
    kh, kw, k_in, c_out = kernel_shape
    if min(kh, kw) < 1:
        raise fail(fn, f"kernel must have a non-empty window; got kernel.shape {kernel_shape}")
    if c_in != k_in * groups:
        raise fail(
            fn,
            "kernel.shape[2] * feature_group_count must equal x.shape[-1] (C_in); got "
            f"{k_in} * {groups} != {c_in}",
        )
    if c_out % groups:
        raise fail(
            fn,
            "feature_group_count must divide kernel.shape[-1] (C_out); got "
            f"C_out {c_out} and feature_group_count {groups}",
        )


# Largest count of image rows (the zero row included) that int32 indices address.
MAX_ROWS = 2**31 - 1


def check_rows(fn: str, rows: Any, formula: str) -> None:
    """Raises unless an image matrix of ``rows`` rows can be indexed with int32.

    A symbolic count (``jax.export``) is not checked: it is the caller's to keep
    within range.
    """
    if isinstance(rows, int) and rows > MAX_ROWS:
        raise fail(
            fn,
            f"the input is too large to index with int32: {formula} = {rows} image rows "
            f"(channel blocks) must be at most 2**31 - 1; split the batch",
        )


def check_rank(fn: str, name: str, array: Any, rank: int, layout: str) -> None:
    if np.ndim(array) != rank:
        raise fail(
            fn,
            f"{name} must have rank {rank} {layout}; got shape {tuple(np.shape(array))}",
        )


def check_floating(fn: str, **arrays: Any) -> None:
    """Raises TypeError unless every non-None array has a real floating dtype."""
    for name, array in arrays.items():
        if array is None:
            continue
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(f"{fn}: {name} must have a floating dtype; got {array.dtype}")


def check_positive_int(fn: str, name: str, value: Any) -> int:
    if not is_int(value) or value < 1:
        raise fail(fn, f"{name} must be a positive int; got {value!r}")
    return int(value)


def compute_dtypes(*arrays: Any) -> tuple[Any, Any]:
    """Returns ``(dtype, acc_dtype)``: JAX's promotion of the inputs, and the dtype
    in which coordinates, bilinear weights and sums are computed (at least float32)."""
    dtype = jnp.result_type(*(a for a in arrays if a is not None))
    acc_dtype = dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)
    return dtype, acc_dtype
