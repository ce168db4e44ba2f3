"""PyTorch checkpoints into deformjax: :func:`load_torch_state_dict`."""

from deformjax._src.interop import load_torch_state_dict

__all__ = ["load_torch_state_dict"]
