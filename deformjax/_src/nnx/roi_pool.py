"""Flax NNX module for deformable RoI pooling with its fully connected offset branch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer, PrecisionLike

from deformjax._src import layers
from deformjax._src.nnx.conv import check_in_features, sow_if_captured


def _check_inputs(module, features: Any, rois: Any) -> tuple[jax.Array, jax.Array]:
    features, rois = layers.check_roi_inputs(type(module).__name__, features, rois)
    check_in_features(module, "features", features)
    return features, rois


class DeformRoIPool(nnx.Module):
    """Deformable RoI pooling that predicts its own bin offsets; the NNX twin of
    ``deformjax.DeformRoIPool`` (mmcv's ``DeformRoIPoolPack`` /
    ``ModulatedDeformRoIPoolPack``).

    Parameters, as the linen twin's: ``offset_fc_0``, ``offset_fc_1``,
    ``offset_fc_2`` (and, when ``modulated``, ``mask_fc_0``, ``mask_fc_1``),
    each an ``nnx.Linear`` holding ``kernel`` ``(in, out)`` and ``bias``; the
    first takes the plain pooled RoI flattened channels-last
    (``oh * ow * in_features``); the last layers are zero-initialised, so a
    fresh module is ``roi_align(aligned=True)``. Offsets (and masks) are sown
    as ``nnx.Intermediate`` inside ``nnx.capture``.

    Args:
      in_features: channels ``C`` of the feature map.
      output_size: int or ``(oh, ow)``.
      spatial_scale, sampling_ratio, gamma: as ``deform_roi_pool``.
      modulated: also predict a modulation mask per bin.
      deform_fc_channels: width of the hidden layers (mmcv: 1024).
      dtype, param_dtype, precision, kernel_init, bias_init, rngs: as ``nnx.Linear``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deformjax.nnx as djnnx
      >>> pool = djnnx.DeformRoIPool(8, 7, sampling_ratio=2, deform_fc_channels=64,
      ...                            rngs=nnx.Rngs(0))
      >>> pool(jnp.ones((1, 32, 32, 8)), jnp.array([[0.0, 4.0, 4.0, 20.0, 28.0]])).shape
      (1, 7, 7, 8)
    """

    def __init__(
        self,
        in_features: int,
        output_size: int | Sequence[int],
        *,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
        modulated: bool = False,
        deform_fc_channels: int = 1024,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = nnx.initializers.lecun_normal(),
        bias_init: Initializer = nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.spec = layers.roi_pool_spec("DeformRoIPool", channels=in_features,
                                         output_size=output_size,
                                         deform_fc_channels=deform_fc_channels,
                                         modulated=modulated)
        self.spatial_scale, self.sampling_ratio, self.gamma = spatial_scale, sampling_ratio, gamma
        self.dtype, self.precision = dtype, precision
        zeros = nnx.initializers.zeros_init()
        for group in (self.spec.offset_layers, self.spec.mask_layers):
            for i, (name, fan_in, fan_out) in enumerate(group):
                last = i == len(group) - 1
                setattr(self, name, nnx.Linear(
                    fan_in, fan_out, param_dtype=param_dtype,
                    kernel_init=zeros if last else kernel_init,
                    bias_init=zeros if last else bias_init, rngs=rngs,
                ))

    def __call__(self, features: Any, rois: Any) -> jax.Array:
        """Pools ``features`` ``(N, H, W, in_features)`` over ``rois`` ``(R, 5)``; returns ``(R, oh, ow, C)``."""
        features, rois = _check_inputs(self, features, rois)

        def weights(specs):
            return [(getattr(self, name).kernel[...], getattr(self, name).bias[...])
                    for name, _, _ in specs]

        out, offset, mask = layers.deform_roi_pool_layer(
            self.spec, features, rois, weights(self.spec.offset_layers),
            weights(self.spec.mask_layers), spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio, gamma=self.gamma, dtype=self.dtype,
            precision=self.precision,
        )
        sow_if_captured(self, "offsets", offset)
        sow_if_captured(self, "masks", mask)
        return out


class DeformPSRoIPool(nnx.Module):
    """Deformable position-sensitive RoI pooling (the deformable R-FCN head); the NNX
    twin of ``deformjax.DeformPSRoIPool``, with the same parameters: ``offset``, an
    ``nnx.Conv`` 1x1 holding ``kernel`` ``(1, 1, in_features, 2 * oh * ow)`` and
    ``bias``, zero-initialised (a fresh module is ``ps_roi_align``). Offsets are sown
    as ``nnx.Intermediate`` inside ``nnx.capture``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deformjax.nnx as djnnx
      >>> head = djnnx.DeformPSRoIPool(18, 3, sampling_ratio=2, rngs=nnx.Rngs(0))
      >>> head(jnp.ones((1, 16, 16, 18)), jnp.array([[0.0, 2.0, 2.0, 12.0, 10.0]])).shape
      (1, 3, 3, 2)
    """

    def __init__(
        self,
        in_features: int,
        output_size: int | Sequence[int],
        *,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.output_size = layers.ps_roi_pool_spec("DeformPSRoIPool", channels=in_features,
                                                   output_size=output_size)
        self.spatial_scale, self.sampling_ratio, self.gamma = spatial_scale, sampling_ratio, gamma
        self.dtype, self.precision = dtype, precision
        oh, ow = self.output_size
        zeros = nnx.initializers.zeros_init()
        self.offset = nnx.Conv(in_features, 2 * oh * ow, (1, 1), param_dtype=param_dtype,
                               kernel_init=zeros, bias_init=zeros, rngs=rngs)

    def __call__(self, features: Any, rois: Any) -> jax.Array:
        """Pools ``features`` ``(N, H, W, in_features)`` over ``rois`` ``(R, 5)``; returns ``(R, oh, ow, in_features / (oh * ow))``."""
        features, rois = _check_inputs(self, features, rois)
        out, offset = layers.deform_ps_roi_pool_layer(
            self.output_size, features, rois, self.offset.kernel[...], self.offset.bias[...],
            spatial_scale=self.spatial_scale, sampling_ratio=self.sampling_ratio,
            gamma=self.gamma, dtype=self.dtype, precision=self.precision,
        )
        sow_if_captured(self, "offsets", offset)
        return out
