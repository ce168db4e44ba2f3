"""multi_level_deform_roi_pool: each RoI pooled from its FPN level equals deform_roi_pool there."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformjax import deform_roi_pool, multi_level_deform_roi_pool
from deformjax._src.ops.deform_roi_pool import roi_levels

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


def fpn_case(rng, n=2, image=(256, 320), c=3, count=24):
    levels = [rng.normal(size=(n, image[0] // 2**(l + 2), image[1] // 2**(l + 2), c))
              for l in range(4)]
    size = np.exp(rng.uniform(np.log(6), np.log(700), count))  # log-uniform, all levels
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2), count))
    w, h = size * np.sqrt(aspect), size / np.sqrt(aspect)
    cx, cy = rng.uniform(0, image[1], count), rng.uniform(0, image[0], count)  # some cross
    rois = np.stack([rng.integers(0, n, count), cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2],
                    1)
    rois[-1, 0] = -1  # a padding RoI
    offset = rng.normal(scale=0.3, size=(count, 3, 2, 2))
    mask = rng.uniform(0.2, 1.0, size=(count, 3, 2, 1))
    return levels, rois, offset, mask


def test_level_mapping_is_mmdets(rng):
    _, rois, _, _ = fpn_case(rng, count=200)
    scale = np.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    expected = np.clip(np.floor(np.log2(scale / 56 + 1e-6)), 0, 3)
    got = np.asarray(roi_levels(jnp.asarray(rois), 4, 56.0))
    np.testing.assert_array_equal(got, expected)
    assert set(got) == {0, 1, 2, 3}


def test_equals_deform_roi_pool_on_each_rois_level(rng):
    """Adaptive sampling (each RoI's grid capped by its own level); sampling_ratio 2 below."""
    sampling_ratio = 0
    levels, rois, offset, mask = fpn_case(rng)
    level = np.asarray(roi_levels(jnp.asarray(rois), 4, 56.0))
    kw = dict(output_size=(3, 2), sampling_ratio=sampling_ratio, gamma=0.1)
    cot = rng.normal(size=(len(rois), 3, 2, 3))

    def ours(levels, offset, mask):
        out = multi_level_deform_roi_pool(levels, rois, offset, mask, spatial_scales=SCALES,
                                          **kw)
        return (out * cot).sum(), out

    def oracle(levels, offset, mask):
        out = 0
        for l, f in enumerate(levels):
            pooled = deform_roi_pool(f, rois, offset, mask, spatial_scale=SCALES[l], **kw)
            out = out + jnp.where((level == l)[:, None, None, None], pooled, 0)
        return (out * cot).sum(), out

    (_, a), ga = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True))(
        levels, offset, mask)
    (_, b), gb = jax.jit(jax.value_and_grad(oracle, argnums=(0, 1, 2), has_aux=True))(
        levels, offset, mask)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    assert np.all(np.asarray(a)[-1] == 0)  # the padding RoI
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-12)
    # each RoI reads only its level: the other levels get no gradient from it
    one = jax.jit(jax.grad(lambda f: multi_level_deform_roi_pool(
        f, rois[:1], offset[:1], mask[:1], spatial_scales=SCALES, **kw).sum()))(levels)
    for l, g in enumerate(one):
        assert bool(np.any(np.asarray(g) != 0)) == (l == level[0])


def test_fixed_sampling_ratio_forward(rng):
    levels, rois, offset, mask = fpn_case(rng)
    level = np.asarray(roi_levels(jnp.asarray(rois), 4, 56.0))
    kw = dict(output_size=(3, 2), sampling_ratio=2, gamma=0.1)
    out = multi_level_deform_roi_pool(levels, rois, offset, mask, spatial_scales=SCALES, **kw)
    for l, f in enumerate(levels):
        pooled = deform_roi_pool(f, rois, offset, mask, spatial_scale=SCALES[l], **kw)
        np.testing.assert_allclose(np.asarray(out)[level == l], np.asarray(pooled)[level == l],
                                   rtol=0, atol=1e-12)


def test_errors(rng):
    levels, rois, _, _ = fpn_case(rng, count=3)
    kw = dict(output_size=2)
    for call, message in [
        (lambda: multi_level_deform_roi_pool(levels, rois, spatial_scales=SCALES[:3], **kw),
         "spatial_scales must give one scale per level: 4 levels; got"),
        (lambda: multi_level_deform_roi_pool(levels[:1] + [levels[1][..., :2]], rois,
                                             spatial_scales=SCALES[:2], **kw),
         "every level must have the same N and C"),
        (lambda: multi_level_deform_roi_pool(levels[0], rois, spatial_scales=SCALES[:1], **kw),
         "features must be a non-empty sequence"),
        (lambda: multi_level_deform_roi_pool(levels, rois, spatial_scales=(1, 1, 1, -1), **kw),
         "spatial_scale must be a positive finite number; got -1"),
        (lambda: multi_level_deform_roi_pool(levels, rois, spatial_scales=SCALES,
                                             finest_scale=0, **kw),
         "finest_scale must be a positive finite number; got 0"),
    ]:
        with pytest.raises(ValueError, match=re.escape("multi_level_deform_roi_pool: " + message)):
            call()
