"""InternImage's DCNv3 layer, Flax linen."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, PrecisionLike

from deformjax._src import layers


class _Params(nn.Module):
    """Holds one sub-layer's parameters, named as in the table of ``DCNv3Spec.params``."""

    table: tuple[tuple[str, tuple[int, ...], Any], ...]
    param_dtype: Dtype

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        return {name: self.param(name, init, shape, self.param_dtype)
                for name, shape, init in self.table}


class DCNv3(nn.Module):
    """InternImage's DCNv3 layer (Wang et al. 2023), equal to its ``DCNv3_pytorch``.

    ``x`` ``(N, H, W, C)`` -> input projection ``xp``; a depthwise
    ``dw_kernel_size`` convolution of ``x``, LayerNorm (eps 1e-6) and GELU give
    ``x1``, from which linear layers predict the offsets and a mask (softmax over
    each group's ``P`` points); :func:`deformjax.dcnv3` aggregates ``xp`` at the
    offset points; optional centre-feature scaling blends in ``xp``; output
    projection. Initialised as InternImage: zero offset and mask layers, so a
    fresh layer samples the regular grid with mask ``1 / P`` (and blends half of
    ``xp`` back with ``center_feature_scale``).

    Parameters (InternImage's names; a torch ``Linear`` weight ``W`` is our
    ``kernel = W.T``, a conv weight ``(C, 1, k, k)`` our HWIO ``(k, k, 1, C)``):
    ``input_proj``, ``output_proj`` (``kernel`` ``(C, C)``, ``bias``),
    ``dw_conv`` (``kernel`` ``(k, k, 1, C)``, ``bias``), ``dw_norm``
    (``scale``, ``bias``; InternImage's ``dw_conv.1.1``), ``offset`` (``kernel``
    ``(C, G * P * 2)``), ``mask`` (``(C, G * P)``), and with
    ``center_feature_scale`` ``center_feature_scale_proj`` (``kernel``
    ``(C, G)``, ``bias`` ``(G,)``). The predicted offsets and masks are sown into
    ``intermediates`` as ``offsets`` and ``masks``, in ``dcnv3``'s layout.

    Attributes:
      channels: ``C``, of input and output.
      kernel_size: the sampling window (int or ``(kh, kw)``).
      dw_kernel_size: the depthwise convolution's kernel (odd; default
        ``kernel_size``).
      strides, padding, dilation: of the sampling window; the output must be as
        large as the input (strides 1, ``2 * padding == dilation * (k - 1)``).
      groups: ``G``, dividing ``channels``.
      offset_scale, remove_center: as in :func:`deformjax.dcnv3`.
      center_feature_scale: blend ``xp`` back with a learned per-group gate.
      dtype, param_dtype, precision: as in ``flax.linen.Dense``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from deformjax import DCNv3
      >>> layer = DCNv3(16, groups=4)
      >>> x = jnp.ones((2, 8, 8, 16))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> y, state = layer.apply(variables, x, mutable="intermediates")
      >>> y.shape, state["intermediates"]["masks"][0].shape
      ((2, 8, 8, 16), (2, 8, 8, 36))
    """

    channels: int
    kernel_size: int | Sequence[int] = 3
    dw_kernel_size: int | Sequence[int] | None = None
    strides: int | Sequence[int] = 1
    padding: int | Sequence[int] = 1
    dilation: int | Sequence[int] = 1
    groups: int = 4
    offset_scale: float = 1.0
    center_feature_scale: bool = False
    remove_center: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x`` ``(*batch, H, W, channels)``; returns the same shape."""
        spec = spec_of(self)
        x, batch = layers.flatten_batch("DCNv3", jnp.asarray(x))
        check_channels(spec, x)
        params = {
            layer: _Params(tuple((name, shape, init) for name, (shape, init) in table.items()),
                           self.param_dtype, name=layer)()
            for layer, table in spec.params().items()
        }
        out, offset, mask = layers.dcnv3_layer(spec, x, params, dtype=self.dtype,
                                               precision=self.precision)
        self.sow("intermediates", "offsets", offset)
        self.sow("intermediates", "masks", mask)
        return out.reshape(batch + out.shape[1:])


def spec_of(module: Any) -> layers.DCNv3Spec:
    """The checked settings of a linen or NNX ``DCNv3``."""
    return layers.dcnv3_spec(
        "DCNv3", channels=module.channels, kernel_size=module.kernel_size,
        dw_kernel_size=module.dw_kernel_size, strides=module.strides, padding=module.padding,
        dilation=module.dilation, groups=module.groups, offset_scale=module.offset_scale,
        center_feature_scale=module.center_feature_scale, remove_center=module.remove_center,
    )


def check_channels(spec: layers.DCNv3Spec, x: jax.Array) -> None:
    if x.shape[-1] != spec.channels:
        raise ValueError(f"DCNv3: x.shape[-1] must be channels = {spec.channels}; "
                         f"got {x.shape[-1]} (shape {x.shape})")
