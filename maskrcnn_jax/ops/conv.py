"""2-D convolution (NHWC input, HWIO kernel) whose kernel gradient is kh x kw matmuls.

XLA's CPU backend computes the kernel gradient of a convolution (the weight-update correlation
of input and output cotangent) several times slower per FLOP than the forward convolution, and
slower than the same gradient as kh x kw matmuls (figures in BENCHMARKS.md). `conv_nhwc` is
`lax.conv_general_dilated` with that gradient: for each kernel tap (i, j), `dw[i, j]` is the
contraction of the (strided) input window shifted by the tap with the output cotangent over
batch and space. The input gradient is the transposed convolution (`jax.linear_transpose`, no
forward recomputed). Same values as XLA's up to float32 summation order.

Flax's `nn.Conv(..., conv_general_dilated=conv_nhwc)` uses it; other layouts, dilations or
feature groups fall back to `lax.conv_general_dilated`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _forward(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, padding):
    return _forward(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
    return _forward(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, g):
    x, w = residuals
    (dx,) = jax.linear_transpose(lambda v: _forward(v, w, strides, padding), x)(g)
    n, _, _, c = x.shape
    kh, kw = w.shape[:2]
    (pt, pb), (pl, pr) = padding
    sh, sw = strides
    ho, wo = g.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    accumulate = jnp.promote_types(w.dtype, jnp.float32)  # bfloat16 sums in float32
    taps = [[jnp.einsum("nhwc,nhwo->co",
                        lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1,
                                                      j + sw * (wo - 1) + 1, c), (1, sh, sw, 1)),
                        g, preferred_element_type=accumulate)
             for j in range(kw)] for i in range(kh)]
    dw = jnp.stack([jnp.stack(row) for row in taps]).astype(w.dtype)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_nhwc(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated` (same arguments) with the matmul kernel gradient for NHWC /
    HWIO convolutions with explicit padding, no dilation and one feature group."""
    simple = (
        not kwargs and precision is None and feature_group_count == 1
        and lhs.ndim == 4 and not isinstance(padding, str)
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and dimension_numbers is not None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if not simple:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)
    return _conv(lhs, rhs, tuple(int(s) for s in window_strides),
                 tuple((int(a), int(b)) for a, b in padding))
