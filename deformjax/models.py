"""Models built from deformjax's layers: ``ResNet`` with deformable stages (linen).

``FrozenBatchNorm`` is the fixed batch norm of its ``norm='frozen'`` (detection
backbones).
"""

from deformjax._src.models.resnet import FrozenBatchNorm, ResNet

__all__ = ["FrozenBatchNorm", "ResNet"]
