"""InternImage's DCNv3 layer, Flax NNX."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, PrecisionLike

from deformjax._src import layers
from deformjax._src.linen.dcnv3 import check_channels, spec_of
from deformjax._src.nnx.conv import sow_if_captured


class _Params(nnx.Module):
    """Holds one sub-layer's parameters as ``nnx.Param`` attributes."""

    def __init__(self, table, param_dtype, rngs: nnx.Rngs):
        self.names = tuple(table)
        for name, (shape, init) in table.items():
            setattr(self, name, nnx.Param(init(rngs.params(), shape, param_dtype)))

    def __call__(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}


class DCNv3(nnx.Module):
    """InternImage's DCNv3 layer; the NNX twin of ``deformjax.DCNv3``.

    The same computation, parameters (``input_proj``, ``dw_conv``, ``dw_norm``,
    ``offset``, ``mask``, ``output_proj`` and, with ``center_feature_scale``,
    ``center_feature_scale_proj``, each holding ``kernel`` / ``bias`` or
    ``scale`` / ``bias``) and InternImage's initialisation as the linen module;
    ``deformjax.nnx.from_linen`` / ``to_linen`` carry them across. The predicted
    offsets and masks are sown as ``nnx.Intermediate`` ``offsets`` and
    ``masks``; read them with ``nnx.capture(layer, nnx.Intermediate)(x)``.
    Called on ``(*batch, H, W, channels)``, returns the same shape (strides 1).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deformjax.nnx as djnnx
      >>> layer = djnnx.DCNv3(16, groups=4, rngs=nnx.Rngs(0))
      >>> layer.offset.kernel.shape
      (16, 72)
      >>> layer(jnp.ones((2, 8, 8, 16))).shape
      (2, 8, 8, 16)
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int | Sequence[int] = 3,
        *,
        dw_kernel_size: int | Sequence[int] | None = None,
        strides: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 1,
        dilation: int | Sequence[int] = 1,
        groups: int = 4,
        offset_scale: float = 1.0,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        self.channels, self.kernel_size, self.dw_kernel_size = channels, kernel_size, dw_kernel_size
        self.strides, self.padding, self.dilation, self.groups = strides, padding, dilation, groups
        self.offset_scale, self.center_feature_scale = offset_scale, center_feature_scale
        self.remove_center, self.dtype, self.precision = remove_center, dtype, precision
        spec = spec_of(self)
        for layer, table in spec.params().items():
            setattr(self, layer, _Params(table, param_dtype, rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x`` ``(*batch, H, W, channels)``; returns the same shape."""
        spec = spec_of(self)
        x, batch = layers.flatten_batch("DCNv3", jnp.asarray(x))
        check_channels(spec, x)
        params = {layer: getattr(self, layer)() for layer in spec.params()}
        out, offset, mask = layers.dcnv3_layer(spec, x, params, dtype=self.dtype,
                                               precision=self.precision)
        sow_if_captured(self, "offsets", offset)
        sow_if_captured(self, "masks", mask)
        return out.reshape(batch + out.shape[1:])
