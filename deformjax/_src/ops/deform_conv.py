"""Deformable convolution, v1 and modulated v2."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from deformjax._src import args, geometry, sampled_matmul

_FN = "deform_conv"


def deform_conv(
    x: jax.Array,
    offset: jax.Array,
    kernel: jax.Array,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    strides: int | tuple[int, int] = 1,
    padding: Any = 0,
    dilation: int | tuple[int, int] = 1,
    feature_group_count: int = 1,
    precision: Any = None,
) -> jax.Array:
    """Deformable convolution (DCN v1; modulated DCN v2 when ``mask`` is given).

    Every tap ``t = i * kw + j`` of the kernel samples the input at its regular
    grid position plus a learned fractional offset, with bilinear interpolation
    (zeros outside the image); the samples, times the modulation mask, are then
    contracted with the kernel. Numerically this is
    ``torchvision.ops.deform_conv2d`` with channels last, forward and every
    gradient.

    Args:
      x: input, ``(N, H, W, C_in)``.
      offset: ``(N, H_out, W_out, 2 * G * kh * kw)``, in pixels; the last axis
        is indexed ``(g * K + t) * 2 + {0: dy, 1: dx}``. The number of offset
        groups ``G`` (which must divide ``C_in``) is inferred from this size;
        input channel block ``g`` (of ``C_in / G`` contiguous channels) follows
        the offsets of group ``g``.
      kernel: ``(kh, kw, C_in // feature_group_count, C_out)`` (HWIO).
      mask: optional ``(N, H_out, W_out, G * kh * kw)``, indexed ``g * K + t``,
        multiplying each sample (DCN v2).
      bias: optional ``(C_out,)``.
      strides: int or ``(h, w)``, at least 1.
      padding: int, ``(ph, pw)``, ``((top, bottom), (left, right))``,
        ``'SAME'`` or ``'VALID'``, as in ``lax.conv_general_dilated``.
      dilation: int or ``(h, w)``, the kernel dilation, at least 1.
      feature_group_count: weight groups, as in ``lax.conv_general_dilated``.
      precision: passed to the contraction with the kernel. None follows JAX's
        default matmul precision, as ``lax.conv_general_dilated`` does: TF32 for
        float32 on NVIDIA GPUs since Ampere (about 1e-3 relative); ``"highest"``
        for full float32, torchvision's float32 numbers.

    Returns:
      ``(N, H_out, W_out, C_out)`` in the promoted dtype of the inputs. Sampling
      point of output ``(ho, wo)``, tap ``(i, j)``:
      ``y = ho * strides[0] - top + i * dilation[0] + dy`` and
      ``x = wo * strides[1] - left + j * dilation[1] + dx``.

    Example:
      >>> import jax.numpy as jnp
      >>> from deformjax import deform_conv
      >>> x = jnp.ones((2, 8, 8, 4))
      >>> offset = jnp.zeros((2, 8, 8, 2 * 3 * 3))
      >>> kernel = jnp.ones((3, 3, 4, 16))
      >>> deform_conv(x, offset, kernel, padding=1).shape
      (2, 8, 8, 16)
    """
    x, offset, kernel = jnp.asarray(x), jnp.asarray(offset), jnp.asarray(kernel)
    mask = None if mask is None else jnp.asarray(mask)
    bias = None if bias is None else jnp.asarray(bias)
    spec = _check(x, offset, kernel, mask, bias, strides, padding, dilation, feature_group_count)
    return _deform_conv(
        x,
        offset,
        kernel,
        mask,
        bias,
        strides=spec["strides"],
        pads=spec["pads"],
        dilation=spec["dilation"],
        feature_group_count=spec["feature_group_count"],
        precision=precision,
    )


@functools.partial(
    jax.jit, static_argnames=("strides", "pads", "dilation", "feature_group_count", "precision")
)
def _deform_conv(x, offset, kernel, mask, bias, *, strides, pads, dilation, feature_group_count,
                 precision):
    n, h, w, c_in = x.shape
    kh, kw, _, c_out = kernel.shape
    _, ho, wo, _ = offset.shape
    taps = kh * kw
    groups = offset.shape[-1] // (2 * taps)
    (sh, sw), (dh, dw), ((top, _), (left, _)) = strides, dilation, pads
    dtype, acc = args.compute_dtypes(x, offset, kernel, mask, bias)

    # The sampling points are computed per chunk of output rows from these
    # rows of offset and mask (sampled_matmul.locate), never for the whole output.
    fg = feature_group_count
    m = n * ho * wo
    row_bytes = taps * c_in * jnp.dtype(acc).itemsize
    # per output row, the forward's per-point arrays: int32 index and weights
    # of 4 corners, and the flat coordinates (y, x, the image's first row, the mask)
    point_bytes = taps * groups * (4 * 4 + 4 * jnp.dtype(acc).itemsize + 4
                                   + 3 * jnp.dtype(acc).itemsize)
    spec = sampled_matmul.Spec(
        batch=n,
        image_hw=(h, w),
        out_hw=(ho, wo),
        kernel_hw=(kh, kw),
        strides=(sh, sw),
        dilation=(dh, dw),
        origin=(top, left),
        groups=groups,
        modulated=mask is not None,
        feature_groups=fg,
        c_in=c_in,
        c_out=c_out,
        dtype=jnp.dtype(dtype),
        acc_dtype=jnp.dtype(acc),
        precision=precision,
        chunk=sampled_matmul.chunk_rows(m, row_bytes, tangent=False, point_bytes=point_bytes),
        tangent_chunk=sampled_matmul.chunk_rows(m, row_bytes, tangent=True),
    )
    out = sampled_matmul.deform_matmul(
        spec,
        x.astype(dtype).reshape(n * h * w * groups, c_in // groups),
        offset.reshape(m, groups * taps * 2),
        jnp.zeros((m, 0), acc) if mask is None else mask.reshape(m, groups * taps),
        sampled_matmul.kernel_matrix(spec, kernel.astype(dtype)),
    ).reshape(n, ho, wo, c_out)
    if bias is not None:
        out = out + bias.astype(acc)
    return out.astype(dtype)


def _check(x, offset, kernel, mask, bias, strides, padding, dilation, feature_group_count):
    args.check_floating(_FN, x=x, offset=offset, kernel=kernel, mask=mask, bias=bias)
    args.check_rank(_FN, "offset", offset, 4, "(N, H_out, W_out, 2 * offset_groups * kh * kw)")
    geo, fg, (out_h, out_w) = geometry.check_conv(
        _FN, x, kernel, bias, strides, padding, dilation, feature_group_count
    )
    n, h, w, c_in = x.shape
    if h < 1 or w < 1:
        raise args.fail(_FN, f"x must have H, W >= 1 to sample from; got shape {x.shape}")
    kh, kw = kernel.shape[:2]
    taps = kh * kw
    if offset.shape[:3] != (n, out_h, out_w):
        raise args.fail(
            _FN,
            f"offset.shape[:3] must be (N, H_out, W_out) = {(n, out_h, out_w)}; "
            f"got {offset.shape[:3]}",
        )
    if offset.shape[3] == 0 or offset.shape[3] % (2 * taps):
        raise args.fail(
            _FN,
            "offset.shape[-1] must be 2 * offset_groups * kh * kw; "
            f"got {offset.shape[3]} for a {kh}x{kw} kernel",
        )
    groups = offset.shape[3] // (2 * taps)
    if c_in % groups:
        raise args.fail(
            _FN,
            f"offset groups must divide x.shape[-1] (C_in); got {groups} offset groups "
            f"(offset.shape[-1] {offset.shape[3]}) for C_in {c_in}",
        )
    args.check_rows(_FN, n * h * w * groups + 1, f"N * H * W * offset_groups + 1 = "
                    f"{n} * {h} * {w} * {groups} + 1")
    if mask is not None:
        args.check_rank(_FN, "mask", mask, 4, "(N, H_out, W_out, offset_groups * kh * kw)")
        expected = (n, out_h, out_w, groups * taps)
        if mask.shape != expected:
            raise args.fail(
                _FN,
                f"mask.shape must be (N, H_out, W_out, offset_groups * kh * kw) = {expected}; "
                f"got {mask.shape}",
            )
    return dict(strides=geo.strides, dilation=geo.dilation, pads=geo.padding, feature_group_count=fg)
