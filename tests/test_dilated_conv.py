"""dilated_conv equals lax.conv_general_dilated with rhs_dilation; receptive fields."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from deformjax import deform_conv, dilated_conv, receptive_field


@pytest.mark.parametrize(
    "dilation, strides, padding, fg",
    [(2, 1, "SAME", 1), ((3, 1), 1, "SAME", 2), (4, 2, "VALID", 1), ((1, 2), (2, 1), 2, 4)],
)
def test_equals_lax_conv(dilation, strides, padding, fg, rng):
    x = rng.normal(size=(2, 13, 11, 4))
    k = rng.normal(size=(3, 3, 4 // fg, 8))
    b = rng.normal(size=(8,))
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    pads = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    expected = lax.conv_general_dilated(
        x, k, pair(strides), pads, rhs_dilation=pair(dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=fg,
    ) + b
    fn = jax.jit(functools.partial(dilated_conv, dilation=dilation, strides=strides,
                                   padding=padding, feature_group_count=fg))
    np.testing.assert_allclose(fn(x, k, b), expected, rtol=1e-12, atol=1e-12)


def test_same_keeps_size_and_defaults(rng):
    x = jnp.asarray(rng.normal(size=(1, 10, 9, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)
    out = dilated_conv(x, k, dilation=3)
    assert out.shape == (1, 10, 9, 5) and out.dtype == jnp.float32


def test_is_deform_conv_with_zero_offsets(rng):
    x = rng.normal(size=(1, 9, 9, 2))
    k = rng.normal(size=(3, 3, 2, 3))
    out = dilated_conv(x, k, dilation=2)
    offset = np.zeros(out.shape[:3] + (18,))
    np.testing.assert_allclose(deform_conv(x, offset, k, padding="SAME", dilation=2), out,
                               rtol=1e-12, atol=1e-12)


def test_receptive_field_of_seed_stack_and_strided_stacks():
    assert receptive_field([(3, 1, 1), (3, 2, 1), (3, 4, 1)]) == [3, 7, 15]
    assert receptive_field([(3, 1, 1)] * 3) == [3, 5, 7]
    # Stride multiplies the step of every later layer: 3, +2*2, +2*2, +2*4.
    assert receptive_field([(3, 1, 2), (3, 1, 1), (3, 1, 2), (3, 1, 1)]) == [3, 7, 11, 19]
    # 7x7 stride-2 stem, 3x3 stride-2 pool, 3x3 conv (ResNet's start): 7, 11, 19.
    assert receptive_field([(7, 1, 2), (3, 1, 2), (3, 1, 1)]) == [7, 11, 19]
    assert receptive_field([(1, 1, 1), (5, 3, 1)]) == [1, 13]
    assert receptive_field([]) == []


def test_receptive_field_matches_the_gradient_support():
    """Independent check: the input pixels a centre output depends on, via jax.grad."""
    layers = [(3, 1, 1), (3, 2, 1), (3, 4, 1)]
    x = jnp.zeros((1, 41, 41, 1))

    def net(x):
        for kernel_size, dilation, _ in layers:
            k = jnp.ones((kernel_size, kernel_size, 1, 1))
            x = dilated_conv(x, k, dilation=dilation)
        return x[0, 20, 20, 0]

    support = np.nonzero(np.asarray(jax.grad(net)(x))[0, :, 20, 0])[0]
    assert support.max() - support.min() + 1 == receptive_field(layers)[-1]
