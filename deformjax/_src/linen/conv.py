"""Flax linen modules for deformable and dilated convolution.

Thin front-ends: each creates its parameters (named and initialised like
``flax.linen.Conv``) and calls its recipe in ``deformjax._src.layers``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer, PaddingLike, PrecisionLike

from deformjax._src import layers

default_kernel_init = nn.initializers.lecun_normal()


class _Weights(nn.Module):
    """Holds a ``kernel`` and a ``bias`` (e.g. the offset branch), as ``nn.Conv`` names them."""

    kernel_shape: tuple[int, ...]
    bias_shape: tuple[int, ...]
    param_dtype: Dtype
    kernel_init: Initializer
    bias_init: Initializer

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", self.kernel_init, self.kernel_shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, self.bias_shape, self.param_dtype)
        return kernel, bias


def _spec(module: nn.Module, inputs: jax.Array) -> layers.ConvSpec:
    return layers.conv_spec(
        type(module).__name__, c_in=inputs.shape[-1], features=module.features,
        kernel_size=module.kernel_size, strides=module.strides, padding=module.padding,
        kernel_dilation=module.kernel_dilation, feature_group_count=module.feature_group_count,
        offset_groups=getattr(module, "offset_groups", 1),
        modulated=getattr(module, "modulated", False), in_hw=inputs.shape[1:3],
    )


def _kernel_and_bias(module: nn.Module, spec: layers.ConvSpec):
    """The ``kernel`` (HWIO) and ``bias`` parameters, named and shaped as in ``nn.Conv``."""
    kernel = module.param("kernel", module.kernel_init, spec.kernel_shape, module.param_dtype)
    bias = None
    if module.use_bias:
        bias = module.param("bias", module.bias_init, (spec.features,), module.param_dtype)
    return kernel, bias


class DeformConv(nn.Module):
    """Deformable convolution with its own offset branch (DCN v1, or v2 when modulated).

    The offset branch is a submodule named ``offset`` holding a ``kernel``
    ``(kh, kw, C_in, 2 * G * kh * kw)`` (``3 * G * kh * kw`` when modulated) and
    a ``bias``, a convolution with the same strides, padding and dilation,
    initialised to zero, so a fresh module computes a plain convolution (a
    fresh modulated module, whose mask is ``sigmoid(0) = 0.5``, half a
    convolution plus bias). Its output channels are the offsets in
    ``deform_conv``'s layout, then, when ``modulated``, ``G * kh * kw`` mask
    logits (mmcv's ``ModulatedDeformConv2dPack`` order). The offsets (and mask)
    are sown into the ``intermediates`` collection as ``offsets`` (and
    ``masks``; the name ``offset`` belongs to the branch submodule).

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
    precision: PrecisionLike = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    offset_groups: int = 1
    modulated: bool = False

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the layer to ``inputs`` ``(*batch, H, W, C_in)``; returns ``(*batch, H_out, W_out, features)``."""
        inputs, batch = layers.flatten_batch("DeformConv", jnp.asarray(inputs))
        spec = _spec(self, inputs)
        zeros = nn.initializers.zeros_init()
        offset_kernel, offset_bias = _Weights(
            spec.offset_kernel_shape, (spec.offset_channels,), self.param_dtype, zeros, zeros,
            name="offset",
        )()
        kernel, bias = _kernel_and_bias(self, spec)
        out, offset, mask = layers.deform_conv_layer(
            spec, inputs, kernel, bias, offset_kernel, offset_bias, dtype=self.dtype,
            precision=self.precision,
        )
        self.sow("intermediates", "offsets", offset)
        if mask is not None:
            self.sow("intermediates", "masks", mask)
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
    precision: PrecisionLike = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the layer to ``inputs`` ``(*batch, H, W, C_in)``; returns ``(*batch, H_out, W_out, features)``."""
        inputs, batch = layers.flatten_batch("DilatedConv", jnp.asarray(inputs))
        spec = _spec(self, inputs)
        kernel, bias = _kernel_and_bias(self, spec)
        out = layers.dilated_conv_layer(spec, inputs, kernel, bias, dtype=self.dtype,
                                        precision=self.precision)
        return out.reshape(batch + out.shape[1:])
