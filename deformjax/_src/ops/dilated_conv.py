"""Dilated (atrous) convolution."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from deformjax._src import args, geometry

_FN = "dilated_conv"


def dilated_conv(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    dilation: int | tuple[int, int],
    strides: int | tuple[int, int] = 1,
    padding: Any = "SAME",
    feature_group_count: int = 1,
    precision: Any = None,
) -> jax.Array:
    """Atrous convolution (Yu & Koltun 2016; DeepLab).

    The kernel taps are spread ``dilation`` pixels apart, so a ``k x k`` kernel
    sees ``(k - 1) * dilation + 1`` pixels along each axis with ``k * k``
    weights. Same result as ``lax.conv_general_dilated(..., rhs_dilation=dilation)``
    in NHWC / HWIO, plus ``bias``.

    Args:
      x: input, ``(N, H, W, C_in)``.
      kernel: ``(kh, kw, C_in // feature_group_count, C_out)`` (HWIO).
      bias: optional ``(C_out,)``.
      dilation: int or ``(h, w)``, at least 1 (required).
      strides: int or ``(h, w)``, at least 1.
      padding: int, ``(ph, pw)``, ``((top, bottom), (left, right))``,
        ``'SAME'`` or ``'VALID'``; with ``'SAME'`` and stride 1 the output keeps
        ``H, W``.
      feature_group_count: weight groups, as in ``lax.conv_general_dilated``.
      precision: passed to ``lax.conv_general_dilated``.

    Returns:
      ``(N, H_out, W_out, C_out)`` in the promoted dtype of the inputs.

    Example:
      >>> import jax.numpy as jnp
      >>> from deformjax import dilated_conv
      >>> x = jnp.ones((1, 32, 32, 3))
      >>> kernel = jnp.ones((3, 3, 3, 8))
      >>> dilated_conv(x, kernel, dilation=4).shape
      (1, 32, 32, 8)
    """
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    bias = None if bias is None else jnp.asarray(bias)
    args.check_floating(_FN, x=x, kernel=kernel, bias=bias)
    geo, fg, _ = geometry.check_conv(
        _FN, x, kernel, bias, strides, padding, dilation, feature_group_count
    )

    dtype, acc = args.compute_dtypes(x, kernel, bias)
    out = lax.conv_general_dilated(
        x.astype(dtype),
        kernel.astype(dtype),
        window_strides=geo.strides,
        padding=geo.padding,
        rhs_dilation=geo.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=fg,
        precision=precision,
        preferred_element_type=acc,
    )
    if bias is not None:
        out = out + bias.astype(acc)
    return out.astype(dtype)
