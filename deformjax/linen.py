"""The Flax linen modules: ``DeformConv``, ``DilatedConv``, ``ASPP``, ``DeformRoIPool``,
``DeformPSRoIPool``, ``DCNv3``.

The same classes as ``deformjax.<Name>``; their NNX twins are in ``deformjax.nnx``.
"""

from deformjax._src.linen.aspp import ASPP
from deformjax._src.linen.conv import DeformConv, DilatedConv
from deformjax._src.linen.dcnv3 import DCNv3
from deformjax._src.linen.roi_pool import DeformPSRoIPool, DeformRoIPool

__all__ = ["ASPP", "DCNv3", "DeformConv", "DeformPSRoIPool", "DeformRoIPool", "DilatedConv"]
