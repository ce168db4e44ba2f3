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
from deformjax._src.ops import dcnv3 as dcnv3_op
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


# ----------------------------------------------------------------- DCNv3


def _uniform(bound: float):
    """Uniform in ``+-bound``: PyTorch's default ``Conv2d`` initialisation of kernel and
    bias with ``bound = 1 / sqrt(fan_in)`` (its ``kaiming_uniform_(a=sqrt(5))``)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


DCNV3_LAYERNORM_EPS = 1e-6  # InternImage's LayerNorm after the depthwise convolution


class DCNv3Spec(NamedTuple):
    """``DCNv3``'s static settings, checked."""

    channels: int
    kernel_size: tuple[int, int]
    dw_kernel_size: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    offset_scale: float
    center_feature_scale: bool
    remove_center: bool

    @property
    def points(self) -> int:
        """``P``: the sampling points of one group."""
        return self.kernel_size[0] * self.kernel_size[1] - int(self.remove_center)

    def params(self) -> dict[str, dict[str, tuple[tuple[int, ...], Any]]]:
        """``{layer: {parameter: (shape, initializer)}}``, InternImage's initialisation:
        xavier-uniform projections, PyTorch's default for the depthwise convolution,
        zero offset / mask / centre-scale layers, LayerNorm scale 1 and shift 0."""
        c, g, p = self.channels, self.groups, self.points
        kh, kw = self.dw_kernel_size
        zeros, ones = jax.nn.initializers.zeros, jax.nn.initializers.ones
        xavier = jax.nn.initializers.xavier_uniform()
        bound = 1 / math.sqrt(kh * kw)  # fan_in of a depthwise kernel
        table = {
            "input_proj": {"kernel": ((c, c), xavier), "bias": ((c,), zeros)},
            "dw_conv": {"kernel": ((kh, kw, 1, c), _uniform(bound)),
                        "bias": ((c,), _uniform(bound))},
            "dw_norm": {"scale": ((c,), ones), "bias": ((c,), zeros)},
            "offset": {"kernel": ((c, g * p * 2), zeros), "bias": ((g * p * 2,), zeros)},
            "mask": {"kernel": ((c, g * p), zeros), "bias": ((g * p,), zeros)},
            "output_proj": {"kernel": ((c, c), xavier), "bias": ((c,), zeros)},
        }
        if self.center_feature_scale:
            table["center_feature_scale_proj"] = {"kernel": ((c, g), zeros),
                                                  "bias": ((g,), zeros)}
        return table


def dcnv3_spec(fn: str, *, channels: Any, kernel_size: Any, dw_kernel_size: Any, strides: Any,
               padding: Any, dilation: Any, groups: Any, offset_scale: Any,
               center_feature_scale: Any, remove_center: Any) -> DCNv3Spec:
    """Checks ``DCNv3``'s settings (the core op's rules, and an output as large as the
    input, since the offsets are predicted at the input's positions)."""
    channels = args.check_positive_int(fn, "channels", channels)
    kernel_size = args.as_pair(kernel_size, "kernel_size", fn)
    dw_kernel_size = args.as_pair(kernel_size if dw_kernel_size is None else dw_kernel_size,
                                  "dw_kernel_size", fn)
    strides = args.as_pair(strides, "strides", fn)
    padding = args.as_pair(padding, "padding", fn, minimum=0)
    dilation = args.as_pair(dilation, "dilation", fn)
    groups = args.check_positive_int(fn, "groups", groups)
    if channels % groups:
        raise args.fail(fn, f"groups must divide channels; got channels {channels} and "
                        f"groups {groups}")
    if any(k % 2 == 0 for k in dw_kernel_size):
        raise args.fail(fn, f"dw_kernel_size must be odd (the depthwise convolution keeps the "
                        f"size); got {dw_kernel_size}")
    if strides != (1, 1) or any(2 * p != d * (k - 1)
                                for p, d, k in zip(padding, dilation, kernel_size)):
        raise args.fail(
            fn,
            "the output must be as large as the input (offsets are predicted at every input "
            "position): needs strides 1 and 2 * padding == dilation * (kernel_size - 1) on "
            f"each axis; got kernel_size {kernel_size}, strides {strides}, padding {padding}, "
            f"dilation {dilation}",
        )
    spec = dcnv3_op.check_settings(kernel_size=kernel_size, strides=strides, padding=padding,
                                   dilation=dilation, groups=groups, offset_scale=offset_scale,
                                   remove_center=remove_center, fn=fn)
    return DCNv3Spec(channels, kernel_size, dw_kernel_size, strides, padding, dilation, groups,
                     float(offset_scale), bool(center_feature_scale), spec["remove_center"])


def dcnv3_layer(
    spec: DCNv3Spec,
    inputs: jax.Array,
    params: dict[str, dict[str, jax.Array]],
    *,
    dtype: Any = None,
    precision: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``DCNv3``: InternImage's layer (``DCNv3_pytorch``) on ``inputs`` ``(N, H, W, C)``.

    ``xp = input_proj(x)``; ``x1 = GELU(LayerNorm(dw_conv(x)))`` (depthwise,
    from the raw input); offsets ``offset(x1)`` and a mask ``softmax`` over each
    group's ``P`` points of ``mask(x1)``; ``y = dcnv3(xp, offsets, mask)``; with
    centre-feature scaling ``s = sigmoid(center_feature_scale_proj(x1))`` per
    group and ``y = y * (1 - s) + xp * s``; then ``output_proj(y)``.

    Returns:
      ``(out, offset, mask)``: ``(N, H, W, C)``, ``(N, H, W, G * P * 2)`` and
      ``(N, H, W, G * P)`` in ``dcnv3``'s layout.
    """
    leaves, tree = jax.tree.flatten(params)
    x, *leaves = promote_dtype(inputs, *leaves, dtype=dtype)
    p = jax.tree.unflatten(tree, leaves)
    n, h, w, c = x.shape
    g, points = spec.groups, spec.points

    def dense(y, name):
        return _dense(y, p[name]["kernel"], p[name]["bias"], None, precision)

    xp = dense(x, "input_proj")
    kh, kw = spec.dw_kernel_size
    x1 = lax.conv_general_dilated(
        x, p["dw_conv"]["kernel"], (1, 1), (((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2),
        dimension_numbers=_NHWC, feature_group_count=c, precision=precision,
    ) + p["dw_conv"]["bias"]
    mean = x1.mean(axis=-1, keepdims=True)
    var = jnp.square(x1 - mean).mean(axis=-1, keepdims=True)  # biased, as torch's LayerNorm
    x1 = (x1 - mean) * lax.rsqrt(var + DCNV3_LAYERNORM_EPS) * p["dw_norm"]["scale"]
    x1 = jax.nn.gelu(x1 + p["dw_norm"]["bias"], approximate=False)
    offset = dense(x1, "offset")
    mask = jax.nn.softmax(dense(x1, "mask").reshape(n, h, w, g, points), axis=-1)
    mask = mask.reshape(n, h, w, g * points)
    y = dcnv3_op.dcnv3(xp, offset, mask, kernel_size=spec.kernel_size, strides=spec.strides,
                       padding=spec.padding, dilation=spec.dilation, groups=g,
                       offset_scale=spec.offset_scale, remove_center=spec.remove_center)
    if spec.center_feature_scale:
        s = jax.nn.sigmoid(dense(x1, "center_feature_scale_proj"))  # (N, H, W, G)
        s = jnp.repeat(s, c // g, axis=-1)
        y = y * (1 - s) + xp * s
    return dense(y, "output_proj"), offset, mask

