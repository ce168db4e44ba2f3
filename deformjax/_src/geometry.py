"""The geometry of a convolution layer, resolved once.

Every op check, module, ``layer_geometry`` and ``receptive_field`` goes through
:func:`resolve` / :class:`LayerGeometry`: the window of a dilated kernel, the
explicit padding, and the output size (the one place its formula is written).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from deformjax._src import args

Pair = tuple[int, int]
Padding = tuple[Pair, Pair]


def window_size(kernel: int, dilation: int) -> int:
    """Pixels spanned by ``kernel`` taps ``dilation`` apart: ``(kernel - 1) * dilation + 1``."""
    return (kernel - 1) * dilation + 1


class LayerGeometry(NamedTuple):
    """The static geometry of one convolution layer (explicit padding).

    Fields: ``kernel_size`` ``(kh, kw)``, ``strides`` ``(sh, sw)``, ``padding``
    ``((top, bottom), (left, right))``, ``dilation`` ``(dh, dw)``; made by
    :func:`layer_geometry`.
    """

    kernel_size: Pair
    strides: Pair = (1, 1)
    padding: Padding = ((0, 0), (0, 0))
    dilation: Pair = (1, 1)

    @property
    def window(self) -> Pair:
        """``(h, w)`` pixels spanned by the dilated kernel."""
        return (
            window_size(self.kernel_size[0], self.dilation[0]),
            window_size(self.kernel_size[1], self.dilation[1]),
        )

    def output_hw(self, in_hw: Sequence[Any], fn: str = "layer_geometry") -> Pair:
        """``(H_out, W_out)`` for an input ``(H, W)``; raises ``ValueError`` naming ``fn``
        if the output would be empty. Sizes may be symbolic (``jax.export``)."""
        out = tuple(
            (size + lo + hi - window) // stride + 1
            for size, (lo, hi), window, stride in zip(in_hw, self.padding, self.window,
                                                       self.strides)
        )
        if any(size < 1 for size in out):  # no min(): symbolic sizes compare to ints only
            raise args.fail(
                fn,
                f"the output would be empty: input {in_hw[0]}x{in_hw[1]} with padding "
                f"{self.padding}, a {self.kernel_size[0]}x{self.kernel_size[1]} kernel, "
                f"dilation {self.dilation} and strides {self.strides} give {out[0]}x{out[1]}",
            )
        return out  # type: ignore[return-value]


def resolve(
    fn: str,
    kernel_size: Any,
    strides: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    *,
    in_hw: Sequence[Any] | None,
    names: tuple[str, str, str] = ("kernel_size", "strides", "dilation"),
) -> LayerGeometry:
    """Validates and normalises a layer's hyper-parameters.

    Args:
      fn: the function or module named in error messages.
      kernel_size, strides, dilation: int or ``(h, w)``, each at least 1.
      padding: int, ``(ph, pw)``, ``((top, bottom), (left, right))``,
        ``'SAME'`` or ``'VALID'`` (any case), as ``lax.conv_general_dilated``.
      in_hw: the input ``(H, W)``; needed for ``'SAME'``.
      names: the names of ``kernel_size``, ``strides`` and ``dilation`` in
        ``fn``'s own vocabulary (a module's ``kernel_dilation``).
    """
    kernel_size = args.as_pair(kernel_size, names[0], fn)
    strides = args.as_pair(strides, names[1], fn)
    dilation = args.as_pair(dilation, names[2], fn)
    if isinstance(padding, str) and in_hw is None:
        raise args.fail(fn, f"in_hw is needed to resolve padding {padding!r}; got None")
    window = (window_size(kernel_size[0], dilation[0]), window_size(kernel_size[1], dilation[1]))
    pads = args.as_padding(padding, fn, in_hw=tuple(in_hw or (0, 0)), window_hw=window,
                           strides=strides)
    return LayerGeometry(kernel_size, strides, pads, dilation)


def check_conv(fn: str, x, kernel, bias, strides, padding, dilation, feature_group_count):
    """Validates the arguments every convolution op shares; returns them normalised.

    Returns ``(geometry, feature_group_count, (H_out, W_out))``.
    """
    args.check_rank(fn, "x", x, 4, "(N, H, W, C_in)")
    args.check_rank(fn, "kernel", kernel, 4, "(kh, kw, C_in // feature_group_count, C_out)")
    groups = args.check_positive_int(fn, "feature_group_count", feature_group_count)
    _, h, w, c_in = x.shape
    kh, kw, _, c_out = kernel.shape
    args.check_conv_kernel(fn, kernel.shape, c_in, groups)
    geo = resolve(fn, (kh, kw), strides, padding, dilation, in_hw=(h, w))
    out_hw = geo.output_hw((h, w), fn)
    if bias is not None and bias.shape != (c_out,):
        raise args.fail(fn, f"bias.shape must be (C_out,) = ({c_out},); got {bias.shape}")
    return geo, groups, out_hw
