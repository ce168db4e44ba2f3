"""Flax linen module for deformable RoI pooling with its fully connected offset branch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer, PrecisionLike

from deformjax._src import layers
from deformjax._src.linen.conv import _Weights


class DeformRoIPool(nn.Module):
    """Deformable RoI pooling that predicts its own bin offsets (Dai et al. 2017, 2.2).

    As mmcv's ``DeformRoIPoolPack`` (``ModulatedDeformRoIPoolPack`` when
    ``modulated``): the RoIs are first pooled without offsets; fully connected
    layers (``deform_fc_channels`` wide, ReLU) map each pooled RoI to
    normalized ``(dy, dx)`` offsets per bin, with the last layer
    zero-initialised, so a fresh module is ``roi_align(aligned=True)``. When
    ``modulated``, a second branch predicts a mask per bin through a sigmoid
    (zero-initialised: a fresh modulated module pools half of RoIAlign). The
    offsets (and mask) are sown into ``intermediates`` as ``offsets`` (and
    ``masks``). Parameters: ``offset_fc_0``, ``offset_fc_1``, ``offset_fc_2``
    (and ``mask_fc_0``, ``mask_fc_1``), each with a ``kernel`` ``(in, out)``
    and a ``bias``, as ``nn.Dense``. The pooled RoI is flattened
    channels-last, ``(oh, ow, C)``, so mmcv's first-layer weights (flattened
    ``(C, oh, ow)``) need permuting.

    Attributes:
      output_size: int or ``(oh, ow)``.
      spatial_scale: image-to-feature coordinate scale.
      sampling_ratio: samples per bin and axis; ``<= 0`` adaptive (see
        ``deform_roi_pool``).
      gamma: scale of the offsets.
      modulated: also predict a modulation mask per bin.
      deform_fc_channels: width of the hidden fully connected layers (mmcv: 1024).
      dtype: the computation dtype (default: inferred from input and params).
      param_dtype: the dtype of the parameters.
      precision: passed to the fully connected layers.
      kernel_init: initializer of the hidden layers' kernels.
      bias_init: initializer of the hidden layers' biases.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from deformjax import DeformRoIPool
      >>> pool = DeformRoIPool(output_size=7, sampling_ratio=2, deform_fc_channels=64)
      >>> features = jnp.ones((1, 32, 32, 8))
      >>> rois = jnp.array([[0.0, 4.0, 4.0, 20.0, 28.0]])
      >>> params = pool.init(jax.random.key(0), features, rois)
      >>> pool.apply(params, features, rois).shape
      (1, 7, 7, 8)
    """

    output_size: int | Sequence[int]
    spatial_scale: float = 1.0
    sampling_ratio: int = 0
    gamma: float = 0.1
    modulated: bool = False
    deform_fc_channels: int = 1024
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, features: Any, rois: Any) -> jax.Array:
        """Pools ``features`` ``(N, H, W, C)`` over ``rois`` ``(R, 5)``; returns ``(R, oh, ow, C)``."""
        fn = "DeformRoIPool"
        features, rois = layers.check_roi_inputs(fn, features, rois)
        spec = layers.roi_pool_spec(fn, channels=features.shape[-1], output_size=self.output_size,
                                    deform_fc_channels=self.deform_fc_channels,
                                    modulated=self.modulated)

        def weights(specs):  # the last layer of each branch starts at zero
            zeros = nn.initializers.zeros_init()
            params = []
            for i, (name, fan_in, fan_out) in enumerate(specs):
                last = i == len(specs) - 1
                params.append(_Weights((fan_in, fan_out), (fan_out,), self.param_dtype,
                                       zeros if last else self.kernel_init,
                                       zeros if last else self.bias_init, name=name)())
            return params

        out, offset, mask = layers.deform_roi_pool_layer(
            spec, features, rois, weights(spec.offset_layers), weights(spec.mask_layers),
            spatial_scale=self.spatial_scale, sampling_ratio=self.sampling_ratio,
            gamma=self.gamma, dtype=self.dtype, precision=self.precision,
        )
        self.sow("intermediates", "offsets", offset)
        if mask is not None:
            self.sow("intermediates", "masks", mask)
        return out


class DeformPSRoIPool(nn.Module):
    """Deformable position-sensitive RoI pooling, the deformable R-FCN head.

    Owns a 1x1 convolution named ``offset`` (``kernel`` ``(1, 1, C, 2 * oh *
    ow)``, ``bias``), zero-initialised, that maps the features to an offset
    field; PS-RoI pooling that field (no offsets) gives each bin its
    normalized ``(dy, dx)``, and the features are PS-RoI-pooled with them
    (``deform_ps_roi_pool``). A fresh module is ``torchvision.ops.ps_roi_align``.
    The offsets are sown into ``intermediates`` as ``offsets``.

    Attributes:
      output_size: int or ``(oh, ow)``; the features need ``C_out * oh * ow`` channels.
      spatial_scale, sampling_ratio, gamma: as ``deform_ps_roi_pool``.
      dtype, param_dtype, precision: as ``nn.Conv``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from deformjax import DeformPSRoIPool
      >>> head = DeformPSRoIPool(output_size=3, sampling_ratio=2)
      >>> features = jnp.ones((1, 16, 16, 2 * 3 * 3))
      >>> rois = jnp.array([[0.0, 2.0, 2.0, 12.0, 10.0]])
      >>> params = head.init(jax.random.key(0), features, rois)
      >>> head.apply(params, features, rois).shape
      (1, 3, 3, 2)
    """

    output_size: int | Sequence[int]
    spatial_scale: float = 1.0
    sampling_ratio: int = 0
    gamma: float = 0.1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, features: Any, rois: Any) -> jax.Array:
        """Pools ``features`` ``(N, H, W, C_out * oh * ow)`` over ``rois`` ``(R, 5)``; returns ``(R, oh, ow, C_out)``."""
        fn = "DeformPSRoIPool"
        features, rois = layers.check_roi_inputs(fn, features, rois)
        oh, ow = layers.ps_roi_pool_spec(fn, channels=features.shape[-1],
                                         output_size=self.output_size)
        zeros = nn.initializers.zeros_init()
        kernel, bias = _Weights((1, 1, features.shape[-1], 2 * oh * ow), (2 * oh * ow,),
                                self.param_dtype, zeros, zeros, name="offset")()
        out, offset = layers.deform_ps_roi_pool_layer(
            (oh, ow), features, rois, kernel, bias, spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio, gamma=self.gamma, dtype=self.dtype,
            precision=self.precision,
        )
        self.sow("intermediates", "offsets", offset)
        return out
