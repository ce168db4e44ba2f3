"""Flax NNX modules: ``DeformConv``, ``DilatedConv``, ``ASPP``, ``DeformRoIPool``,
``DeformPSRoIPool``, ``DCNv3``, and the model ``ResNet`` (with ``FrozenBatchNorm``).

Native ``flax.nnx`` twins of the linen modules (``deformjax.<Name>``), built
the NNX way (``in_features`` first, ``rngs=``), with the same parameter names,
shapes and layouts: a linen module and its twin holding the same values
compute the same outputs, and :func:`from_linen` / :func:`to_linen` carry
variables across in one line. Predicted offsets and masks are read with
``nnx.capture(model, nnx.Intermediate)(x)``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> import deformjax, deformjax.nnx as djnnx
  >>> x = jnp.ones((1, 8, 8, 4))
  >>> variables = deformjax.DeformConv(6, 3).init(jax.random.key(0), x)
  >>> layer = djnnx.DeformConv(4, 6, 3, rngs=nnx.Rngs(1))
  >>> djnnx.from_linen(layer, variables)
  >>> bool(jnp.allclose(layer(x), deformjax.DeformConv(6, 3).apply(variables, x)))
  True
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from deformjax._src.nnx.aspp import ASPP
from deformjax._src.nnx.conv import DeformConv, DilatedConv
from deformjax._src.nnx.dcnv3 import DCNv3
from deformjax._src.nnx.resnet import FrozenBatchNorm, ResNet
from deformjax._src.nnx.roi_pool import DeformPSRoIPool, DeformRoIPool

__all__ = [
    "ASPP",
    "DCNv3",
    "DeformConv",
    "DeformPSRoIPool",
    "DeformRoIPool",
    "DilatedConv",
    "FrozenBatchNorm",
    "ResNet",
    "from_linen",
    "to_linen",
]

_COLLECTIONS = (("params", nnx.Param), ("batch_stats", nnx.BatchStat))


def from_linen(model: nnx.Module, variables: dict[str, Any]) -> None:
    """Loads a linen twin's variables into ``model``, in place.

    ``variables`` is what the linen twin's ``init`` returned,
    ``{'params': ..., 'batch_stats': ...}``: ``params`` become the model's
    ``nnx.Param`` values and ``batch_stats`` its ``nnx.BatchStat`` values, name
    for name (a missing or extra name raises ``ValueError``). Every array keeps its
    shape and layout (a kernel ``(kh, kw, C_in, C_out)`` in both front-ends).
    """
    for collection, kind in _COLLECTIONS:
        state = nnx.state(model, kind)
        if collection not in variables:
            if nnx.to_pure_dict(state):
                raise ValueError(f"from_linen: variables has no {collection!r} collection")
            continue
        nnx.replace_by_pure_dict(state, variables[collection])
        nnx.update(model, state)


def to_linen(model: nnx.Module) -> dict[str, Any]:
    """The variables of ``model``'s linen twin, for ``twin.apply(to_linen(model), x)``.

    ``{'params': ...}`` and, when the model has batch statistics,
    ``'batch_stats'``; every array keeps its shape and layout (a kernel
    ``(kh, kw, C_in, C_out)`` in both front-ends).
    """
    variables = {}
    for collection, kind in _COLLECTIONS:
        pure = nnx.to_pure_dict(nnx.state(model, kind))
        if pure or collection == "params":
            variables[collection] = pure
    return variables
