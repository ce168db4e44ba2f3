"""load_torch_state_dict and models.ResNet against torch modules (committed fixtures)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture

from deformjax import DCNv3, DeformConv, DeformRoIPool
from deformjax.interop import load_torch_state_dict
from deformjax._src.models.resnet import DEPTHS
from deformjax.models import ResNet


def state(arrays):
    return {k[len("state."):]: v for k, v in arrays.items() if k.startswith("state.")}


def as32(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


@pytest.mark.parametrize("name", ["resnet18_frozen", "resnet50_dcnv2"])
def test_resnet_from_torchvision_and_mmdet_names(name):
    a, meta = load_fixture("interop", name)
    kw = dict(stage_with_dcn=tuple(meta.get("stage_with_dcn", [False] * 4)),
              dcn_modulated=meta.get("dcn_modulated", True),
              offset_groups=meta.get("offset_groups", 1), norm=meta["norm"], width=meta["width"])
    x = jnp.asarray(a["x"], jnp.float32)
    model = ResNet(meta["depth"], num_classes=meta["num_classes"], **kw)
    # strict: every variable comes from the state dict, so shapes are all init must give
    shapes = jax.eval_shape(model.init, jax.random.key(0), x[:1])
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), shapes)
    loaded = load_torch_state_dict(shapes, state(a))
    last = {f"layer{s + 1}_{n - 1}" for s, n in enumerate(DEPTHS[meta["depth"]][1])}

    @jax.jit
    def run(variables, x):  # logits, and the stage outputs C2..C5 (each stage's last block)
        return model.apply(variables, x, capture_intermediates=lambda m, method: (m.name in last
                                                                    and method == "__call__"),
                           mutable="intermediates")

    logits, inter = run(loaded, x)
    np.testing.assert_allclose(logits, a["logits"], rtol=0, atol=1e-4 * np.abs(a["logits"]).max())
    for s, block in enumerate(sorted(last)):
        ref = a[f"c{s + 2}"]
        np.testing.assert_allclose(inter["intermediates"][block]["__call__"][0], ref, rtol=0,
                                   atol=1e-4 * np.abs(ref).max(), err_msg=block)
    # num_classes=None returns them; its variables are the same but "fc"
    backbone = ResNet(meta["depth"], **kw)
    feats = jax.eval_shape(backbone.apply,
                           {"params": {k: v for k, v in loaded["params"].items() if k != "fc"},
                            "batch_stats": loaded["batch_stats"]}, x)
    assert [f.shape for f in feats] == [a[f"c{s + 2}"].shape for s in range(4)]


@pytest.mark.parametrize("name", ["mdcn_pack", "dcn_pack"])
def test_mmcv_deform_conv_packs(name):
    a, meta = load_fixture("interop", name)
    layer = DeformConv(meta["features"], meta["kernel_size"], padding=1,
                       offset_groups=meta["offset_groups"], modulated=meta["modulated"])
    x = jnp.asarray(a["x"], jnp.float32)
    variables = load_torch_state_dict(as32(layer.init(jax.random.key(0), x)), state(a))
    out = layer.apply(variables, x)
    np.testing.assert_allclose(out, a["out"], rtol=0, atol=1e-5 * np.abs(a["out"]).max())


@pytest.mark.parametrize("name", ["roi_pool_pack", "mroi_pool_pack"])
def test_mmcv_deform_roi_pool_packs(name):
    a, meta = load_fixture("interop", name)
    pool = DeformRoIPool(tuple(meta["output_size"]), spatial_scale=meta["spatial_scale"],
                         sampling_ratio=meta["sampling_ratio"], gamma=meta["gamma"],
                         modulated=meta["modulated"],
                         deform_fc_channels=meta["deform_fc_channels"])
    f, rois = jnp.asarray(a["features"], jnp.float32), jnp.asarray(a["rois"], jnp.float32)
    variables = load_torch_state_dict(as32(pool.init(jax.random.key(0), f, rois)), state(a))
    out, inter = pool.apply(variables, f, rois, mutable="intermediates")
    assert float(jnp.abs(inter["intermediates"]["offsets"][0]).max()) > 0.05  # bins do move
    np.testing.assert_allclose(out, a["out"], rtol=0, atol=1e-5 * np.abs(a["out"]).max())


def test_internimage_dcnv3_names():
    a, meta = load_fixture("dcnv3", "module_cfs")
    layer = DCNv3(meta["channels"], meta["kernel_size"], groups=meta["group"],
                  offset_scale=meta["offset_scale"], center_feature_scale=True,
                  param_dtype=jnp.float64)
    sd = {k[len("param."):]: v for k, v in a.items() if k.startswith("param.")}
    variables = load_torch_state_dict(layer.init(jax.random.key(0), a["x"]), sd)
    np.testing.assert_allclose(layer.apply(variables, a["x"]), a["out"], rtol=0, atol=1e-10)


def test_errors_name_the_key():
    a, meta = load_fixture("interop", "mdcn_pack")
    layer = DeformConv(6, 3, padding=1, offset_groups=2, modulated=True)
    variables = layer.init(jax.random.key(0), jnp.ones((1, 5, 5, 8), jnp.float32))
    sd = state(a)
    with pytest.raises(ValueError, match=r"load_torch_state_dict: missing from the state dict: "
                                         r"conv_offset\.bias"):
        load_torch_state_dict(variables, {k: v for k, v in sd.items() if k != "conv_offset.bias"})
    with pytest.raises(ValueError, match=r"unexpected in the state dict: extra\.weight"):
        load_torch_state_dict(variables, {**sd, "extra.weight": np.zeros(3)})
    with pytest.raises(ValueError, match=re.escape("mis-shaped: weight has shape (6, 8, 5, 5), "
                                                   "expected (6, 8, 3, 3)")):
        load_torch_state_dict(variables, {**sd, "weight": np.zeros((6, 8, 5, 5))})
    # strict=False keeps what the state dict lacks (torchvision's DeformConv2d has no
    # offset branch); a prefix selects and strips the names of one part of a model.
    tv = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("conv_offset")}
    tv["neck.weight"] = np.zeros(2)
    loaded = load_torch_state_dict(variables, tv, prefix="backbone.", strict=False)
    np.testing.assert_array_equal(loaded["params"]["offset"]["kernel"],
                                  variables["params"]["offset"]["kernel"])
    np.testing.assert_allclose(loaded["params"]["kernel"], sd["weight"].transpose(2, 3, 1, 0))
    with pytest.raises(ValueError, match=re.escape("no torch layout is known for the variable "
                                                   "stray (shape (3,))")):
        load_torch_state_dict({"params": {**variables["params"], "stray": jnp.zeros(3)}}, sd)
    # nothing inside the offset branch is skipped silently
    stray = {**variables["params"], "offset": {**variables["params"]["offset"],
                                               "scale": jnp.ones(3)}}
    with pytest.raises(ValueError, match=re.escape("no torch layout is known for the variable "
                                                   "offset/scale (shape (3,))")):
        load_torch_state_dict({"params": stray}, sd)
    with pytest.raises(ValueError, match=re.escape("variable offset (expected a convolution's")):
        load_torch_state_dict({"params": {**variables["params"], "offset": jnp.zeros(3)}}, sd)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        load_torch_state_dict(variables, [("weight", sd["weight"])])


def test_fresh_dcn_resnet_is_the_plain_resnet_and_half_of_it_when_modulated():
    """Step 0 of fine-tuning a torchvision checkpoint: zero offsets sample the grid
    (DCNv1 = the plain ResNet); a fresh DCNv2 mask is sigmoid(0) = 0.5 (mmcv / mmdet),
    so every deformable conv2 acts at half strength."""
    a, meta = load_fixture("interop", "resnet18_frozen")
    x = jnp.asarray(a["x"], jnp.float32)
    sd = state(a)
    halved = {k: (0.5 * v if re.fullmatch(r"layer[234]\.\d+\.conv2\.weight", k) else v)
              for k, v in sd.items()}
    plain = ResNet(18, norm="frozen", width=8, num_classes=10)
    shapes = jax.eval_shape(plain.init, jax.random.key(0), x[:1])
    half = jax.jit(plain.apply)(load_torch_state_dict(shapes, halved), x)
    dcn = (False, True, True, True)
    for modulated, expected in ((False, a["logits"]), (True, half)):
        model = ResNet(18, stage_with_dcn=dcn, dcn_modulated=modulated, norm="frozen", width=8,
                       num_classes=10)
        # A fresh model's offset branches are zeros (tested with the modules); all else
        # comes from the state dict, so zeros of the right shapes stand for init.
        fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32),
                             jax.eval_shape(model.init, jax.random.key(1), x[:1]))
        with pytest.raises(ValueError, match=r"missing from the state dict: "
                                             r"layer2\.0\.conv2\.conv_offset\.bias"):
            load_torch_state_dict(fresh, sd)
        out = jax.jit(model.apply)(load_torch_state_dict(fresh, sd, strict=False), x)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert not np.allclose(half, a["logits"], atol=1e-2)


def test_resnet_errors():
    for kwargs, message in [
        (dict(depth=20), "ResNet: depth must be one of [18, 34, 50, 101]; got 20"),
        (dict(depth=18, stage_with_dcn=(True,)), "ResNet: stage_with_dcn must be 4 bools"),
        (dict(depth=18, norm="group"), "ResNet: norm must be one of ('batch', 'frozen')"),
        (dict(depth=18, stage_with_dcn=(False, True, False, False), offset_groups=3),
         "ResNet: offset_groups must divide"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            ResNet(**kwargs).init(jax.random.key(0), jnp.ones((1, 32, 32, 3), jnp.float32))


def test_nnx_resnet_twin_holds_the_same_variables():
    """torch weights -> linen variables -> the NNX twin (from_linen): the same logits."""
    import deformjax.nnx as djnnx
    from flax import nnx

    a, meta = load_fixture("interop", "resnet18_frozen")
    kw = dict(norm=meta["norm"], width=meta["width"], num_classes=meta["num_classes"])
    x = jnp.asarray(a["x"], jnp.float32)
    shapes = jax.eval_shape(ResNet(meta["depth"], **kw).init, jax.random.key(0), x[:1])
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), shapes)
    loaded = load_torch_state_dict(shapes, state(a))
    twin = djnnx.ResNet(meta["depth"], rngs=nnx.Rngs(0), **kw)
    djnnx.from_linen(twin, loaded)
    twin.eval()  # (frozen batch norm has no training mode; batch norm would need this)
    logits = nnx.jit(lambda m, x: m(x))(twin, x)
    np.testing.assert_allclose(logits, a["logits"], rtol=0, atol=1e-4 * np.abs(a["logits"]).max())
    back = djnnx.to_linen(twin)
    assert jax.tree.map(jnp.shape, back) == jax.tree.map(jnp.shape, loaded)
