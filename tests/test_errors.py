"""Every static mistake raises ValueError / TypeError naming function, argument, rule, values."""

import re

import numpy as np
import pytest

from deformjax import deform_conv, deform_roi_pool, dilated_conv, receptive_field

X = np.zeros((2, 8, 8, 4))
OFF = np.zeros((2, 8, 8, 18))
K = np.zeros((3, 3, 4, 6))
FEAT = np.zeros((2, 16, 16, 3))
ROIS = np.array([[0, 1.0, 1.0, 6.0, 6.0]])


def dc(**kw):
    a = dict(x=X, offset=OFF, kernel=K, mask=None, bias=None)
    call = {k: kw.pop(k) for k in list(kw) if k in a}
    a.update(call)
    return lambda: deform_conv(a["x"], a["offset"], a["kernel"], a["mask"], a["bias"],
                               **{"padding": 1, **kw})


def dil(x=X, kernel=K, bias=None, **kw):
    return lambda: dilated_conv(x, kernel, bias, **{"dilation": 2, **kw})


def pool(features=FEAT, rois=ROIS, offset=None, mask=None, **kw):
    return lambda: deform_roi_pool(features, rois, offset, mask, **{"output_size": 2, **kw})


CASES = [
    # deform_conv
    (dc(x=np.zeros((8, 8, 4))), ValueError,
     "deform_conv: x must have rank 4 (N, H, W, C_in); got shape (8, 8, 4)"),
    (dc(offset=np.zeros((8, 8, 18))), ValueError,
     "deform_conv: offset must have rank 4 .*; got shape (8, 8, 18)"),
    (dc(kernel=np.zeros((3, 4, 6))), ValueError,
     "deform_conv: kernel must have rank 4 .*; got shape (3, 4, 6)"),
    (dc(x=np.zeros((2, 8, 8, 4), np.int32)), TypeError,
     "deform_conv: x must have a floating dtype; got int32"),
    (dc(offset=np.zeros((2, 8, 8, 18), np.complex64)), TypeError,
     "deform_conv: offset must have a floating dtype; got complex64"),
    (dc(offset=np.zeros((2, 8, 8, 16))), ValueError,
     "deform_conv: offset.shape[-1] must be 2 * offset_groups * kh * kw; got 16 for a 3x3 kernel"),
    (dc(offset=np.zeros((2, 8, 8, 0))), ValueError,
     "deform_conv: offset.shape[-1] must be 2 * offset_groups * kh * kw; got 0 for a 3x3 kernel"),
    (dc(offset=np.zeros((2, 8, 8, 54))), ValueError,
     "deform_conv: offset groups must divide x.shape[-1] (C_in); got 3 offset groups "
     "(offset.shape[-1] 54) for C_in 4"),
    (dc(offset=np.zeros((2, 7, 8, 18))), ValueError,
     "deform_conv: offset.shape[:3] must be (N, H_out, W_out) = (2, 8, 8); got (2, 7, 8)"),
    (dc(offset=np.zeros((1, 8, 8, 18))), ValueError,
     "deform_conv: offset.shape[:3] must be (N, H_out, W_out) = (2, 8, 8); got (1, 8, 8)"),
    (dc(kernel=np.zeros((3, 3, 3, 6))), ValueError,
     "deform_conv: kernel.shape[2] * feature_group_count must equal x.shape[-1] (C_in); "
     "got 3 * 1 != 4"),
    (dc(kernel=np.zeros((3, 3, 2, 5)), feature_group_count=2), ValueError,
     "deform_conv: feature_group_count must divide kernel.shape[-1] (C_out); "
     "got C_out 5 and feature_group_count 2"),
    (dc(feature_group_count=0), ValueError,
     "deform_conv: feature_group_count must be a positive int; got 0"),
    (dc(feature_group_count=1.0), ValueError,
     "deform_conv: feature_group_count must be a positive int; got 1.0"),
    (dc(strides=0), ValueError, "deform_conv: strides must be >= 1; got 0"),
    (dc(strides=(1, 2, 3)), ValueError,
     "deform_conv: strides must be an int or a pair of ints (h, w); got (1, 2, 3)"),
    (dc(dilation=(1, -1)), ValueError, "deform_conv: dilation must be >= 1; got (1, -1)"),
    (dc(dilation=True), ValueError,
     "deform_conv: dilation must be an int or a pair of ints (h, w); got True"),
    (dc(padding="FULL"), ValueError,
     "deform_conv: padding must be 'SAME', 'SAME_LOWER', 'VALID', an int or pairs; got 'FULL'"),
    (dc(padding=(1, 2, 3)), ValueError,
     "deform_conv: padding must be an int, (ph, pw), ((top, bottom), (left, right)), 'SAME' or "
     "'VALID'; got (1, 2, 3)"),
    (dc(x=np.zeros((2, 2, 2, 4)), offset=np.zeros((2, 1, 1, 18)), padding=0), ValueError,
     "deform_conv: the output would be empty: input 2x2 with padding ((0, 0), (0, 0)), "
     "a 3x3 kernel, dilation (1, 1) and strides (1, 1) give 0x0"),
    (dc(kernel=np.zeros((0, 3, 4, 6))), ValueError,
     "deform_conv: kernel must have a non-empty window; got kernel.shape (0, 3, 4, 6)"),
    (dc(mask=np.zeros((2, 8, 8, 18))), ValueError,
     "deform_conv: mask.shape must be (N, H_out, W_out, offset_groups * kh * kw) = "
     "(2, 8, 8, 9); got (2, 8, 8, 18)"),
    (dc(mask=np.zeros((2, 8, 8))), ValueError,
     "deform_conv: mask must have rank 4 .*; got shape (2, 8, 8)"),
    (dc(bias=np.zeros((5,))), ValueError,
     "deform_conv: bias.shape must be (C_out,) = (6,); got (5,)"),
    (dc(bias=np.zeros((6,), np.int64)), TypeError,
     "deform_conv: bias must have a floating dtype; got int64"),
    (dc(x=np.zeros((2, 0, 8, 4)), offset=np.zeros((2, 2, 8, 18)), padding=2), ValueError,
     "deform_conv: x must have H, W >= 1 to sample from; got shape (2, 0, 8, 4)"),
    # dilated_conv
    (dil(x=np.zeros((8, 8, 4))), ValueError,
     "dilated_conv: x must have rank 4 (N, H, W, C_in); got shape (8, 8, 4)"),
    (dil(dilation=0), ValueError, "dilated_conv: dilation must be >= 1; got 0"),
    (dil(strides=(0, 1)), ValueError, "dilated_conv: strides must be >= 1; got (0, 1)"),
    (dil(kernel=np.zeros((3, 3, 2, 6)), feature_group_count=3), ValueError,
     "dilated_conv: kernel.shape[2] * feature_group_count must equal x.shape[-1] (C_in); "
     "got 2 * 3 != 4"),
    (dil(bias=np.zeros((4,))), ValueError,
     "dilated_conv: bias.shape must be (C_out,) = (6,); got (4,)"),
    (dil(padding="valid", dilation=4), ValueError,
     "dilated_conv: the output would be empty: input 8x8 with padding ((0, 0), (0, 0)), a 3x3 "
     "kernel, dilation (4, 4) and strides (1, 1) give 0x0"),
    (dil(x=np.zeros((2, 8, 8, 4), np.float16), kernel=np.zeros((3, 3, 4, 6), np.int8)), TypeError,
     "dilated_conv: kernel must have a floating dtype; got int8"),
    (dil(padding="circular"), ValueError,
     "dilated_conv: padding must be 'SAME', 'SAME_LOWER', 'VALID', an int or pairs; "
     "got 'circular'"),
    # deform_roi_pool
    (pool(features=np.zeros((16, 16, 3))), ValueError,
     "deform_roi_pool: features must have rank 4 (N, H, W, C); got shape (16, 16, 3)"),
    (pool(rois=np.zeros((3, 4))), ValueError,
     "deform_roi_pool: rois must have shape (R, 5) [batch_index, x1, y1, x2, y2]; "
     "got (3, 4)"),
    (pool(rois=np.zeros((5,))), ValueError,
     "deform_roi_pool: rois must have shape (R, 5) .*; got (5,)"),
    (pool(rois=np.zeros((1, 5), np.int32)), TypeError,
     "deform_roi_pool: rois must have a floating dtype; got int32"),
    (pool(output_size=0), ValueError, "deform_roi_pool: output_size must be >= 1; got 0"),
    (pool(output_size=(7, 0)), ValueError,
     "deform_roi_pool: output_size must be >= 1; got (7, 0)"),
    (pool(spatial_scale=0.0), ValueError,
     "deform_roi_pool: spatial_scale must be a positive finite number; got 0.0"),
    (pool(spatial_scale=-0.25), ValueError,
     "deform_roi_pool: spatial_scale must be a positive finite number; got -0.25"),
    (pool(sampling_ratio=1.5), ValueError,
     "deform_roi_pool: sampling_ratio must be an int; got 1.5"),
    (pool(gamma=float("nan")), ValueError, "deform_roi_pool: gamma must be a finite number; got nan"),
    (pool(offset=np.zeros((1, 2, 2, 1))), ValueError,
     "deform_roi_pool: offset.shape must be (R, oh, ow, 2) = (1, 2, 2, 2); "
     "got (1, 2, 2, 1)"),
    (pool(offset=np.zeros((2, 2, 2, 2))), ValueError,
     "deform_roi_pool: offset.shape must be (R, oh, ow, 2) = (1, 2, 2, 2); "
     "got (2, 2, 2, 2)"),
    (pool(mask=np.zeros((1, 2, 2))), ValueError,
     "deform_roi_pool: mask.shape must be (R, oh, ow, 1) = (1, 2, 2, 1); got (1, 2, 2)"),
    (pool(features=np.zeros((2, 16, 16, 3), np.int32)), TypeError,
     "deform_roi_pool: features must have a floating dtype; got int32"),
    (pool(features=np.zeros((1, 16, 0, 3))), ValueError,
     "deform_roi_pool: features must have H, W >= 1 to sample from; got shape (1, 16, 0, 3)"),
    # receptive_field
    (lambda: receptive_field([(3, 1, 1), (3, 0, 1)]), ValueError,
     "receptive_field: layers[1] must be (kernel_size, dilation, stride) of positive ints; "
     "got (3, 0, 1)"),
    (lambda: receptive_field([(3, 1)]), ValueError,
     "receptive_field: layers[0] must be .*; got (3, 1)"),
]


def _pattern(text):
    """Messages are literal text; ".*" stands for a part left out."""
    return ".*".join(re.escape(part) for part in text.split(".*"))


@pytest.mark.parametrize("call, error, message", CASES, ids=[c[2][:60] for c in CASES])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=_pattern(message)):
        call()


def test_keyword_only_options():
    with pytest.raises(TypeError):
        deform_conv(X, OFF, K, None, None, 1, 1)  # strides, padding must be keywords
    with pytest.raises(TypeError):
        dilated_conv(X, K, None, 2)
    with pytest.raises(TypeError):
        deform_roi_pool(FEAT, ROIS, None, None, 2)
    with pytest.raises(TypeError):
        dilated_conv(X, K)  # dilation is required
    with pytest.raises(TypeError):
        deform_roi_pool(FEAT, ROIS)  # output_size is required
