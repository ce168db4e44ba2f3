"""ResNet with deformable stages, Flax NNX; the twin of ``deformjax.models.ResNet``."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from deformjax._src.models.resnet import EPS, check, conv_init, frozen_norm
from deformjax._src.nnx.conv import DeformConv


class FrozenBatchNorm(nnx.Module):
    """Batch norm with fixed statistics and affine parameters (torchvision's
    ``FrozenBatchNorm2d``); the NNX twin of ``deformjax.models.FrozenBatchNorm``:
    ``scale``, ``bias``, ``mean`` and ``var`` are ``nnx.BatchStat``s, which an
    ``nnx.Optimizer(..., wrt=nnx.Param)`` leaves alone.

    Called on ``(..., C)`` (channels last), returns ``(..., C)``: ``(x - mean) / sqrt(var + epsilon) * scale + bias``.
    """

    def __init__(self, num_features: int, *, epsilon: float = EPS, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32):
        self.epsilon, self.dtype = epsilon, dtype
        self.scale = nnx.BatchStat(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.BatchStat(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), param_dtype))
        self.var = nnx.BatchStat(jnp.ones((num_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return frozen_norm(x, self.scale[...], self.bias[...], self.mean[...], self.var[...],
                           self.epsilon, self.dtype)


def _norm(kind, features, dtype, param_dtype, rngs):
    if kind == "frozen":
        return FrozenBatchNorm(features, dtype=dtype, param_dtype=param_dtype)
    return nnx.BatchNorm(features, momentum=0.9, epsilon=EPS, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)


def _conv(c_in, c_out, kernel, strides, dtype, param_dtype, rngs):
    return nnx.Conv(c_in, c_out, (kernel, kernel), strides=strides, padding=(kernel - 1) // 2,
                    use_bias=False, kernel_init=conv_init, dtype=dtype, param_dtype=param_dtype,
                    rngs=rngs)


class _Block(nnx.Module):
    def __init__(self, c_in, planes, strides, bottleneck, dcn, dcn_modulated, offset_groups,
                 norm, dtype, param_dtype, rngs):
        self.bottleneck = bottleneck
        out = planes * (4 if bottleneck else 1)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        stride2 = strides if bottleneck else 1
        if bottleneck:
            self.conv1 = _conv(c_in, planes, 1, 1, **common)
        else:
            self.conv1 = _conv(c_in, planes, 3, strides, **common)
        self.bn1 = _norm(norm, planes, dtype, param_dtype, rngs)
        if dcn:
            self.conv2 = DeformConv(planes, planes, 3, strides=stride2, padding=1, use_bias=False,
                                    offset_groups=offset_groups, modulated=dcn_modulated,
                                    kernel_init=conv_init, **common)
        else:
            self.conv2 = _conv(planes, planes, 3, stride2, **common)
        self.bn2 = _norm(norm, planes, dtype, param_dtype, rngs)
        if bottleneck:
            self.conv3 = _conv(planes, out, 1, 1, **common)
            self.bn3 = _norm(norm, out, dtype, param_dtype, rngs)
        self.has_downsample = strides != 1 or c_in != out
        if self.has_downsample:
            self.downsample_conv = _conv(c_in, out, 1, strides, **common)
            self.downsample_bn = _norm(norm, out, dtype, param_dtype, rngs)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        if self.bottleneck:
            y = nnx.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
        else:
            y = self.bn2(self.conv2(y))
        if self.has_downsample:
            x = self.downsample_bn(self.downsample_conv(x))
        return nnx.relu(x + y)


class ResNet(nnx.Module):
    """ResNet-18/34/50/101 with deformable stages; the NNX twin of ``deformjax.models.ResNet``.

    The same layers, settings and variable names (``conv1``, ``bn1``,
    ``layer{1..4}_{i}``, ``fc``; ``deformjax.nnx.from_linen`` / ``to_linen``
    carry them across, and ``deformjax.interop.load_torch_state_dict`` loads
    torch weights into ``to_linen(model)``). As every NNX module with batch norm
    it starts in training mode (``norm='batch'``: batch statistics); call
    ``model.eval()`` for inference. ``norm='frozen'`` never changes. Called on
    ``(N, H, W, 3)``, returns ``(C2, C3, C4, C5)`` (strides 4 to 32) or logits
    ``(N, num_classes)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deformjax.nnx as djnnx
      >>> model = djnnx.ResNet(18, stage_with_dcn=(False, True, True, True), norm="frozen",
      ...                      width=16, rngs=nnx.Rngs(0))
      >>> [f.shape for f in model(jnp.ones((1, 64, 64, 3)))]
      [(1, 16, 16, 16), (1, 8, 8, 32), (1, 4, 4, 64), (1, 2, 2, 128)]
    """

    def __init__(
        self,
        depth: int,
        *,
        stage_with_dcn: Sequence[bool] = (False, False, False, False),
        dcn_modulated: bool = True,
        offset_groups: int = 1,
        norm: str = "batch",
        num_classes: int | None = None,
        width: int = 64,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        bottleneck, blocks, flags = check(depth, stage_with_dcn, norm, num_classes,
                                          offset_groups, width)
        self.blocks, self.num_classes = blocks, num_classes
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = nnx.Conv(3, width, (7, 7), strides=2, padding=3, use_bias=False,
                              kernel_init=conv_init, **common)
        self.bn1 = _norm(norm, width, dtype, param_dtype, rngs)
        c_in = width
        for stage, (count, dcn) in enumerate(zip(blocks, flags)):
            planes = width * 2**stage
            for i in range(count):
                block = _Block(c_in, planes, 2 if stage > 0 and i == 0 else 1, bottleneck, dcn,
                               dcn_modulated, offset_groups, norm, dtype, param_dtype, rngs)
                setattr(self, f"layer{stage + 1}_{i}", block)
                c_in = planes * (4 if bottleneck else 1)
        if num_classes is not None:
            self.fc = nnx.Linear(c_in, num_classes, **common)

    def __call__(self, x: jax.Array):
        """``x`` ``(N, H, W, 3)`` -> ``(C2, C3, C4, C5)`` or logits ``(N, num_classes)``."""
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features = []
        for stage, count in enumerate(self.blocks):
            for i in range(count):
                x = getattr(self, f"layer{stage + 1}_{i}")(x)
            features.append(x)
        if self.num_classes is None:
            return tuple(features)
        return self.fc(x.mean(axis=(1, 2)))
