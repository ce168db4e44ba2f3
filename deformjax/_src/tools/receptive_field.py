"""Receptive fields of stacked convolutions."""

from __future__ import annotations

from collections.abc import Iterable

from deformjax._src import args

_FN = "receptive_field"


def receptive_field(layers: Iterable[tuple[int, int, int]]) -> list[int]:
    """Receptive field size after each layer of a stack of convolutions.

    A layer with kernel size ``k``, dilation ``d`` and stride ``s`` adds
    ``(k - 1) * d * jump`` input pixels to the receptive field, where ``jump``
    is the product of the strides of the layers before it.

    Args:
      layers: a sequence of ``(kernel_size, dilation, stride)``, positive ints.

    Returns:
      The receptive field (in input pixels, along one axis) after each layer.

    Example:
      >>> from deformjax import receptive_field
      >>> receptive_field([(3, 1, 1), (3, 2, 1), (3, 4, 1)])
      [3, 7, 15]
    """
    field, jump, sizes = 1, 1, []
    for index, layer in enumerate(layers):
        if (
            not isinstance(layer, (tuple, list))
            or len(layer) != 3
            or not all(args.is_int(v) and v >= 1 for v in layer)
        ):
            raise args.fail(
                _FN,
                f"layers[{index}] must be (kernel_size, dilation, stride) of positive ints; "
                f"got {layer!r}",
            )
        kernel_size, dilation, stride = (int(v) for v in layer)
        field += (kernel_size - 1) * dilation * jump
        jump *= stride
        sizes.append(field)
    return sizes
