"""Flax NNX modules for deformable and dilated convolution.

Thin front-ends: each creates its parameters (the names, shapes and layouts
of its linen twin) and calls its recipe in ``deformjax._src.layers``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer, PaddingLike, PrecisionLike

from deformjax._src import layers

default_kernel_init = nnx.initializers.lecun_normal()


def sow_if_captured(module: nnx.Module, name: str, value: jax.Array | None) -> None:
    """``module.sow(nnx.Intermediate, name, value)`` inside ``nnx.capture`` only.

    ``nnx.capture(model, nnx.Intermediate)(x)`` is how current Flax NNX reads
    intermediates; outside it ``Module.sow`` is deprecated (and warns), so
    nothing is recorded there.
    """
    if value is not None and hasattr(module, "__captures__"):
        module.sow(nnx.Intermediate, name, value)


def _spec(module, c_in: int, in_hw) -> layers.ConvSpec:
    return layers.conv_spec(
        type(module).__name__, c_in=c_in, features=module.out_features,
        kernel_size=module.kernel_size, strides=module.strides, padding=module.padding,
        kernel_dilation=module.kernel_dilation, feature_group_count=module.feature_group_count,
        offset_groups=getattr(module, "offset_groups", 1),
        modulated=getattr(module, "modulated", False), in_hw=in_hw,
    )


def _configure(module, given: dict) -> layers.ConvSpec:
    """Stores a constructor's settings, checks them, and creates ``kernel`` and ``bias``."""
    for name in ("in_features", "out_features", "kernel_size", "strides", "padding",
                 "kernel_dilation", "feature_group_count", "dtype", "precision"):
        setattr(module, name, given[name])
    spec = _spec(module, module.in_features, in_hw=(1, 1))  # shapes need no image size
    rngs, param_dtype = given["rngs"], given["param_dtype"]
    module.kernel = nnx.Param(given["kernel_init"](rngs.params(), spec.kernel_shape, param_dtype))
    bias_init = given["bias_init"]
    module.bias = (
        nnx.Param(bias_init(rngs.params(), (spec.features,), param_dtype))
        if given["use_bias"] else None
    )
    return spec


def check_in_features(module: nnx.Module, argument: str, array: jax.Array) -> None:
    """Raises unless ``array``'s channels are the ``in_features`` the module was built for."""
    if array.shape[-1] != module.in_features:
        raise ValueError(
            f"{type(module).__name__}: {argument}.shape[-1] must be in_features = "
            f"{module.in_features}; got {array.shape[-1]}"
        )


def _check_inputs(module, inputs: jax.Array):
    inputs, batch = layers.flatten_batch(type(module).__name__, jnp.asarray(inputs))
    check_in_features(module, "inputs", inputs)
    return inputs, batch


class DeformConv(nnx.Module):
    """Deformable convolution with its own offset branch (DCN v1, or v2 when modulated).

    The NNX twin of ``deformjax.DeformConv``, with the same parameters:
    ``kernel`` ``(kh, kw, in_features // feature_group_count, out_features)``,
    ``bias``, and the offset branch ``offset`` (an ``nnx.Conv`` holding
    ``kernel`` ``(kh, kw, in_features, 2 * G * kh * kw)``, ``3 * G * kh * kw``
    when modulated, and ``bias``), zero-initialised so that a fresh layer is a
    plain convolution (modulated: half of one, since ``sigmoid(0) = 0.5``). Its
    output channels are the offsets in ``deform_conv``'s layout, then the mask
    logits (mmcv's ``ModulatedDeformConv2dPack`` order). The predicted offsets
    (and masks) are sown as ``nnx.Intermediate`` ``offsets`` (``masks``); read
    them with ``nnx.capture(layer, nnx.Intermediate)(x)``.

    Args follow ``flax.nnx.Conv``: ``in_features``, ``out_features``,
    ``kernel_size`` (int or ``(kh, kw)``); keyword-only ``strides``,
    ``padding`` (``'SAME'``, ``'VALID'``, int or pairs), ``kernel_dilation``,
    ``feature_group_count``, ``use_bias``, ``offset_groups`` (``G``),
    ``modulated``, ``dtype``, ``param_dtype``, ``precision``, ``kernel_init``,
    ``bias_init``, ``rngs``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deformjax.nnx as djnnx
      >>> layer = djnnx.DeformConv(8, 16, 3, modulated=True, rngs=nnx.Rngs(0))
      >>> layer.offset.kernel.shape
      (3, 3, 8, 27)
      >>> y, captured = nnx.capture(layer, nnx.Intermediate)(jnp.ones((2, 12, 12, 8)))
      >>> y.shape, captured["offsets"][0].shape
      ((2, 12, 12, 16), (2, 12, 12, 18))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        strides: int | Sequence[int] = 1,
        padding: PaddingLike = "SAME",
        kernel_dilation: int | Sequence[int] = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        offset_groups: int = 1,
        modulated: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
    ):
        self.offset_groups, self.modulated = offset_groups, modulated
        spec = _configure(self, locals())
        zeros = nnx.initializers.zeros_init()
        self.offset = nnx.Conv(
            in_features, spec.offset_channels, spec.geometry.kernel_size,
            param_dtype=param_dtype, kernel_init=zeros, bias_init=zeros, rngs=rngs,
        )

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the layer to ``inputs`` ``(*batch, H, W, in_features)``; returns ``(*batch, H_out, W_out, out_features)``."""
        inputs, batch = _check_inputs(self, inputs)
        spec = _spec(self, inputs.shape[-1], inputs.shape[1:3])
        bias = None if self.bias is None else self.bias[...]
        out, offset, mask = layers.deform_conv_layer(
            spec, inputs, self.kernel[...], bias, self.offset.kernel[...],
            self.offset.bias[...], dtype=self.dtype, precision=self.precision,
        )
        sow_if_captured(self, "offsets", offset)
        sow_if_captured(self, "masks", mask)
        return out.reshape(batch + out.shape[1:])


class DilatedConv(nnx.Module):
    """Dilated (atrous) convolution; the NNX twin of ``deformjax.DilatedConv``.

    Parameters ``kernel`` ``(kh, kw, in_features // feature_group_count,
    out_features)`` and ``bias``, as ``nnx.Conv``. ``kernel_dilation`` is
    required and keyword-only.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deformjax.nnx as djnnx
      >>> layer = djnnx.DilatedConv(3, 8, 3, kernel_dilation=4, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((1, 32, 32, 3))).shape
      (1, 32, 32, 8)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        kernel_dilation: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        padding: PaddingLike = "SAME",
        feature_group_count: int = 1,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
    ):
        _configure(self, locals())

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the layer to ``inputs`` ``(*batch, H, W, in_features)``; returns ``(*batch, H_out, W_out, out_features)``."""
        inputs, batch = _check_inputs(self, inputs)
        spec = _spec(self, inputs.shape[-1], inputs.shape[1:3])
        bias = None if self.bias is None else self.bias[...]
        out = layers.dilated_conv_layer(spec, inputs, self.kernel[...], bias, dtype=self.dtype,
                                        precision=self.precision)
        return out.reshape(batch + out.shape[1:])
