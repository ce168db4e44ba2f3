"""Atrous spatial pyramid pooling (DeepLab v3), Flax NNX."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, PrecisionLike

from deformjax._src.nnx.conv import DilatedConv


class ASPP(nnx.Module):
    """DeepLab v3's atrous spatial pyramid pooling; the NNX twin of ``deformjax.ASPP``.

    The same branches and parameter names as the linen module (``conv_1x1``,
    ``atrous_i``, ``pool_conv``, ``project`` and a batch norm after each:
    ``norm_1x1``, ``norm_atrous_i``, ``norm_pool``, ``norm_project``). As every
    NNX module with batch norm and dropout, it starts in training mode (batch
    statistics, dropout with the ``'dropout'`` stream of ``rngs``); call
    ``model.eval()`` for inference, ``model.train()`` to go back. Called on
    ``(N, H, W, in_features)``, returns ``(N, H, W, features)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deformjax.nnx as djnnx
      >>> aspp = djnnx.ASPP(8, features=16, rates=(2, 4), rngs=nnx.Rngs(0))
      >>> aspp.eval()
      >>> aspp(jnp.ones((1, 20, 20, 8))).shape
      (1, 20, 20, 16)
    """

    def __init__(
        self,
        in_features: int,
        *,
        features: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        dropout_rate: float = 0.5,
        momentum: float = 0.9,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        self.rates = tuple(rates)
        common = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)

        def norm():
            return nnx.BatchNorm(features, momentum=momentum, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)

        self.conv_1x1 = nnx.Conv(in_features, features, (1, 1), use_bias=False, **common)
        self.norm_1x1 = norm()
        for i, rate in enumerate(self.rates):
            setattr(self, f"atrous_{i}", DilatedConv(in_features, features, 3,
                                                     kernel_dilation=rate, use_bias=False,
                                                     **common))
            setattr(self, f"norm_atrous_{i}", norm())
        self.pool_conv = nnx.Conv(in_features, features, (1, 1), use_bias=False, **common)
        self.norm_pool = norm()
        self.project = nnx.Conv((len(self.rates) + 2) * features, features, (1, 1),
                                use_bias=False, **common)
        self.norm_project = norm()
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies ASPP to ``x`` ``(N, H, W, in_features)``; returns ``(N, H, W, features)``."""
        branches = [nnx.relu(self.norm_1x1(self.conv_1x1(x)))]
        for i in range(len(self.rates)):
            y = getattr(self, f"atrous_{i}")(x)
            branches.append(nnx.relu(getattr(self, f"norm_atrous_{i}")(y)))
        pooled = self.pool_conv(jnp.mean(x, axis=(1, 2), keepdims=True))
        pooled = nnx.relu(self.norm_pool(pooled))
        branches.append(jnp.broadcast_to(pooled, branches[0].shape))
        y = self.project(jnp.concatenate(branches, axis=-1))
        return self.dropout(nnx.relu(self.norm_project(y)))
