"""ResNet-18/34/50/101 in torchvision's layout, with deformable 3x3 convolutions per stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from deformjax._src import args
from deformjax._src.linen.conv import DeformConv

_FN = "ResNet"
# depth: (bottleneck, blocks per stage)
DEPTHS = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)), 50: (True, (3, 4, 6, 3)),
          101: (True, (3, 4, 23, 3))}
NORMS = ("batch", "frozen")
EPS = 1e-5  # torch's BatchNorm2d / FrozenBatchNorm2d
# torchvision's initialisation of convolutions: kaiming_normal_(mode='fan_out', relu).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def check(depth: Any, stage_with_dcn: Any, norm: Any, num_classes: Any, offset_groups: Any,
          width: Any) -> tuple[bool, tuple[int, ...], tuple[bool, ...]]:
    """Validates ``ResNet``'s settings; returns (bottleneck, blocks per stage, dcn per stage)."""
    if depth not in DEPTHS:
        raise args.fail(_FN, f"depth must be one of {sorted(DEPTHS)}; got {depth!r}")
    flags = tuple(stage_with_dcn) if isinstance(stage_with_dcn, Sequence) else None
    if flags is None or len(flags) != 4 or not all(isinstance(f, bool) for f in flags):
        raise args.fail(_FN, "stage_with_dcn must be 4 bools (stages c2..c5); got "
                        f"{stage_with_dcn!r}")
    if norm not in NORMS:
        raise args.fail(_FN, f"norm must be one of {NORMS}; got {norm!r}")
    if num_classes is not None:
        args.check_positive_int(_FN, "num_classes", num_classes)
    args.check_positive_int(_FN, "offset_groups", offset_groups)
    args.check_positive_int(_FN, "width", width)
    bottleneck, blocks = DEPTHS[depth]
    for stage, dcn in enumerate(flags):
        planes = width * 2**stage
        if dcn and planes % offset_groups:
            raise args.fail(_FN, f"offset_groups must divide the deformable convolutions' "
                            f"channels; got offset_groups {offset_groups} and {planes} channels "
                            f"in stage c{stage + 2}")
    return bottleneck, blocks, flags


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics and affine parameters (torchvision's
    ``FrozenBatchNorm2d``): ``scale``, ``bias``, ``mean`` and ``var`` live in the
    ``batch_stats`` collection, so an optimizer over ``params`` leaves them alone.

    Called on ``(..., C)`` (channels last), returns ``(..., C)``: ``(x - mean) / sqrt(var + epsilon) * scale + bias``.
    """

    epsilon: float = EPS
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        stat = lambda name, init: self.variable(  # noqa: E731
            "batch_stats", name, init, (c,), self.param_dtype).value
        return frozen_norm(x, stat("scale", jnp.ones), stat("bias", jnp.zeros),
                           stat("mean", jnp.zeros), stat("var", jnp.ones), self.epsilon,
                           self.dtype)


def frozen_norm(x, scale, bias, mean, var, epsilon, dtype):
    """``(x - mean) / sqrt(var + epsilon) * scale + bias`` as one affine map."""
    factor = scale * jax.lax.rsqrt(var + epsilon)
    dtype = dtype or jnp.result_type(x, factor)
    return (x * factor + (bias - mean * factor)).astype(dtype)


class _Block(nn.Module):
    planes: int
    strides: int
    bottleneck: bool
    dcn: bool
    dcn_modulated: bool
    offset_groups: int
    norm: str
    dtype: Dtype | None
    param_dtype: Dtype

    def _norm(self, name, train):
        if self.norm == "frozen":
            return FrozenBatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS,
                            dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _conv(self, features, kernel, strides, name):
        return nn.Conv(features, (kernel, kernel), strides=strides,
                       padding=(kernel - 1) // 2, use_bias=False, kernel_init=conv_init,
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x, train):
        expansion = 4 if self.bottleneck else 1
        out_features = self.planes * expansion
        if self.dcn:
            conv2 = DeformConv(self.planes, 3, strides=self.strides if self.bottleneck else 1,
                               padding=1, use_bias=False, offset_groups=self.offset_groups,
                               modulated=self.dcn_modulated, kernel_init=conv_init,
                               dtype=self.dtype, param_dtype=self.param_dtype, name="conv2")
        else:
            conv2 = self._conv(self.planes, 3, self.strides if self.bottleneck else 1, "conv2")
        if self.bottleneck:  # 1x1, 3x3 (strided), 1x1 (x4)
            y = nn.relu(self._norm("bn1", train)(self._conv(self.planes, 1, 1, "conv1")(x)))
            y = nn.relu(self._norm("bn2", train)(conv2(y)))
            y = self._norm("bn3", train)(self._conv(out_features, 1, 1, "conv3")(y))
        else:  # 3x3 (strided), 3x3
            y = self._conv(self.planes, 3, self.strides, "conv1")(x)
            y = nn.relu(self._norm("bn1", train)(y))
            y = self._norm("bn2", train)(conv2(y))
        if self.strides != 1 or x.shape[-1] != out_features:
            x = self._conv(out_features, 1, self.strides, "downsample_conv")(x)
            x = self._norm("downsample_bn", train)(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet-18/34/50/101 in torchvision's layout, with deformable stages (mmdet's DCN).

    The stem (7x7 convolution with stride 2, norm, ReLU, 3x3 max pooling with
    stride 2) and four stages c2..c5 of basic (18, 34) or bottleneck (50, 101)
    blocks, the stride on the 3x3 convolution (torchvision's "ResNet v1.5").
    In each stage flagged in ``stage_with_dcn`` the 3x3 ``conv2`` of every
    block is a :class:`deformjax.DeformConv` (modulated: DCNv2) whose offset
    branch starts at zero (mmdet's ``dcn=dict(type='DCNv2')`` with
    ``stage_with_dcn``): a fresh DCNv1 stage computes exactly the plain
    convolution, a fresh DCNv2 one half of it (its mask is ``sigmoid(0) = 0.5``,
    as in mmcv / mmdet).

    Submodule names follow torchvision's state dict so that
    :func:`deformjax.interop.load_torch_state_dict` maps them one to one:
    ``conv1``, ``bn1``, ``layer{1..4}_{i}`` (torch ``layer1.0``) with ``conv1``,
    ``bn1``, ``conv2`` (with its ``offset`` branch when deformable), ``bn2``,
    (``conv3``, ``bn3``), ``downsample_conv`` / ``downsample_bn`` (torch
    ``downsample.0`` / ``.1``), and ``fc``.

    Attributes:
      depth: 18, 34, 50 or 101.
      stage_with_dcn: 4 bools, stages c2..c5.
      dcn_modulated: DCNv2 (a mask) rather than DCNv1.
      offset_groups: offset groups of the deformable convolutions.
      norm: ``'batch'`` (``nn.BatchNorm``: call with ``train=True`` and
        ``mutable=['batch_stats']`` to train) or ``'frozen'``
        (:class:`FrozenBatchNorm`, everything fixed, as detection backbones).
      num_classes: None returns the stage outputs ``(C2, C3, C4, C5)``, NHWC,
        at strides 4, 8, 16, 32; an int adds global average pooling and a
        dense classifier ``fc``.
      width: channels of the stem and of the first stage's 3x3 convolutions
        (torchvision's 64); each stage doubles it, bottlenecks expand 4x.
      dtype, param_dtype: as in flax's layers.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from deformjax.models import ResNet
      >>> model = ResNet(18, stage_with_dcn=(False, True, True, True), norm="frozen")
      >>> x = jnp.ones((1, 64, 64, 3))
      >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)  # model.init to compute
      >>> [f.shape for f in jax.eval_shape(model.apply, variables, x)]
      [(1, 16, 16, 64), (1, 8, 8, 128), (1, 4, 4, 256), (1, 2, 2, 512)]
    """

    depth: int
    stage_with_dcn: Sequence[bool] = (False, False, False, False)
    dcn_modulated: bool = True
    offset_groups: int = 1
    norm: str = "batch"
    num_classes: int | None = None
    width: int = 64
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False):
        """``x`` ``(N, H, W, 3)`` -> ``(C2, C3, C4, C5)`` or logits ``(N, num_classes)``."""
        bottleneck, blocks, flags = check(self.depth, self.stage_with_dcn, self.norm,
                                          self.num_classes, self.offset_groups, self.width)
        x = nn.Conv(self.width, (7, 7), strides=2, padding=3, use_bias=False,
                    kernel_init=conv_init, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="conv1")(x)
        if self.norm == "frozen":
            x = FrozenBatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="bn1")(x)
        else:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS,
                             dtype=self.dtype, param_dtype=self.param_dtype, name="bn1")(x)
        x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features = []
        for stage, (count, dcn) in enumerate(zip(blocks, flags)):
            for i in range(count):
                x = _Block(self.width * 2**stage, 2 if stage > 0 and i == 0 else 1, bottleneck,
                           dcn, self.dcn_modulated, self.offset_groups, self.norm, self.dtype,
                           self.param_dtype, name=f"layer{stage + 1}_{i}")(x, train)
            features.append(x)
        if self.num_classes is None:
            return tuple(features)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="fc")(x.mean(axis=(1, 2)))
