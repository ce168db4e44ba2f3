"""Slow float64 loop references, written from the formulas (not from deformjax).

``deform_conv_reference`` follows torchvision's CPU kernels
(``deform_conv2d_kernel.cpp``): the forward ``bilinear_interpolate``, the
input gradient of ``deformable_col2im`` and the offset / mask gradients of
``deformable_col2im_coord`` with its ``get_coordinate_weight``, written as
plain loops over output positions, taps and groups (vectorised only over
channels). ``deform_roi_pool_reference`` follows mmcv's ``DeformRoIPool``
forward kernel and the adjoint of its bilinear sampling for the feature
gradient. NCHW / NHWC: these work channels-last, like deformjax.
"""

from __future__ import annotations

import math

import numpy as np


def _pads(padding):
    (top, bottom), (left, right) = padding
    return top, bottom, left, right


def _bilinear_zeros(img, y, x):
    """torchvision's bilinear_interpolate: img (H, W, C)."""
    height, width, channels = img.shape
    if y <= -1 or height <= y or x <= -1 or width <= x:
        return np.zeros(channels)
    y_low, x_low = math.floor(y), math.floor(x)
    y_high, x_high = y_low + 1, x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    value = np.zeros(channels)
    if y_low >= 0 and x_low >= 0:
        value += hy * hx * img[y_low, x_low]
    if y_low >= 0 and x_high <= width - 1:
        value += hy * lx * img[y_low, x_high]
    if y_high <= height - 1 and x_low >= 0:
        value += ly * hx * img[y_high, x_low]
    if y_high <= height - 1 and x_high <= width - 1:
        value += ly * lx * img[y_high, x_high]
    return value


def _coordinate_weight(img, y, x, is_y_direction):
    """torchvision's get_coordinate_weight: d(sample)/dy or d(sample)/dx."""
    height, width, channels = img.shape
    y_l, x_l = math.floor(y), math.floor(x)
    y_h, x_h = y_l + 1, x_l + 1
    ok = lambda r, c: 0 <= r < height and 0 <= c < width  # noqa: E731
    zero = np.zeros(channels)
    v_yx = img[y_l, x_l] if ok(y_l, x_l) else zero
    v_yX = img[y_l, x_h] if ok(y_l, x_h) else zero
    v_Yx = img[y_h, x_l] if ok(y_h, x_l) else zero
    v_YX = img[y_h, x_h] if ok(y_h, x_h) else zero
    if is_y_direction:
        dx = x - x_l
        return dx * (v_YX - v_yX) + (1 - dx) * (v_Yx - v_yx)
    dy = y - y_l
    return dy * (v_YX - v_Yx) + (1 - dy) * (v_yX - v_yx)


def _col2im_add(grad_img, y, x, value):
    """torchvision's deformable_col2im: scatter ``value`` (C,) to the 4 neighbours."""
    height, width, _ = grad_img.shape
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            yp, xp = int(y) + dy, int(x) + dx
            if 0 <= yp < height and 0 <= xp < width and abs(y - yp) < 1 and abs(x - xp) < 1:
                grad_img[yp, xp] += (1 - abs(y - yp)) * (1 - abs(x - xp)) * value


def deform_conv_reference(
    x, offset, kernel, mask=None, bias=None, *, strides, padding, dilation, groups=1,
    cotangent=None,
):
    """Forward (and, given ``cotangent``, all gradients) of a deformable convolution.

    Args mirror deformjax.deform_conv with ``padding`` as pairs and
    ``groups`` = feature_group_count. Returns ``out`` or, with a cotangent,
    ``(out, grads)`` where grads has keys x, offset, kernel, mask, bias.
    """
    x, offset, kernel = (np.asarray(a, np.float64) for a in (x, offset, kernel))
    n, height, width, c_in = x.shape
    kh, kw, _, c_out = kernel.shape
    taps = kh * kw
    _, ho, wo, _ = offset.shape
    offset_groups = offset.shape[-1] // (2 * taps)
    cpg = c_in // offset_groups
    sh, sw = strides
    dh, dw = dilation
    top, _, left, _ = _pads(padding)
    cin_g, cout_g = c_in // groups, c_out // groups
    mask = np.ones((n, ho, wo, offset_groups * taps)) if mask is None else np.asarray(mask, np.float64)

    cols = np.zeros((n, ho, wo, taps, c_in))
    for b in range(n):
        for oy in range(ho):
            for ox in range(wo):
                for g in range(offset_groups):
                    img = x[b, :, :, g * cpg:(g + 1) * cpg]
                    for i in range(kh):
                        for j in range(kw):
                            t = i * kw + j
                            dy_, dx_ = offset[b, oy, ox, (g * taps + t) * 2: (g * taps + t) * 2 + 2]
                            y = oy * sh - top + i * dh + dy_
                            xx = ox * sw - left + j * dw + dx_
                            m = mask[b, oy, ox, g * taps + t]
                            cols[b, oy, ox, t, g * cpg:(g + 1) * cpg] = m * _bilinear_zeros(img, y, xx)
    out = np.zeros((n, ho, wo, c_out))
    wk = kernel.reshape(taps, cin_g, c_out)
    for f in range(groups):
        cf = cols[..., f * cin_g:(f + 1) * cin_g].reshape(n, ho, wo, taps * cin_g)
        out[..., f * cout_g:(f + 1) * cout_g] = cf @ wk[:, :, f * cout_g:(f + 1) * cout_g].reshape(
            taps * cin_g, cout_g
        )
    if bias is not None:
        out = out + np.asarray(bias, np.float64)
    if cotangent is None:
        return out

    ct = np.asarray(cotangent, np.float64)
    grad_cols = np.zeros_like(cols)
    grad_kernel = np.zeros_like(wk)
    for f in range(groups):
        osl, isl = slice(f * cout_g, (f + 1) * cout_g), slice(f * cin_g, (f + 1) * cin_g)
        grad_cols[..., isl] = np.einsum("nhwo,kco->nhwkc", ct[..., osl], wk[:, :, osl])
        grad_kernel[:, :, osl] = np.einsum("nhwkc,nhwo->kco", cols[..., isl], ct[..., osl])
    grad_x = np.zeros_like(x)
    grad_offset = np.zeros_like(offset)
    grad_mask = np.zeros_like(mask)
    for b in range(n):
        for oy in range(ho):
            for ox in range(wo):
                for g in range(offset_groups):
                    csl = slice(g * cpg, (g + 1) * cpg)
                    img = x[b, :, :, csl]
                    for i in range(kh):
                        for j in range(kw):
                            t = i * kw + j
                            k = (g * taps + t) * 2
                            y = oy * sh - top + i * dh + offset[b, oy, ox, k]
                            xx = ox * sw - left + j * dw + offset[b, oy, ox, k + 1]
                            m = mask[b, oy, ox, g * taps + t]
                            gc = grad_cols[b, oy, ox, t, csl]
                            _col2im_add(grad_x[b, :, :, csl], y, xx, m * gc)
                            grad_offset[b, oy, ox, k] += m * np.dot(gc, _coordinate_weight(img, y, xx, True))
                            grad_offset[b, oy, ox, k + 1] += m * np.dot(
                                gc, _coordinate_weight(img, y, xx, False)
                            )
                            grad_mask[b, oy, ox, g * taps + t] += np.dot(gc, _bilinear_zeros(img, y, xx))
    grads = dict(
        x=grad_x,
        offset=grad_offset,
        kernel=grad_kernel.reshape(kernel.shape),
        mask=grad_mask,
        bias=ct.sum(axis=(0, 1, 2)),
    )
    return out, grads


def _bilinear_clamp(img, y, x):
    """RoIAlign's bilinear_interpolate, returning [(row, col, weight)] (empty if outside)."""
    height, width, _ = img.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return []
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return [
        (y_low, x_low, hy * hx),
        (y_low, x_high, hy * lx),
        (y_high, x_low, ly * hx),
        (y_high, x_high, ly * lx),
    ]


def deform_roi_pool_reference(
    features, rois, offset=None, mask=None, *, output_size, spatial_scale, sampling_ratio, gamma,
    cotangent=None,
):
    """mmcv DeformRoIPool / ModulatedDeformRoIPool forward (and feature gradient).

    Returns ``out`` or, given ``cotangent``, ``(out, grad_features)``.
    """
    features = np.asarray(features, np.float64)
    rois = np.asarray(rois, np.float64)
    n, height, width, channels = features.shape
    oh, ow = output_size
    num = rois.shape[0]
    out = np.zeros((num, oh, ow, channels))
    grad = np.zeros_like(features) if cotangent is not None else None
    for r in range(num):
        b = int(rois[r, 0])
        start_w = rois[r, 1] * spatial_scale - 0.5
        start_h = rois[r, 2] * spatial_scale - 0.5
        roi_w = rois[r, 3] * spatial_scale - 0.5 - start_w
        roi_h = rois[r, 4] * spatial_scale - 0.5 - start_h
        bin_h, bin_w = roi_h / oh, roi_w / ow
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / oh)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / ow)
        count = max(grid_h * grid_w, 1)
        for ph in range(oh):
            for pw in range(ow):
                sh, sw = start_h, start_w
                if offset is not None:
                    sh += gamma * roi_h * offset[r, ph, pw, 0]
                    sw += gamma * roi_w * offset[r, ph, pw, 1]
                scale = 1.0 if mask is None else mask[r, ph, pw, 0]
                for iy in range(max(grid_h, 0)):
                    y = sh + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(max(grid_w, 0)):
                        x = sw + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        for row, col, wt in _bilinear_clamp(features[b], y, x):
                            out[r, ph, pw] += scale * wt * features[b, row, col] / count
                            if grad is not None:
                                grad[b, row, col] += scale * wt * cotangent[r, ph, pw] / count
    return out if cotangent is None else (out, grad)


def deform_ps_roi_pool_reference(features, rois, offset=None, *, output_size, spatial_scale,
                                 sampling_ratio, gamma, cotangent=None):
    """Position-sensitive deformable RoI pooling from the loop above: bin (i, j) of output
    channel c pools input channel (c * oh + i) * ow + j (torchvision's ps_roi_align order).
    Returns ``out`` or, given ``cotangent``, ``(out, grad_features)``."""
    features = np.asarray(features, np.float64)
    oh, ow = output_size
    c_out = features.shape[-1] // (oh * ow)
    out = np.zeros((rois.shape[0], oh, ow, c_out))
    grad = np.zeros_like(features)
    kw = dict(output_size=output_size, spatial_scale=spatial_scale,
              sampling_ratio=sampling_ratio, gamma=gamma)
    for i in range(oh):
        for j in range(ow):
            channels = [(c * oh + i) * ow + j for c in range(c_out)]
            bin_cotangent = None
            if cotangent is not None:
                bin_cotangent = np.zeros((rois.shape[0], oh, ow, c_out))
                bin_cotangent[:, i, j] = cotangent[:, i, j]
            result = deform_roi_pool_reference(features[..., channels], rois, offset,
                                               cotangent=bin_cotangent, **kw)
            pooled = result if cotangent is None else result[0]
            out[:, i, j] = pooled[:, i, j]
            if cotangent is not None:
                grad[..., channels] += result[1]
    return out if cotangent is None else (out, grad)
