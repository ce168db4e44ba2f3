"""DCNv3: InternImage's core op and layer against its own float64 reference, oracles, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import fixture_names, load_fixture
from flax import nnx
from jax.test_util import check_grads

import deformjax.nnx as djnnx
from deformjax import DCNv3, dcnv3, deform_conv
from deformjax._src.ops import dcnv3 as dcnv3_module

CORE = [n for n in fixture_names("dcnv3") if not n.startswith("module_")]
LAYERS = [n for n in fixture_names("dcnv3") if n.startswith("module_")]


def core_kwargs(meta):
    return dict(kernel_size=(meta["kernel_h"], meta["kernel_w"]),
                strides=(meta["stride_h"], meta["stride_w"]),
                padding=(meta["pad_h"], meta["pad_w"]),
                dilation=(meta["dilation_h"], meta["dilation_w"]), groups=meta["group"],
                offset_scale=meta["offset_scale"], remove_center=bool(meta["remove_center"]))


def test_core_fixture_set_is_complete():
    assert len(CORE) == 11 and len(LAYERS) == 3


@pytest.mark.parametrize("name", CORE)
def test_core_matches_internimage_reference(name):
    a, meta = load_fixture("dcnv3", name)
    kw = core_kwargs(meta)

    def loss(x, offset, mask):
        out = dcnv3(x, offset, mask, **kw)
        return (out * a["cotangent"]).sum(), out

    run = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    grads, out = run(a["x"], a["offset"], a["mask"])
    np.testing.assert_allclose(out, a["out"], rtol=0, atol=1e-10)
    for got, key in zip(grads, ("grad_x", "grad_offset", "grad_mask")):
        np.testing.assert_allclose(got, a[key], rtol=0, atol=1e-10, err_msg=key)


def test_chunked_cpu_path_equals_one_chunk(monkeypatch):
    """The CPU path maps over chunks of output positions; force many on a fixture."""
    a, meta = load_fixture("dcnv3", "far_offsets")
    kw = core_kwargs(meta)

    def loss(x, offset, mask):
        return (dcnv3(x, offset, mask, **kw) * a["cotangent"]).sum()

    # 112 positions of 2 groups * 9 points * 8 channels * 8 bytes: 13 chunks of 9, padded
    monkeypatch.setattr(dcnv3_module, "CHUNK_BYTES", 9 * 1152)
    jax.clear_caches()
    try:
        assert dcnv3_module._chunk_rows(2 * 8 * 7, 1152) == 9
        out = dcnv3(a["x"], a["offset"], a["mask"], **kw)
        grads = jax.grad(loss, argnums=(0, 1, 2))(a["x"], a["offset"], a["mask"])
    finally:
        jax.clear_caches()
    np.testing.assert_allclose(out, a["out"], rtol=0, atol=1e-10)
    for got, key in zip(grads, ("grad_x", "grad_offset", "grad_mask")):
        np.testing.assert_allclose(got, a[key], rtol=0, atol=1e-10, err_msg=key)


def as_depthwise_deform_conv(x, offset, mask, *, kernel_size, strides, padding, dilation,
                             groups, offset_scale, remove_center):
    """The README's equivalence: a depthwise modulated deform_conv with an all-ones kernel."""
    n, ho, wo = offset.shape[:3]
    c = x.shape[-1]
    (kh, kw), (dh, dw) = kernel_size, dilation
    ch, cw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    kr, kc = dcnv3_module.points(kernel_size, remove_center)
    p = kr.size
    off = offset.reshape(n, ho, wo, groups, p, 2)
    dy = offset_scale * off[..., 1] + (offset_scale - 1) * (kr * dh - ch)
    dx = offset_scale * off[..., 0] + (offset_scale - 1) * (kc * dw - cw)
    taps = kr * kw + kc
    new_off = jnp.zeros((n, ho, wo, groups, kh * kw, 2), offset.dtype)
    new_off = new_off.at[..., taps, 0].set(dy).at[..., taps, 1].set(dx)
    new_mask = jnp.zeros((n, ho, wo, groups, kh * kw), mask.dtype)
    new_mask = new_mask.at[..., taps].set(mask.reshape(n, ho, wo, groups, p))
    return deform_conv(x, new_off.reshape(n, ho, wo, -1), jnp.ones((kh, kw, 1, c), x.dtype),
                       new_mask.reshape(n, ho, wo, -1), strides=strides, padding=padding,
                       dilation=dilation, feature_group_count=c)


def random_case(rng, n=2, h=7, w=9, groups=2, d=4, p=8, scale=2.0):
    x = rng.normal(size=(n, h, w, groups * d))
    offset = rng.normal(scale=scale, size=(n, h, w, groups * p * 2))
    mask = rng.uniform(0.1, 2.0, size=(n, h, w, groups * p))
    return x, offset, mask


def test_equals_depthwise_deform_conv_with_ones_kernel(rng):
    """An independent oracle: offset_scale 2 and remove_center change the grid itself."""
    x, offset, mask = random_case(rng)
    kw = dict(kernel_size=(3, 3), strides=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2,
              offset_scale=2.0, remove_center=True)
    cot = rng.normal(size=x.shape)
    ours = jax.value_and_grad(lambda *a: (dcnv3(*a, **kw) * cot).sum(), (0, 1, 2))
    theirs = jax.value_and_grad(lambda *a: (as_depthwise_deform_conv(*a, **kw) * cot).sum(),
                                (0, 1, 2))
    (v1, g1), (v2, g2) = ours(x, offset, mask), theirs(x, offset, mask)
    np.testing.assert_allclose(v1, v2, rtol=1e-12)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-11)


def test_float32_and_bfloat16():
    a, meta = load_fixture("dcnv3", "basic")
    kw = core_kwargs(meta)
    scale = np.abs(a["out"]).max()
    out32 = dcnv3(*(jnp.asarray(a[k], jnp.float32) for k in ("x", "offset", "mask")), **kw)
    assert out32.dtype == jnp.float32
    np.testing.assert_allclose(out32, a["out"], rtol=0, atol=1e-4 * scale)
    # bfloat16 inputs: coordinates in float32. On a 300-pixel-wide image a bfloat16
    # coordinate has a step of 2 pixels; computed in float32 the result equals the
    # float64 op on the same (rounded) inputs to bfloat16's output precision.
    rng = np.random.default_rng(1)
    x, offset, mask = random_case(rng, n=1, h=3, w=300, p=9)
    xb, ob, mb = (jnp.asarray(v, jnp.bfloat16) for v in (x, offset, mask))
    kw = dict(kernel_size=3, groups=2)
    out16 = dcnv3(xb, ob, mb, **kw)
    assert out16.dtype == jnp.bfloat16
    exact = dcnv3(*(jnp.asarray(v, jnp.float64) for v in (xb, ob, mb)), **kw)
    err = np.abs(np.asarray(out16, np.float64) - exact)
    assert err.max() <= 2**-7 * np.abs(exact).max(), err.max()


def test_transformations(rng):
    x, offset, mask = random_case(rng, n=3, h=5, w=6, p=9)
    kw = dict(kernel_size=3, groups=2)
    f = lambda x, o, m: dcnv3(x, o, m, **kw)  # noqa: E731
    batched = f(x, offset, mask)
    vmapped = jax.vmap(lambda x, o, m: f(x[None], o[None], m[None])[0])(x, offset, mask)
    np.testing.assert_allclose(vmapped, batched, rtol=0, atol=1e-12)
    np.testing.assert_allclose(jax.jit(f)(x, offset, mask), batched, rtol=0, atol=1e-12)
    # Second derivatives: the mask enters linearly, the offsets bilinearly; away from
    # integer coordinates d2/d(offset)^2 is the bilinear patch's, checked numerically.
    loss = lambda o, m: (f(x, o, m) ** 2).sum()  # noqa: E731
    check_grads(loss, (offset, mask), order=2, modes=("rev",), eps=1e-6)
    # export with a symbolic batch
    from jax import export

    n = export.symbolic_shape("n")[0]
    spec = [jax.ShapeDtypeStruct((n,) + a.shape[1:], a.dtype) for a in (x, offset, mask)]
    exported = export.deserialize(export.export(jax.jit(f))(*spec).serialize())
    np.testing.assert_allclose(exported.call(x[:2], offset[:2], mask[:2]), batched[:2],
                               rtol=0, atol=1e-12)


def bad(x, offset, mask, **kw):
    return lambda: dcnv3(x, offset, mask, **{"kernel_size": 3, "groups": 2, **kw})


@pytest.mark.parametrize("call, message", [
    (bad(np.zeros((1, 4, 4, 6)), np.zeros((1, 4, 4, 24)), np.zeros((1, 4, 4, 12)), groups=4),
     "groups must divide x.shape[-1] (C); got groups 4 for C 6"),
    (bad(np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 32)), np.zeros((1, 4, 4, 16)),
         kernel_size=(2, 4), remove_center=True),
     "remove_center needs an odd, square kernel_size; got kernel_size (2, 4)"),
    (bad(np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 18)), np.zeros((1, 4, 4, 18))),
     "offset.shape must be (N, H_out, W_out, groups * P * 2) = (1, 4, 4, 36)"),
    (bad(np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 36)), np.zeros((1, 4, 4, 16)),
         remove_center=True),
     "offset.shape must be (N, H_out, W_out, groups * P * 2) = (1, 4, 4, 32) (P = 8"),
    (bad(np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 36)), np.zeros((1, 2, 2, 18))),
     "mask.shape must be (N, H_out, W_out, groups * P) = (1, 4, 4, 18)"),
    (bad(np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 36)), np.zeros((1, 4, 4, 18)),
         padding=-1), "padding must be >= 0"),
    (bad(np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 36)), np.zeros((1, 4, 4, 18)),
         padding="SAME"), "padding must be an int or a pair of ints"),
    (bad(np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 36)), np.zeros((1, 4, 4, 18)),
         offset_scale=float("nan")), "offset_scale must be a finite real number"),
    (bad(np.zeros((1, 2, 2, 4)), np.zeros((1, 1, 1, 36)), np.zeros((1, 1, 1, 18)),
         kernel_size=5, padding=0), "the output would be empty"),
])
def test_errors(call, message):
    with pytest.raises(ValueError, match=re.escape("dcnv3: " + message)):
        call()


def test_int32_limit_is_checked_without_allocating():
    x = jax.ShapeDtypeStruct((4096, 1024, 1024, 64), jnp.float32)
    offset = jax.ShapeDtypeStruct((4096, 1024, 1024, 4 * 9 * 2), jnp.float32)
    mask = jax.ShapeDtypeStruct((4096, 1024, 1024, 4 * 9), jnp.float32)
    with pytest.raises(ValueError, match=r"dcnv3: the input is too large to index with int32"):
        jax.eval_shape(lambda *a: dcnv3(*a, kernel_size=3, groups=4), x, offset, mask)


# ----------------------------------------------------------------- the layer


def layer_params(arrays, meta):
    """InternImage's state dict (the fixture's ``param.*``) in our names and layouts."""
    p = {k[len("param."):]: v for k, v in arrays.items() if k.startswith("param.")}
    dense = lambda name: {"kernel": p[f"{name}.weight"].T, "bias": p[f"{name}.bias"]}  # noqa: E731
    params = {
        "input_proj": dense("input_proj"),
        "dw_conv": {"kernel": p["dw_conv.0.weight"].transpose(2, 3, 1, 0),
                    "bias": p["dw_conv.0.bias"]},
        "dw_norm": {"scale": p["dw_conv.1.1.weight"], "bias": p["dw_conv.1.1.bias"]},
        "offset": dense("offset"),
        "mask": dense("mask"),
        "output_proj": dense("output_proj"),
    }
    if meta["center_feature_scale"]:
        params["center_feature_scale_proj"] = {"kernel": p["center_feature_scale_proj_weight"].T,
                                               "bias": p["center_feature_scale_proj_bias"]}
    return params


def layer_kwargs(meta):
    return dict(kernel_size=meta["kernel_size"], dw_kernel_size=meta["dw_kernel_size"],
                strides=meta["stride_h"], padding=meta["pad_h"], dilation=meta["dilation_h"],
                groups=meta["group"], offset_scale=meta["offset_scale"],
                center_feature_scale=bool(meta["center_feature_scale"]),
                remove_center=bool(meta["remove_center"]))


@pytest.mark.parametrize("name", LAYERS)
def test_layer_matches_internimage_linen_and_nnx(name):
    a, meta = load_fixture("dcnv3", name)
    layer = DCNv3(meta["channels"], param_dtype=jnp.float64, **layer_kwargs(meta))
    params = layer_params(a, meta)
    fresh = layer.init(jax.random.key(0), a["x"])["params"]
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, params)

    @jax.jit
    def run(params, x):
        def loss(params, x):
            out, state = layer.apply({"params": params}, x, mutable="intermediates")
            return (out * a["cotangent"]).sum(), (out, state["intermediates"])

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    (g_params, g_x), (out, state) = run(params, a["x"])
    np.testing.assert_allclose(out, a["out"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(state["offsets"][0], a["intermediate.core_offset"], rtol=0,
                               atol=1e-10)
    np.testing.assert_allclose(state["masks"][0], a["intermediate.core_mask"], rtol=0,
                               atol=1e-10)
    np.testing.assert_allclose(g_x, a["grad_x"], rtol=0, atol=1e-10)
    expected = layer_params({k.replace("grad_param.", "param."): v for k, v in a.items()
                             if k.startswith("grad_param.")}, meta)
    for path, got in jax.tree_util.tree_leaves_with_path(g_params):
        want = expected
        for key in path:
            want = want[key.key]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9, err_msg=str(path))

    if name != "module_remove_center":  # the NNX twin (the same recipe) on the richest one
        return
    twin = djnnx.DCNv3(meta["channels"], param_dtype=jnp.float64, rngs=nnx.Rngs(0),
                       **layer_kwargs(meta))
    djnnx.from_linen(twin, {"params": params})

    @nnx.jit
    def twin_run(model, x):
        def loss(model):
            y, captured = nnx.capture(model, nnx.Intermediate)(x)
            return (y * a["cotangent"]).sum(), (y, captured["masks"][0])

        return nnx.grad(loss, has_aux=True)(model)

    grads, (y, masks) = twin_run(twin, a["x"])
    np.testing.assert_allclose(y, a["out"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(masks, a["intermediate.core_mask"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(grads["output_proj"]["kernel"][...],
                               expected["output_proj"]["kernel"], rtol=0, atol=1e-9)


def test_fresh_layer_samples_the_grid_with_mask_one_over_p_and_trains(rng):
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 8)), jnp.float32)
    layer = DCNv3(8, groups=2, center_feature_scale=True, remove_center=True)
    variables = layer.init(jax.random.key(0), x)
    p = variables["params"]
    assert float(jnp.abs(p["dw_conv"]["kernel"]).max()) <= 1 / 3  # torch's default bound
    _, state = layer.apply(variables, x, mutable="intermediates")
    np.testing.assert_array_equal(state["intermediates"]["offsets"][0], 0)
    np.testing.assert_allclose(state["intermediates"]["masks"][0], 1 / 8, rtol=1e-6)
    opt = optax.adam(3e-2)
    target = jnp.roll(x, 1, axis=2)

    @jax.jit
    def step(params, opt_state):
        loss, g = jax.value_and_grad(
            lambda p: ((layer.apply({"params": p}, x) - target) ** 2).mean())(params)
        updates, opt_state = opt.update(g, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = p, opt.init(p)
    losses = []
    with jax.numpy_dtype_promotion("standard"):  # optax's step count is an int32
        for _ in range(30):
            params, opt_state, loss = step(params, opt_state)
            losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert float(jnp.abs(params["offset"]["kernel"]).max()) > 0  # the offsets learn

    twin = djnnx.DCNv3(8, groups=2, center_feature_scale=True, remove_center=True,
                       rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(twin.mask.kernel[...], 0)
    _, captured = nnx.capture(twin, nnx.Intermediate)(x)
    np.testing.assert_allclose(captured["masks"][0], 1 / 8, rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(channels=10, groups=4), "groups must divide channels; got channels 10 and groups 4"),
    (dict(channels=8, strides=2), "the output must be as large as the input"),
    (dict(channels=8, padding=2), "the output must be as large as the input"),
    (dict(channels=8, kernel_size=4, padding=1), "dw_kernel_size must be odd"),
    (dict(channels=8, kernel_size=5, padding=2, dw_kernel_size=3, remove_center=True,
          dilation=1, groups=3), "groups must divide channels"),
])
def test_layer_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape("DCNv3: " + message)):
        DCNv3(**kwargs).init(jax.random.key(0), jnp.ones((1, 6, 6, kwargs["channels"])))
    with pytest.raises(ValueError, match=re.escape("DCNv3: " + message)):
        djnnx.DCNv3(rngs=nnx.Rngs(0), **kwargs)


def test_layer_checks_input_channels():
    with pytest.raises(ValueError, match=re.escape("DCNv3: x.shape[-1] must be channels = 8; "
                                                   "got 6")):
        DCNv3(8, groups=2).init(jax.random.key(0), jnp.ones((1, 6, 6, 6)))
