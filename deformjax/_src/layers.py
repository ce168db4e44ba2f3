"""The layers' recipes, framework-neutral: what a layer computes from its parameters.

The linen and NNX front-ends (``_src/linen``, ``_src/nnx``) only create the
parameters (same names, shapes and layouts in both) and call these functions,
so a linen module and its NNX twin holding the same values compute the same
thing by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from deformjax._src import args, geometry
from deformjax._src.ops.deform_conv import deform_conv
from deformjax._src.ops.deform_roi_pool import deform_ps_roi_pool, deform_roi_pool
from deformjax._src.ops.dilated_conv import dilated_conv

_NHWC = ("NHWC", "HWIO", "NHWC")
_ZERO_PADDING_ONLY = ("CIRCULAR", "REFLECT", "CAUSAL")


# ----------------------------------------------------------------- convolutions


class ConvSpec(NamedTuple):
    """A convolution layer's static settings, checked, with its parameter shapes."""

    geometry: geometry.LayerGeometry
    c_in: int
    features: int
    feature_group_count: int
    offset_groups: int
    modulated: bool

    @property
    def taps(self) -> int:
        return self.geometry.kernel_size[0] * self.geometry.kernel_size[1]

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """``kernel``: ``(kh, kw, C_in // feature_group_count, features)`` (HWIO)."""
        return self.geometry.kernel_size + (self.c_in // self.feature_group_count, self.features)

    @property
    def offset_channels(self) -> int:
        """Channels of the offset branch: ``2 * G * K`` offsets, then ``G * K`` mask logits."""
        return (3 if self.modulated else 2) * self.offset_groups * self.taps

    @property
    def offset_kernel_shape(self) -> tuple[int, int, int, int]:
        """The offset branch's ``kernel``: ``(kh, kw, C_in, offset_channels)``."""
        return self.geometry.kernel_size + (self.c_in, self.offset_channels)


def conv_spec(
    fn: str,
    *,
    c_in: int,
    features: Any,
    kernel_size: Any,
    strides: Any,
    padding: Any,
    kernel_dilation: Any,
    feature_group_count: Any,
    offset_groups: Any = 1,
    modulated: bool = False,
    in_hw: Sequence[Any] | None = None,
) -> ConvSpec:
    """Checks a convolution module's attributes (errors name the module ``fn``)."""
    if isinstance(padding, str) and padding.upper() in _ZERO_PADDING_ONLY:
        raise args.fail(
            fn,
            "padding must be 'SAME', 'VALID', an int or pairs (deformable sampling reads zeros "
            f"outside the image); got {padding!r}",
        )
    geo = geometry.resolve(fn, kernel_size, strides, padding, kernel_dilation, in_hw=in_hw,
                           names=("kernel_size", "strides", "kernel_dilation"))
    groups = args.check_positive_int(fn, "offset_groups", offset_groups)
    fg = args.check_positive_int(fn, "feature_group_count", feature_group_count)
    for name, value in (("offset_groups", groups), ("feature_group_count", fg)):
        if c_in % value:
            raise args.fail(
                fn, f"{name} must divide the input channels; got {value} for {c_in} channels"
            )
    features = args.check_positive_int(fn, "features", features)
    if features % fg:
        raise args.fail(
            fn,
            f"features must be divisible by feature_group_count; got features {features} and "
            f"feature_group_count {fg}",
        )
    return ConvSpec(geo, c_in, features, fg, groups, bool(modulated))


def flatten_batch(fn: str, inputs: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """(*batch, H, W, C) -> (N, H, W, C), as flax's Conv does; returns the batch shape."""
    if inputs.ndim < 3:
        raise args.fail(
            fn, f"inputs must have shape (*batch, H, W, C) with rank >= 3; got {inputs.shape}"
        )
    batch = inputs.shape[:-3]
    return inputs.reshape((math.prod(batch),) + inputs.shape[-3:]), batch


def deform_conv_layer(
    spec: ConvSpec,
    inputs: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    offset_kernel: jax.Array,
    offset_bias: jax.Array,
    *,
    dtype: Any = None,
    precision: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``DeformConv``: the offset branch, then the deformable convolution.

    The offset branch is a convolution with the layer's own strides, padding
    and dilation; its output channels are the offsets in ``deform_conv``'s
    layout, then (modulated) the mask logits, through a sigmoid (mmcv's
    ``ModulatedDeformConv2dPack``).

    Args:
      spec: from :func:`conv_spec`.
      inputs: ``(N, H, W, C_in)``.
      kernel, bias: ``spec.kernel_shape`` and ``(features,)`` (or None).
      offset_kernel, offset_bias: ``spec.offset_kernel_shape`` and ``(offset_channels,)``.

    Returns:
      ``(out, offset, mask)``: ``(N, H_out, W_out, features)``, the offsets
      ``(N, H_out, W_out, 2 * G * K)`` and the mask ``(N, H_out, W_out, G * K)``
      or None.
    """
    geo, pairs = spec.geometry, 2 * spec.offset_groups * spec.taps
    x, k, b = promote_dtype(inputs, offset_kernel, offset_bias, dtype=dtype)
    raw = lax.conv_general_dilated(x, k, geo.strides, geo.padding, rhs_dilation=geo.dilation,
                                   dimension_numbers=_NHWC, precision=precision) + b
    offset = raw[..., :pairs]
    mask = jax.nn.sigmoid(raw[..., pairs:]) if spec.modulated else None
    x, offset, mask, kernel, bias = promote_dtype(inputs, offset, mask, kernel, bias, dtype=dtype)
    out = deform_conv(x, offset, kernel, mask, bias, strides=geo.strides, padding=geo.padding,
                      dilation=geo.dilation, feature_group_count=spec.feature_group_count,
                      precision=precision)
    return out, offset, mask


def dilated_conv_layer(
    spec: ConvSpec,
    inputs: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    *,
    dtype: Any = None,
    precision: Any = None,
) -> jax.Array:
    """``DilatedConv``: ``inputs`` ``(N, H, W, C_in)`` -> ``(N, H_out, W_out, features)``."""
    geo = spec.geometry
    x, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=dtype)
    return dilated_conv(x, kernel, bias, dilation=geo.dilation, strides=geo.strides,
                        padding=geo.padding, feature_group_count=spec.feature_group_count,
                        precision=precision)


# ----------------------------------------------------------------- RoI pooling


class RoIPoolSpec(NamedTuple):
    """``DeformRoIPool``'s static settings, checked, with its fully connected layers."""

    output_size: tuple[int, int]
    channels: int
    width: int
    modulated: bool

    @property
    def offset_layers(self) -> tuple[tuple[str, int, int], ...]:
        """``(name, in, out)`` of each offset layer; the last is zero-initialised."""
        oh, ow = self.output_size
        flat = oh * ow * self.channels
        return (("offset_fc_0", flat, self.width), ("offset_fc_1", self.width, self.width),
                ("offset_fc_2", self.width, oh * ow * 2))

    @property
    def mask_layers(self) -> tuple[tuple[str, int, int], ...]:
        """``(name, in, out)`` of each mask layer (modulated only); the last is zero-initialised."""
        if not self.modulated:
            return ()
        oh, ow = self.output_size
        return (("mask_fc_0", oh * ow * self.channels, self.width),
                ("mask_fc_1", self.width, oh * ow))


def roi_pool_spec(fn: str, *, channels: int, output_size: Any, deform_fc_channels: Any,
                  modulated: bool) -> RoIPoolSpec:
    oh, ow = args.as_pair(output_size, "output_size", fn)
    width = args.check_positive_int(fn, "deform_fc_channels", deform_fc_channels)
    return RoIPoolSpec((oh, ow), channels, width, bool(modulated))


def check_roi_inputs(fn: str, features: Any, rois: Any) -> tuple[jax.Array, jax.Array]:
    """Accepts what ``deform_roi_pool`` accepts (arrays, lists); checks the layouts."""
    features, rois = jnp.asarray(features), jnp.asarray(rois)
    args.check_rank(fn, "features", features, 4, "(N, H, W, C)")
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise args.fail(
            fn, f"rois must have shape (R, 5) [batch_index, x1, y1, x2, y2]; got {rois.shape}"
        )
    return features, rois


def _dense(x, kernel, bias, dtype, precision):
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                           precision=precision) + bias


def deform_roi_pool_layer(
    spec: RoIPoolSpec,
    features: jax.Array,
    rois: jax.Array,
    offset_params: Sequence[tuple[jax.Array, jax.Array]],
    mask_params: Sequence[tuple[jax.Array, jax.Array]] = (),
    *,
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    dtype: Any = None,
    precision: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``DeformRoIPool``: pool without offsets, fc layers predict them, pool again.

    The pooled RoI is flattened channels-last, ``(oh, ow, C)``; the offset
    layers (ReLU between them) give normalized ``(dy, dx)`` per bin; when
    modulated the mask layers give a sigmoid mask per bin (mmcv's
    ``DeformRoIPoolPack`` / ``ModulatedDeformRoIPoolPack``).

    Returns:
      ``(out, offset, mask)``: ``(R, oh, ow, C)``, ``(R, oh, ow, 2)`` and
      ``(R, oh, ow, 1)`` or None.
    """
    oh, ow = spec.output_size
    num_rois = rois.shape[0]

    def pool(features, offset=None, mask=None):
        return deform_roi_pool(features, rois, offset, mask, output_size=(oh, ow),
                               spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                               gamma=gamma)

    def mlp(x, params):
        for i, (kernel, bias) in enumerate(params):
            x = _dense(x, kernel, bias, dtype, precision)
            if i < len(params) - 1:
                x = jax.nn.relu(x)
        return x

    (features,) = promote_dtype(features, dtype=dtype)
    plain = pool(features).reshape(num_rois, oh * ow * features.shape[-1])
    offset = mlp(plain, offset_params).reshape(num_rois, oh, ow, 2)
    mask = None
    if spec.modulated:
        mask = jax.nn.sigmoid(mlp(plain, mask_params)).reshape(num_rois, oh, ow, 1)
    return pool(features, offset, mask), offset, mask


def ps_roi_pool_spec(fn: str, *, channels: int, output_size: Any) -> tuple[int, int]:
    """Checks ``DeformPSRoIPool``'s output size against the feature channels."""
    oh, ow = args.as_pair(output_size, "output_size", fn)
    if channels % (oh * ow):
        raise args.fail(
            fn,
            f"features.shape[-1] (in_features) must be C_out * oh * ow, a multiple of "
            f"oh * ow = {oh * ow} for a {oh}x{ow} output; got {channels}",
        )
    return oh, ow


def deform_ps_roi_pool_layer(
    output_size: tuple[int, int],
    features: jax.Array,
    rois: jax.Array,
    offset_kernel: jax.Array,
    offset_bias: jax.Array,
    *,
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    dtype: Any = None,
    precision: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """``DeformPSRoIPool`` (the deformable R-FCN head).

    A 1x1 convolution (``offset_kernel`` ``(1, 1, C, 2 * oh * ow)``) maps the
    features to an offset field that is PS-RoI-pooled, without offsets, into a
    normalized ``(dy, dx)`` per bin; then the features are PS-RoI-pooled with
    those offsets. Returns ``(out, offset)``: ``(R, oh, ow, C / (oh * ow))``
    and ``(R, oh, ow, 2)``.
    """
    kw = dict(output_size=output_size, spatial_scale=spatial_scale,
              sampling_ratio=sampling_ratio, gamma=gamma)
    x, kernel, bias = promote_dtype(features, offset_kernel, offset_bias, dtype=dtype)
    field = lax.conv_general_dilated(x, kernel, (1, 1), ((0, 0), (0, 0)),
                                     dimension_numbers=_NHWC, precision=precision) + bias
    offset = deform_ps_roi_pool(field, rois, **kw)
    (x,) = promote_dtype(features, dtype=dtype)
    return deform_ps_roi_pool(x, rois, offset.astype(x.dtype), **kw), offset
