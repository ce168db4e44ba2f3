"""DCNv3: InternImage's grouped deformable aggregation (no weights)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deformjax._src import args, geometry, sampled_matmul, sampling

_FN = "dcnv3"


def dcnv3(
    x: jax.Array,
    offset: jax.Array,
    mask: jax.Array,
    *,
    kernel_size: int | tuple[int, int],
    strides: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    groups: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
) -> jax.Array:
    """InternImage's DCNv3 core: grouped deformable aggregation, with no weights.

    The channels of ``x`` are split into ``groups`` contiguous blocks of
    ``D = C / groups``. For every output position and group, each of the ``P``
    points of a ``kh x kw`` window (without its centre when ``remove_center``)
    is moved by a learned offset, sampled bilinearly (zeros outside the image)
    and weighted by the mask; the ``P`` weighted samples are summed. Numerically
    InternImage's reference (``dcnv3_core_pytorch``), forward and gradients,
    with channels last and InternImage's own offset / mask layout, so that its
    weights port unchanged.

    Args:
      x: input, ``(N, H, W, C)`` with ``C = groups * D``.
      offset: ``(N, H_out, W_out, groups * P * 2)``, indexed
        ``(g * P + q) * 2 + {0: dx, 1: dy}`` (x first), in input pixels before
        ``offset_scale``. Points are column-major: point ``q`` is tap
        ``t = kc * kh + kr`` (kernel column ``kc`` outer, row ``kr`` inner),
        with the centre tap skipped when ``remove_center``.
      mask: ``(N, H_out, W_out, groups * P)``, indexed ``g * P + q``; used as
        given (InternImage's layer applies a softmax over each group's ``P``).
      kernel_size: int or ``(kh, kw)``.
      strides: int or ``(h, w)``, at least 1.
      padding: int or ``(h, w)``, at least 0, on both sides of each axis.
      dilation: int or ``(h, w)``, at least 1.
      groups: the number of channel groups, dividing ``C``.
      offset_scale: multiplies the regular grid around the window centre and
        the offsets alike (InternImage's rule).
      remove_center: drop the centre point (odd square kernels only), so
        ``P = kh * kw - 1``; otherwise ``P = kh * kw``.

    Returns:
      ``(N, H_out, W_out, C)`` in the promoted dtype of the inputs, with
      ``H_out = (H + 2 * padding_h - dilation_h * (kh - 1) - 1) // strides_h + 1``
      (likewise ``W_out``). Point ``(kr, kc)`` of output ``(ho, wo)`` samples
      ``y = ho * s_h - p_h + c_h + offset_scale * (kr * d_h - c_h + dy)`` with
      ``c_h = d_h * (kh - 1) // 2`` (likewise ``x`` with ``dx``); coordinates
      are computed in float32 at least.

    Example:
      >>> import jax.numpy as jnp
      >>> from deformjax import dcnv3
      >>> x = jnp.ones((2, 8, 8, 16))
      >>> offset = jnp.zeros((2, 8, 8, 4 * 9 * 2))
      >>> mask = jnp.full((2, 8, 8, 4 * 9), 1 / 9)
      >>> dcnv3(x, offset, mask, kernel_size=3, groups=4).shape
      (2, 8, 8, 16)
    """
    x, offset, mask = jnp.asarray(x), jnp.asarray(offset), jnp.asarray(mask)
    spec = check(x, offset, mask, kernel_size=kernel_size, strides=strides, padding=padding,
                 dilation=dilation, groups=groups, offset_scale=offset_scale,
                 remove_center=remove_center)
    return _dcnv3(x, offset, mask, offset_scale=float(offset_scale), **spec)


def points(kernel_size: tuple[int, int], remove_center: bool) -> tuple[np.ndarray, np.ndarray]:
    """Kernel row and column of each of the ``P`` points, in InternImage's order."""
    kh, kw = kernel_size
    kc, kr = np.meshgrid(np.arange(kw), np.arange(kh), indexing="ij")  # kc outer, kr inner
    kr, kc = kr.reshape(-1), kc.reshape(-1)
    if remove_center:
        keep = ~((kr == (kh - 1) // 2) & (kc == (kw - 1) // 2))
        kr, kc = kr[keep], kc[keep]
    return kr, kc


@functools.partial(jax.jit, static_argnames=("kernel_size", "strides", "padding", "dilation",
                                             "groups", "offset_scale", "remove_center"))
def _dcnv3(x, offset, mask, *, kernel_size, strides, padding, dilation, groups, offset_scale,
           remove_center):
    n, h, w, c = x.shape
    _, ho, wo, _ = offset.shape
    kr, kc = points(kernel_size, remove_center)
    p = kr.size
    d = c // groups
    dtype, acc = args.compute_dtypes(x, offset, mask)
    (sh, sw), (ph, pw), (dh, dw) = strides, padding, dilation
    ch, cw = dh * (kernel_size[0] - 1) // 2, dw * (kernel_size[1] - 1) // 2

    # Per point, (N, H_out, W_out, G, P): the window centre plus the scaled grid
    # and offset. The grid terms are exact small integers, also in float32.
    off = offset.astype(acc).reshape(n, ho, wo, groups, p, 2)
    centre_y = (jnp.arange(ho) * sh - ph + ch).astype(acc)[:, None, None, None]
    centre_x = (jnp.arange(wo) * sw - pw + cw).astype(acc)[None, :, None, None]
    ys = centre_y + offset_scale * (jnp.asarray(kr * dh - ch, acc) + off[..., 1])
    xs = centre_x + offset_scale * (jnp.asarray(kc * dw - cw, acc) + off[..., 0])
    index, weights = sampling.locate(
        ys,
        xs,
        jnp.arange(n).reshape(n, 1, 1, 1, 1),
        size=(h, w),
        mode="zeros",
        zero_row=n * h * w * groups,
        scale=mask.astype(acc).reshape(n, ho, wo, groups, p),
        groups=groups,
        group=jnp.arange(groups)[:, None],
    )  # (N, H_out, W_out, G, P, 4) each
    image = sampling.with_zero_row(x.astype(dtype).reshape(n * h * w * groups, d))
    m = n * ho * wo
    row_bytes = groups * p * d * jnp.dtype(acc).itemsize
    out = sampled_matmul.per_platform(
        functools.partial(_aggregate, image),
        _chunk_rows(m, row_bytes),
        index.reshape(m, groups, p, 4),
        weights.reshape(m, groups, p, 4),
    )  # (M, G, D)
    return out.reshape(n, ho, wo, c).astype(dtype)


# Bytes of one corner's gathered rows per chunk on a CPU (see _aggregate).
CHUNK_BYTES = 2**20


def _chunk_rows(rows: Any, row_bytes: int) -> int | None:
    """Output positions per chunk on a CPU; None for one chunk (also for a symbolic count)."""
    if not isinstance(rows, int):
        return None
    count = -(-rows * row_bytes // CHUNK_BYTES)
    return None if count <= 1 else -(-rows // count)


def _aggregate(image, chunk, index, weights):
    """The samples summed over the points (``sampling.point_sums``), ``(M, G, D)``.

    On a CPU a few thousand output positions at a time (``lax.map`` of a
    ``jax.checkpoint``-ed body): the gathered corner rows (``P`` times the
    output per corner) are written out before their sum, and for the whole
    layer they would not stay in cache; chunks of about ``CHUNK_BYTES`` per
    corner do, and the backward pass recomputes each chunk's rows instead of
    storing them all. Accelerators get a single chunk.
    """

    def body(index, weights):
        return sampling.point_sums(image, index, weights)

    if chunk is None:
        return body(index, weights)
    rows = index.shape[0]
    count = -(-rows // chunk)
    # Padding rows read the zero row with weight 0.
    index = jnp.pad(index, [(0, count * chunk - rows)] + [(0, 0)] * 3,
                    constant_values=image.shape[0] - 1)
    weights = jnp.pad(weights, [(0, count * chunk - rows)] + [(0, 0)] * 3)
    out = jax.lax.map(
        lambda a: jax.checkpoint(body)(*a),
        (index.reshape((count, chunk) + index.shape[1:]),
         weights.reshape((count, chunk) + weights.shape[1:])),
    )
    return out.reshape((count * chunk,) + out.shape[2:])[:rows]


def check_settings(*, kernel_size, strides, padding, dilation, groups, offset_scale,
                   remove_center, fn: str = _FN) -> dict[str, Any]:
    """Validates ``dcnv3``'s static arguments; returns them normalised."""
    kernel_size = args.as_pair(kernel_size, "kernel_size", fn)
    strides = args.as_pair(strides, "strides", fn)
    padding = args.as_pair(padding, "padding", fn, minimum=0)
    dilation = args.as_pair(dilation, "dilation", fn)
    groups = args.check_positive_int(fn, "groups", groups)
    if not args.is_real(offset_scale) or not np.isfinite(offset_scale):
        raise args.fail(fn, f"offset_scale must be a finite real number; got {offset_scale!r}")
    if not isinstance(remove_center, (bool, np.bool_)) and remove_center not in (0, 1):
        raise args.fail(fn, f"remove_center must be a bool; got {remove_center!r}")
    remove_center = bool(remove_center)
    kh, kw = kernel_size
    if remove_center and (kh != kw or kh % 2 == 0):
        raise args.fail(fn, "remove_center needs an odd, square kernel_size; got "
                        f"kernel_size {kernel_size}")
    return dict(kernel_size=kernel_size, strides=strides, padding=padding, dilation=dilation,
                groups=groups, remove_center=remove_center)


def check(x, offset, mask, *, fn: str = _FN, **settings) -> dict[str, Any]:
    """Validates all of ``dcnv3``'s arguments; returns the static ones normalised."""
    args.check_floating(fn, x=x, offset=offset, mask=mask)
    args.check_rank(fn, "x", x, 4, "(N, H, W, C)")
    spec = check_settings(fn=fn, **settings)
    n, h, w, c = x.shape
    groups, (kh, kw), padding = spec["groups"], spec["kernel_size"], spec["padding"]
    if h < 1 or w < 1:
        raise args.fail(fn, f"x must have H, W >= 1 to sample from; got shape {x.shape}")
    if c % groups:
        raise args.fail(fn, f"groups must divide x.shape[-1] (C); got groups {groups} for C {c}")
    pads = ((padding[0], padding[0]), (padding[1], padding[1]))
    out_h, out_w = geometry.LayerGeometry(
        spec["kernel_size"], spec["strides"], pads, spec["dilation"]).output_hw((h, w), fn)
    p = kh * kw - int(spec["remove_center"])
    for name, array, per_point, layout in (
        ("offset", offset, 2, "(N, H_out, W_out, groups * P * 2)"),
        ("mask", mask, 1, "(N, H_out, W_out, groups * P)"),
    ):
        args.check_rank(fn, name, array, 4, layout)
        expected = (n, out_h, out_w, groups * p * per_point)
        if array.shape != expected:
            raise args.fail(
                fn,
                f"{name}.shape must be {layout} = {expected} (P = {p} points of a {kh}x{kw} "
                f"kernel{', centre removed' if spec['remove_center'] else ''}); "
                f"got {array.shape}",
            )
    args.check_rows(fn, n * h * w * groups + 1,
                    f"N * H * W * groups + 1 = {n} * {h} * {w} * {groups} + 1")
    return spec
