"""PyTorch state dicts (torchvision, mmcv, mmdet, InternImage names) -> deformjax variables."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_FN = "load_torch_state_dict"
_DCNV3 = {"input_proj", "dw_conv", "dw_norm", "offset", "mask", "output_proj"}
# Buffers torch keeps that have no counterpart here.
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$")


class Entry(NamedTuple):
    """One deformjax variable and the torch tensor it comes from."""

    collection: str  # 'params' or 'batch_stats'
    path: tuple[str, ...]  # inside the collection
    torch_name: str
    torch_shape: tuple[int, ...]
    convert: Callable[[np.ndarray], np.ndarray]  # torch layout -> ours


def _same(a):
    return a


def _conv_from_torch(w):  # (O, I, kh, kw) -> HWIO
    return w.transpose(2, 3, 1, 0)


def _conv_shape(kernel_shape):  # HWIO -> (O, I, kh, kw)
    kh, kw, i, o = kernel_shape
    return (o, i, kh, kw)


def _torch_child(name: str) -> str:
    """The torch name of a child module: ResNet's ``layer1_0`` is ``layer1.0``, its
    ``downsample_conv`` / ``downsample_bn`` are ``downsample.0`` / ``downsample.1``."""
    match = re.fullmatch(r"layer(\d+)_(\d+)", name)
    if match:
        return f"layer{match.group(1)}.{match.group(2)}"
    return {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(name, name)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and not isinstance(x, Mapping)


def _linear(path, name, node, *, weight=None, bias=None, permute_in=None, permute_out=None):
    """A dense layer: torch ``weight`` ``(out, in)`` is our ``kernel.T``."""
    fan_in, fan_out = node["kernel"].shape

    def kernel(w):
        k = w.T
        if permute_in is not None:
            k = permute_in(k)
        return k if permute_out is None else permute_out(k)

    yield Entry("params", path + ("kernel",), weight or _join(name, "weight"), (fan_out, fan_in),
                kernel)
    if "bias" in node:
        yield Entry("params", path + ("bias",), bias or _join(name, "bias"), (fan_out,),
                    _same if permute_out is None else permute_out)


def _conv(path, name, node):
    yield Entry("params", path + ("kernel",), _join(name, "weight"),
                _conv_shape(node["kernel"].shape), _conv_from_torch)
    if "bias" in node:
        yield Entry("params", path + ("bias",), _join(name, "bias"), node["bias"].shape, _same)


def _norm(path, name, params, stats):
    """Batch norm (``scale``/``bias`` params and ``mean``/``var`` stats), frozen batch
    norm (all four in ``batch_stats``) or layer norm (params only)."""
    params, stats = params or {}, stats or {}
    for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                         ("var", "running_var")):
        if ours in params:
            yield Entry("params", path + (ours,), _join(name, theirs), params[ours].shape, _same)
        elif ours in stats:
            yield Entry("batch_stats", path + (ours,), _join(name, theirs), stats[ours].shape,
                        _same)


def _roi_pool(path, name, node):
    """mmcv's ``DeformRoIPoolPack`` / ``ModulatedDeformRoIPoolPack``: ``offset_fc.{0,2,4}``,
    ``mask_fc.{0,2}``. Their first layers read the pooled RoI flattened ``(C, oh, ow)``
    (ours: ``(oh, ow, C)``) and the offset layer writes ``(2, oh, ow)`` with ``(dx, dy)``
    (ours: ``(oh, ow, 2)`` with ``(dy, dx)``)."""
    bins = node["offset_fc_2"]["kernel"].shape[1] // 2
    channels = node["offset_fc_0"]["kernel"].shape[0] // bins

    def rows_chw_to_hwc(k):  # (C * B, out) -> (B * C, out)
        return k.reshape(channels, bins, -1).transpose(1, 0, 2).reshape(bins * channels, -1)

    def offsets_to_ours(a):  # (..., 2 * B) [dx block, dy block] -> (..., B * 2) (dy, dx)
        lead = a.shape[:-1]
        return a.reshape(lead + (2, bins))[..., ::-1, :].swapaxes(-1, -2).reshape(lead + (-1,))

    torch_index = {"offset_fc_0": "offset_fc.0", "offset_fc_1": "offset_fc.2",
                   "offset_fc_2": "offset_fc.4", "mask_fc_0": "mask_fc.0", "mask_fc_1": "mask_fc.2"}
    for layer in sorted(node):
        if layer not in torch_index:
            yield from _walk(node[layer], None, path + (layer,), _join(name, layer))
            continue
        first = layer.endswith("_fc_0")
        yield from _linear(path + (layer,), _join(name, torch_index[layer]), node[layer],
                           permute_in=rows_chw_to_hwc if first else None,
                           permute_out=offsets_to_ours if layer == "offset_fc_2" else None)


def _dcnv3(path, name, node):
    """InternImage's ``DCNv3`` / ``DCNv3_pytorch`` names."""
    for layer in ("input_proj", "offset", "mask", "output_proj"):
        yield from _linear(path + (layer,), _join(name, layer), node[layer])
    dw = node["dw_conv"]
    yield Entry("params", path + ("dw_conv", "kernel"), _join(name, "dw_conv.0.weight"),
                _conv_shape(dw["kernel"].shape), _conv_from_torch)
    yield Entry("params", path + ("dw_conv", "bias"), _join(name, "dw_conv.0.bias"),
                dw["bias"].shape, _same)
    yield from _norm(path + ("dw_norm",), _join(name, "dw_conv.1.1"), node["dw_norm"], None)
    if "center_feature_scale_proj" in node:
        yield from _linear(path + ("center_feature_scale_proj",), name,
                           node["center_feature_scale_proj"],
                           weight=_join(name, "center_feature_scale_proj_weight"),
                           bias=_join(name, "center_feature_scale_proj_bias"))


def _no_layout(path: tuple[str, ...], detail: str) -> ValueError:
    return ValueError(f"{_FN}: no torch layout is known for the variable {'/'.join(path)} "
                      f"({detail})")


def _shape(value: Any) -> str:
    return f"shape {getattr(value, 'shape', 'a subtree')}"


def _walk(params, stats, path: tuple[str, ...], name: str) -> Iterator[Entry]:
    """The entries of one module's variables, recognised by their structure."""
    params, stats = params or {}, stats or {}
    keys = set(params) | set(stats)
    kernel = params.get("kernel")

    def only(allowed):
        for key in sorted(keys - allowed):
            raise _no_layout(path + (key,), _shape(params.get(key, stats.get(key))))

    if _DCNV3 <= keys:
        yield from _dcnv3(path, name, params)
    elif "offset_fc_0" in keys:
        yield from _roi_pool(path, name, params)
    elif _is_array(kernel) and kernel.ndim == 4:
        only({"kernel", "bias", "offset"})
        yield from _conv(path, name, params)  # also a deformable conv's main kernel
        if "offset" in params:  # a deformable conv's offset branch: a plain convolution
            offset = params["offset"]
            if not (isinstance(offset, Mapping) and _is_array(offset.get("kernel"))
                    and offset["kernel"].ndim == 4):
                raise _no_layout(path + ("offset",), "expected a convolution's kernel and bias")
            extra = sorted(set(offset) - {"kernel", "bias"})
            if extra:
                raise _no_layout(path + ("offset", extra[0]), _shape(offset[extra[0]]))
            yield from _conv(path + ("offset",), _join(name, "conv_offset"), offset)
    elif _is_array(kernel) and kernel.ndim == 2:
        only({"kernel", "bias"})
        yield from _linear(path, name, params)
    elif {"scale", "bias"} <= keys and all(_is_array(v) for v in
                                           list(params.values()) + list(stats.values())):
        only({"scale", "bias", "mean", "var"})
        yield from _norm(path, name, params, stats)
    else:
        for child in sorted(keys):
            p, s = params.get(child), stats.get(child)
            if _is_array(p) or _is_array(s):
                raise _no_layout(path + (child,), _shape(p if p is not None else s))
            yield from _walk(p, s, path + (child,), _join(name, _torch_child(child)))


def torch_names(variables: Mapping[str, Any]) -> list[Entry]:
    """Every variable of ``variables`` (``params`` and ``batch_stats``) with the torch name,
    shape and conversion it is loaded from."""
    return list(_walk(variables.get("params"), variables.get("batch_stats"), (), ""))


def load_torch_state_dict(
    variables: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    *,
    prefix: str = "",
    strict: bool = True,
) -> dict[str, Any]:
    """PyTorch weights, by their torch names, into a deformjax model's variables.

    Args:
      variables: what ``Module.init`` of a deformjax linen module or model
        returned (``{'params': ..., 'batch_stats': ...}``), used for the
        structure, shapes and dtypes.
      state_dict: torch names -> numpy arrays, e.g. from
        ``safetensors.numpy.load_file(path)`` or
        ``{k: v.numpy() for k, v in model.state_dict().items()}``. Nothing is
        unpickled here; convert a ``.pt`` file on your side with
        ``torch.load(path, weights_only=True)``.
      prefix: only names that start with it are read, with it stripped (e.g.
        ``'backbone.'`` for a detector's checkpoint).
      strict: when True every variable must be in the state dict; when False a
        variable it lacks keeps its value (e.g. fresh zero offset branches when
        loading a plain ResNet). Unexpected names raise either way (torch's
        ``num_batches_tracked`` buffers are skipped).

    Understands (see the README's mapping tables): torchvision ``DeformConv2d``
    and mmcv ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack`` (``weight``,
    ``bias``, ``conv_offset.*``) for ``DeformConv``; convolutions, linear and
    (frozen) batch / layer norms; mmcv ``DeformRoIPoolPack`` /
    ``ModulatedDeformRoIPoolPack`` (``offset_fc.*``, ``mask_fc.*``, flattening
    and ``(dx, dy)`` order converted) for ``DeformRoIPool``; torchvision ResNet
    and mmdet ResNet-DCN names for ``deformjax.models.ResNet``; InternImage's
    ``DCNv3`` names for ``DCNv3``.

    Returns:
      New variables of the same structure, dtypes and shapes.

    Raises:
      ValueError: listing missing names (strict), unexpected names, and names
        whose shape differs from the model's, each with both shapes.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"{_FN}: prefix must be a str; got {type(prefix).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{_FN}: state_dict must be a mapping of names to arrays; got "
                        f"{type(state_dict).__name__}")
    given = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    entries = torch_names(variables)
    expected = {e.torch_name for e in entries}
    problems = []
    missing = sorted(n for n in expected if n not in given)
    if missing and strict:
        problems.append(f"missing from the state dict: {', '.join(prefix + n for n in missing)}")
    unexpected = sorted(n for n in given if n not in expected and not _IGNORED.search(n))
    if unexpected:
        names = ", ".join(prefix + n for n in unexpected)
        problems.append(f"unexpected in the state dict: {names}")
    wrong = [f"{prefix}{e.torch_name} has shape {tuple(np.shape(given[e.torch_name]))}, "
             f"expected {e.torch_shape}" for e in entries
             if e.torch_name in given and tuple(np.shape(given[e.torch_name])) != e.torch_shape]
    if wrong:
        problems.append("mis-shaped: " + "; ".join(wrong))
    if problems:
        raise ValueError(f"{_FN}: " + "; ".join(problems)
                         + (" (strict=False keeps variables the state dict lacks)"
                            if missing and strict else ""))
    out = jax.tree.map(lambda a: a, dict(variables))  # a structural copy
    out = {k: _unfreeze(v) for k, v in out.items()}
    for e in entries:
        if e.torch_name not in given:
            continue
        node = out[e.collection]
        for key in e.path[:-1]:
            node = node[key]
        old = node[e.path[-1]]
        node[e.path[-1]] = jnp.asarray(e.convert(np.asarray(given[e.torch_name])), old.dtype)
    return out


def _unfreeze(tree):
    if isinstance(tree, Mapping):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree
