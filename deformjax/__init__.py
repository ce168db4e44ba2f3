"""deformjax: deformable and dilated convolutions for JAX and Flax.

Channels-last (NHWC) inputs and HWIO kernels throughout. The ops are pure
functions, jit-able and differentiable to any order (adaptive RoI sampling:
reverse mode only). The Flax modules exist
twice, with the same parameters: linen (``deformjax.DeformConv``, also
``deformjax.linen.DeformConv``) and NNX (``deformjax.nnx.DeformConv``). See
the README.
"""

from deformjax import linen as linen, nnx as nnx  # the two front-ends, as submodules
from deformjax._src.linen.aspp import ASPP
from deformjax._src.linen.conv import DeformConv, DilatedConv
from deformjax._src.linen.dcnv3 import DCNv3
from deformjax._src.linen.roi_pool import DeformPSRoIPool, DeformRoIPool
from deformjax._src.ops.dcnv3 import dcnv3
from deformjax._src.ops.deform_conv import deform_conv
from deformjax._src.ops.deform_roi_pool import (
    deform_ps_roi_pool,
    deform_roi_pool,
    multi_level_deform_roi_pool,
    roi_levels,
)
from deformjax._src.ops.dilated_conv import dilated_conv
from deformjax._src.tools.locations import LayerGeometry, layer_geometry, sampling_locations
from deformjax._src.tools.receptive_field import effective_receptive_field, receptive_field

__version__ = "0.1.0"

__all__ = [
    "ASPP",
    "DCNv3",
    "DeformConv",
    "DeformPSRoIPool",
    "DeformRoIPool",
    "DilatedConv",
    "LayerGeometry",
    "dcnv3",
    "deform_conv",
    "deform_ps_roi_pool",
    "deform_roi_pool",
    "dilated_conv",
    "effective_receptive_field",
    "layer_geometry",
    "multi_level_deform_roi_pool",
    "receptive_field",
    "roi_levels",
    "sampling_locations",
]
