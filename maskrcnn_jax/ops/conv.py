"""2-D convolution (NHWC input, HWIO kernel) whose kernel gradient is kh x kw matmuls.

XLA's CPU backend computes the kernel gradient of a convolution (the weight-update correlation
of input and output cotangent) several times slower per FLOP than the forward convolution, and
slower than the same gradient as kh x kw matmuls (figures in BENCHMARKS.md). `conv_nhwc` is
`lax.conv_general_dilated` with that gradient: for each kernel tap (i, j), `dw[i, j]` is the
contraction of the (strided) input window shifted by the tap with the output cotangent over
batch and space. The input gradient is the transposed convolution (`jax.linear_transpose`, no
forward recomputed). Same values as XLA's up to float32 summation order.

Float64 (the parity tests' dtype) runs as kh x kw matmuls in the forward too (`_taps`, its
gradients by autodiff: matmuls as well): without YNNPACK (`maskrcnn_jax.xla_cpu`, the default)
XLA's CPU backend has no float64 convolution kernel and emits a naive loop, ~100x slower than a
float64 matmul for a 3x3 convolution at 256 channels.

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


def _windows(x, kernel_shape, strides, padding, out_shape):
    """For each kernel tap (i, j), in row-major order: the (strided) window of padded `x` that
    tap multiplies, `(n, ho, wo, c)` each."""
    n, _, _, c = x.shape
    kh, kw = kernel_shape
    (pt, pb), (pl, pr) = padding
    sh, sw = strides
    ho, wo = out_shape
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    return [lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                      (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]


def _taps(x, w, strides, padding):
    """The convolution as one matmul per kernel tap, summed (float64: module docstring)."""
    kh, kw = w.shape[:2]
    (pt, pb), (pl, pr) = padding
    ho = (x.shape[1] + pt + pb - kh) // strides[0] + 1
    wo = (x.shape[2] + pl + pr - kw) // strides[1] + 1
    windows = _windows(x, (kh, kw), strides, padding, (ho, wo))
    return sum(jnp.einsum("nhwc,co->nhwo", v, w[k // kw, k % kw])
               for k, v in enumerate(windows))


def _conv_bwd(strides, padding, residuals, g):
    x, w = residuals
    (dx,) = jax.linear_transpose(lambda v: _forward(v, w, strides, padding), x)(g)
    kh, kw = w.shape[:2]
    accumulate = jnp.promote_types(w.dtype, jnp.float32)  # bfloat16 sums in float32
    taps = [jnp.einsum("nhwc,nhwo->co", v, g, preferred_element_type=accumulate)
            for v in _windows(x, (kh, kw), strides, padding, g.shape[1:3])]
    dw = jnp.stack(taps).reshape(kh, kw, *taps[0].shape).astype(w.dtype)
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
    strides = tuple(int(s) for s in window_strides)
    padding = tuple((int(a), int(b)) for a, b in padding)
    if lhs.dtype == jnp.float64:
        return _taps(lhs, rhs, strides, padding)
    return _conv(lhs, rhs, strides, padding)
