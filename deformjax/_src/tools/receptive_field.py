"""Receptive fields of stacked convolutions."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp

from deformjax._src import args, geometry

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
        field += (geometry.window_size(kernel_size, dilation) - 1) * jump
        jump *= stride
        sizes.append(field)
    return sizes


def effective_receptive_field(
    fn: Callable[[jax.Array], jax.Array],
    inputs: jax.Array,
    position: Sequence[int] | None = None,
) -> jax.Array:
    """The effective receptive field of one output unit (Luo et al. 2016).

    The gradient of the unit's summed output channels with respect to the
    input, by ``jax.grad``: how strongly each input pixel moves the unit. Unlike
    :func:`receptive_field`'s theoretical size it shows which pixels actually
    count: the gridding holes of dilated stacks, the Gaussian fall-off of plain
    stacks, and the shapes deformable layers give it.

    Args:
      fn: maps ``inputs`` ``(N, H, W, C)`` to features ``(N, H', W', C')``
        (e.g. ``lambda x: model.apply(variables, x)``).
      inputs: ``(N, H, W, C)``; the field is averaged over the batch.
      position: ``(row, col)`` of the unit on the output grid; the centre when
        ``None``.

    Returns:
      ``(H, W)``: absolute gradient summed over input channels, averaged over
      the batch, normalised to a maximum of 1 (all zeros if nothing depends on
      the input).

    Example:
      >>> import jax.numpy as jnp
      >>> from deformjax import dilated_conv, effective_receptive_field
      >>> kernel = jnp.ones((3, 3, 1, 1))
      >>> erf = effective_receptive_field(
      ...     lambda x: dilated_conv(x, kernel, dilation=2), jnp.ones((1, 9, 9, 1)))
      >>> [int(i) for i in jnp.nonzero(erf[4])[0]]
      [2, 4, 6]
    """
    inputs = jnp.asarray(inputs)
    if inputs.ndim != 4:
        raise args.fail(
            "effective_receptive_field",
            f"inputs must have rank 4 (N, H, W, C); got shape {inputs.shape}",
        )
    out_shape = jax.eval_shape(fn, inputs).shape
    if position is None:
        position = (out_shape[1] // 2, out_shape[2] // 2)
    row, col = (int(p) for p in position)
    if not (0 <= row < out_shape[1] and 0 <= col < out_shape[2]):
        raise args.fail(
            "effective_receptive_field",
            f"position must lie on the output grid {out_shape[1]}x{out_shape[2]}; got {position}",
        )

    def unit(x):
        return jnp.sum(fn(x)[:, row, col, :])

    grad = jnp.abs(jax.grad(unit)(inputs)).sum(axis=-1).mean(axis=0)
    top = grad.max()
    return jnp.where(top > 0, grad / jnp.where(top > 0, top, 1), 0)
