"""Flax linen modules for deformable and dilated convolution.

Thin wrappers: each creates its parameters (named and initialised like
``flax.linen.Conv``) and calls the functional op.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from deformjax._src import args
from deformjax._src.ops.deform_conv import deform_conv
from deformjax._src.ops.dilated_conv import dilated_conv

Dtype = Any
Initializer = Any
PaddingLike = Any

default_kernel_init = nn.initializers.lecun_normal()


def _flatten_batch(fn: str, inputs: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """(*batch, H, W, C) -> (N, H, W, C), as flax.linen.Conv does; returns the batch shape."""
    if inputs.ndim < 3:
        raise args.fail(
            fn, f"inputs must have shape (*batch, H, W, C) with rank >= 3; got {inputs.shape}"
        )
    batch = inputs.shape[:-3]
    return inputs.reshape((math.prod(batch),) + inputs.shape[-3:]), batch


def _check_zero_padding(fn: str, padding: PaddingLike) -> None:
    if isinstance(padding, str) and padding.upper() in ("CIRCULAR", "REFLECT", "CAUSAL"):
        raise args.fail(
            fn,
            "padding must be 'SAME', 'VALID', an int or pairs (deformable sampling reads zeros "
            f"outside the image); got {padding!r}",
        )


def _check_divides(fn: str, name: str, value: int, channels: int) -> None:
    if channels % value:
        raise args.fail(
            fn, f"{name} must divide the input channels; got {value} for {channels} channels"
        )


def _check_features(module: nn.Module, fn: str, groups: int) -> int:
    features = args.check_positive_int(fn, "features", module.features)
    if features % groups:
        raise args.fail(
            fn,
            f"features must be divisible by feature_group_count; got features {features} and "
            f"feature_group_count {groups}",
        )
    return features


def _kernel_and_bias(module: nn.Module, kernel_size: tuple[int, int], c_in: int, groups: int):
    """The ``kernel`` (HWIO) and ``bias`` parameters, named and shaped as in ``nn.Conv``."""
    kernel = module.param(
        "kernel",
        module.kernel_init,
        kernel_size + (c_in // groups, module.features),
        module.param_dtype,
    )
    bias = None
    if module.use_bias:
        bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype)
    return kernel, bias


class DeformConv(nn.Module):
    """Deformable convolution with its own offset branch (DCN v1, or v2 when modulated).

    The offset branch is a ``flax.linen.Conv`` submodule named ``offset`` with
    the same kernel size, strides, padding and dilation, initialised to zero,
    so a fresh module computes a plain convolution (a fresh modulated module,
    whose mask is ``sigmoid(0) = 0.5``, half a convolution plus bias). Its
    ``2 * G * kh * kw`` output channels are the offsets in ``deform_conv``'s
    layout, then, when ``modulated``, ``G * kh * kw`` mask logits (mmcv's
    ``ModulatedDeformConv2dPack`` order). The offsets (and mask) are sown into
    the ``intermediates`` collection as ``offsets`` (and ``masks``; the name
    ``offset`` belongs to the branch submodule).

    Attributes:
      features: number of output channels.
      kernel_size: int or ``(kh, kw)``; an int means a square kernel.
      strides: int or ``(h, w)``.
      padding: ``'SAME'`` (default), ``'VALID'``, an int, ``(ph, pw)`` or
        ``((top, bottom), (left, right))``.
      kernel_dilation: int or ``(h, w)``.
      feature_group_count: weight groups of the main convolution.
      use_bias: whether to add a bias.
      dtype: the computation dtype (default: inferred from input and params).
      param_dtype: the dtype of the parameters.
      precision: passed to the convolutions.
      kernel_init: initializer of ``kernel`` ``(kh, kw, C_in // feature_group_count, features)``.
      bias_init: initializer of ``bias`` ``(features,)``.
      offset_groups: ``G``; input channels are split into ``G`` blocks, each
        with its own offsets.
      modulated: predict a modulation mask too (DCN v2).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from deformjax import DeformConv
      >>> layer = DeformConv(features=16, kernel_size=3, modulated=True)
      >>> x = jnp.ones((2, 12, 12, 8))
      >>> params = layer.init(jax.random.key(0), x)
      >>> jax.tree_util.tree_map(jnp.shape, params)["params"]["offset"]
      {'bias': (27,), 'kernel': (3, 3, 8, 27)}
      >>> y, state = layer.apply(params, x, mutable="intermediates")
      >>> y.shape, state["intermediates"]["offsets"][0].shape
      ((2, 12, 12, 16), (2, 12, 12, 18))
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    offset_groups: int = 1
    modulated: bool = False

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the layer to ``inputs`` ``(*batch, H, W, C_in)``; returns ``(*batch, H_out, W_out, features)``."""
        fn = "DeformConv"
        kernel_size = args.as_pair(self.kernel_size, "kernel_size", fn)
        strides = args.as_pair(self.strides, "strides", fn)
        dilation = args.as_pair(self.kernel_dilation, "kernel_dilation", fn)
        groups = args.check_positive_int(fn, "offset_groups", self.offset_groups)
        fg = args.check_positive_int(fn, "feature_group_count", self.feature_group_count)
        _check_zero_padding(fn, self.padding)
        inputs, batch = _flatten_batch(fn, inputs)
        c_in = inputs.shape[-1]
        _check_divides(fn, "offset_groups", groups, c_in)
        _check_divides(fn, "feature_group_count", fg, c_in)
        _check_features(self, fn, fg)
        window = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation))
        # One padding for both branches, so the offsets line up with the output.
        pads = args.as_padding(
            self.padding, fn, in_hw=inputs.shape[1:3], window_hw=window, strides=strides
        )
        taps = kernel_size[0] * kernel_size[1]
        raw = nn.Conv(
            (3 if self.modulated else 2) * groups * taps,
            kernel_size,
            strides=strides,
            padding=pads,
            kernel_dilation=dilation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=nn.initializers.zeros_init(),
            bias_init=nn.initializers.zeros_init(),
            name="offset",
        )(inputs)
        offset = raw[..., : 2 * groups * taps]
        mask = jax.nn.sigmoid(raw[..., 2 * groups * taps:]) if self.modulated else None
        self.sow("intermediates", "offsets", offset)
        if mask is not None:
            self.sow("intermediates", "masks", mask)

        kernel, bias = _kernel_and_bias(self, kernel_size, c_in, fg)
        inputs, offset, mask, kernel, bias = promote_dtype(
            inputs, offset, mask, kernel, bias, dtype=self.dtype
        )
        out = deform_conv(
            inputs,
            offset,
            kernel,
            mask,
            bias,
            strides=strides,
            padding=pads,
            dilation=dilation,
            feature_group_count=fg,
            precision=self.precision,
        )
        return out.reshape(batch + out.shape[1:])


class DilatedConv(nn.Module):
    """Dilated (atrous) convolution; parameters ``kernel`` and ``bias`` as in ``nn.Conv``.

    Attributes:
      features: number of output channels.
      kernel_size: int or ``(kh, kw)``; an int means a square kernel.
      kernel_dilation: int or ``(h, w)``, the spacing of the kernel taps;
        keyword-only (``DilatedConv(64, 3, 2)`` is a TypeError: a third
        positional argument means ``strides`` in ``nn.Conv`` and ``DeformConv``).
      strides: int or ``(h, w)``.
      padding: ``'SAME'`` (default, keeps ``H, W`` at stride 1), ``'VALID'``,
        an int, ``(ph, pw)`` or ``((top, bottom), (left, right))``.
      feature_group_count: weight groups.
      use_bias: whether to add a bias.
      dtype: the computation dtype (default: inferred from input and params).
      param_dtype: the dtype of the parameters.
      precision: passed to ``lax.conv_general_dilated``.
      kernel_init: initializer of ``kernel`` ``(kh, kw, C_in // feature_group_count, features)``.
      bias_init: initializer of ``bias`` ``(features,)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from deformjax import DilatedConv
      >>> layer = DilatedConv(features=8, kernel_size=3, kernel_dilation=4)
      >>> x = jnp.ones((1, 32, 32, 3))
      >>> params = layer.init(jax.random.key(0), x)
      >>> layer.apply(params, x).shape
      (1, 32, 32, 8)
    """

    features: int
    kernel_size: int | Sequence[int]
    # Keyword-only: a third positional argument means strides, as in nn.Conv
    # and DeformConv, never dilation.
    kernel_dilation: int | Sequence[int] = dataclasses.field(kw_only=True)
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the layer to ``inputs`` ``(*batch, H, W, C_in)``; returns ``(*batch, H_out, W_out, features)``."""
        fn = "DilatedConv"
        kernel_size = args.as_pair(self.kernel_size, "kernel_size", fn)
        strides = args.as_pair(self.strides, "strides", fn)
        dilation = args.as_pair(self.kernel_dilation, "kernel_dilation", fn)
        fg = args.check_positive_int(fn, "feature_group_count", self.feature_group_count)
        _check_zero_padding(fn, self.padding)
        inputs, batch = _flatten_batch(fn, inputs)
        c_in = inputs.shape[-1]
        _check_divides(fn, "feature_group_count", fg, c_in)
        _check_features(self, fn, fg)
        window = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation))
        pads = args.as_padding(
            self.padding, fn, in_hw=inputs.shape[1:3], window_hw=window, strides=strides
        )
        kernel, bias = _kernel_and_bias(self, kernel_size, c_in, fg)
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        out = dilated_conv(
            inputs,
            kernel,
            bias,
            dilation=dilation,
            strides=strides,
            padding=pads,
            feature_group_count=fg,
            precision=self.precision,
        )
        return out.reshape(batch + out.shape[1:])
