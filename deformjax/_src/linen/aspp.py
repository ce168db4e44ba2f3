"""Atrous spatial pyramid pooling (DeepLab v3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from deformjax._src.linen.conv import DilatedConv



class ASPP(nn.Module):
    """DeepLab v3's atrous spatial pyramid pooling (Chen et al. 2017, section 3.3).

    Parallel branches over the same input: a 1x1 convolution, one 3x3
    ``DilatedConv`` per rate, and image pooling (global average, 1x1
    convolution, broadcast back to ``H x W``); each followed by batch norm and
    ReLU. The branches are concatenated and projected by a 1x1 convolution,
    batch norm, ReLU and dropout, as in torchvision's ``deeplabv3``.

    Attributes:
      features: channels of every branch and of the output (DeepLab: 256).
      rates: dilation of each 3x3 branch (DeepLab v3 at output stride 16:
        ``(6, 12, 18)``).
      dropout_rate: dropout after the projection, active when ``train``.
      momentum: batch norm momentum.
      dtype: the computation dtype (default: inferred from input and params).
      param_dtype: the dtype of the parameters.
      precision: passed to the convolutions.

    Call with ``train=True`` to use batch statistics (``mutable=['batch_stats']``)
    and dropout (a ``'dropout'`` rng).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from deformjax import ASPP
      >>> aspp = ASPP(features=16, rates=(2, 4))
      >>> x = jnp.ones((1, 20, 20, 8))
      >>> variables = aspp.init(jax.random.key(0), x)
      >>> aspp.apply(variables, x).shape
      (1, 20, 20, 16)
    """

    features: int = 256
    rates: Sequence[int] = (6, 12, 18)
    dropout_rate: float = 0.5
    momentum: float = 0.9
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Applies ASPP to ``x`` ``(N, H, W, C)``; returns ``(N, H, W, features)``."""
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

        def norm_relu(y, name):
            y = nn.BatchNorm(
                use_running_average=not train,
                momentum=self.momentum,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )(y)
            return nn.relu(y)

        branches = [
            norm_relu(nn.Conv(self.features, (1, 1), use_bias=False, name="conv_1x1", **common)(x),
                      "norm_1x1")
        ]
        for i, rate in enumerate(self.rates):
            y = DilatedConv(self.features, 3, kernel_dilation=rate, use_bias=False, name=f"atrous_{i}", **common)(x)
            branches.append(norm_relu(y, f"norm_atrous_{i}"))
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        pooled = nn.Conv(self.features, (1, 1), use_bias=False, name="pool_conv", **common)(pooled)
        pooled = norm_relu(pooled, "norm_pool")
        branches.append(jnp.broadcast_to(pooled, branches[0].shape))
        y = jnp.concatenate(branches, axis=-1)
        y = nn.Conv(self.features, (1, 1), use_bias=False, name="project", **common)(y)
        y = norm_relu(y, "norm_project")
        return nn.Dropout(self.dropout_rate, deterministic=not train)(y)
