"""Flax linen module for deformable RoI pooling with its fully connected offset branch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from deformjax._src import args
from deformjax._src.ops.deform_roi_pool import deform_roi_pool

Dtype = Any
Initializer = Any


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
    (and ``mask_fc_0``, ``mask_fc_1``), each a ``Dense`` with ``kernel`` and
    ``bias``. The pooled RoI is flattened channels-last, ``(oh, ow, C)``, so
    mmcv's first-layer weights (flattened ``(C, oh, ow)``) need permuting.

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
    precision: Any = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, features: jax.Array, rois: jax.Array) -> jax.Array:
        """Pools ``features`` ``(N, H, W, C)`` over ``rois`` ``(R, 5)``; returns ``(R, oh, ow, C)``."""
        fn = "DeformRoIPool"
        features, rois = jnp.asarray(features), jnp.asarray(rois)  # what the function accepts
        args.check_rank(fn, "features", features, 4, "(N, H, W, C)")
        if rois.ndim != 2 or rois.shape[1] != 5:
            raise args.fail(
                fn, f"rois must have shape (R, 5) [batch_index, x1, y1, x2, y2]; got {rois.shape}"
            )
        oh, ow = args.as_pair(self.output_size, "output_size", fn)
        width = args.check_positive_int(fn, "deform_fc_channels", self.deform_fc_channels)

        def pool(features, offset=None, mask=None):
            return deform_roi_pool(
                features,
                rois,
                offset,
                mask,
                output_size=(oh, ow),
                spatial_scale=self.spatial_scale,
                sampling_ratio=self.sampling_ratio,
                gamma=self.gamma,
            )

        def dense(size, name, zero=False):
            return nn.Dense(
                size,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                kernel_init=nn.initializers.zeros_init() if zero else self.kernel_init,
                bias_init=nn.initializers.zeros_init() if zero else self.bias_init,
                name=name,
            )

        (features,) = promote_dtype(features, dtype=self.dtype)
        num_rois = rois.shape[0]
        plain = pool(features).reshape(num_rois, oh * ow * features.shape[-1])
        hidden = nn.relu(dense(width, "offset_fc_0")(plain))
        hidden = nn.relu(dense(width, "offset_fc_1")(hidden))
        offset = dense(oh * ow * 2, "offset_fc_2", zero=True)(hidden).reshape(num_rois, oh, ow, 2)
        self.sow("intermediates", "offsets", offset)
        mask = None
        if self.modulated:
            hidden = nn.relu(dense(width, "mask_fc_0")(plain))
            logits = dense(oh * ow, "mask_fc_1", zero=True)(hidden)
            mask = jax.nn.sigmoid(logits).reshape(num_rois, oh, ow, 1)
            self.sow("intermediates", "masks", mask)
        return pool(features, offset, mask)
