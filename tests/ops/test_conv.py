"""`ops.conv.conv_nhwc` (the convolution every model conv runs): forward and both gradients
equal torch's `conv2d` autograd (float64 in float64: the matmul-per-tap forward; float32 in
float32: XLA's forward and transposed convolution with the matmul kernel gradient), for the
kernel sizes, strides and paddings of the ResNet stem, bottlenecks, FPN and heads; other
arguments fall back to `lax`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from maskrcnn_jax.ops.conv import conv_nhwc

DN = ("NHWC", "HWIO", "NHWC")


# (rtol, atol). float64: sums of 5-245 products of standard normals, exact to ~1e-15; float32:
# the same sums in float32 on both sides, in different orders.
TOLERANCE = {np.float64: (1e-12, 1e-12), np.float32: (1e-5, 1e-4)}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kernel,stride,padding", [(7, 2, 3), (3, 1, 1), (3, 2, 1), (1, 1, 0),
                                                   (1, 2, 0)])
def test_gradients_equal_torch_autograd(kernel, stride, padding, dtype):
    rng = np.random.default_rng(kernel * 10 + stride)
    x = rng.normal(size=(2, 5, 13, 11)).astype(dtype)  # torch NCHW
    w = rng.normal(size=(6, 5, kernel, kernel)).astype(dtype)  # torch OIHW
    rtol, atol = TOLERANCE[dtype]
    cot = None
    with jax.enable_x64(True):
        xj, wj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(w.transpose(2, 3, 1, 0))
        pad = ((padding, padding), (padding, padding))
        out, vjp = jax.vjp(lambda a, b: conv_nhwc(a, b, (stride, stride), pad,
                                                  dimension_numbers=DN), xj, wj)
        assert out.dtype == dtype
        cot = rng.normal(size=out.shape).astype(dtype)
        dx, dw = vjp(jnp.asarray(cot))
        out, dx, dw = (np.asarray(v) for v in (out, dx, dw))
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    yt = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=padding)
    yt.backward(torch.tensor(cot.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(out, yt.detach().numpy().transpose(0, 2, 3, 1), rtol=rtol,
                               atol=atol)
    np.testing.assert_allclose(dx, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=rtol, atol=atol)
    np.testing.assert_allclose(dw, wt.grad.numpy().transpose(2, 3, 1, 0), rtol=rtol, atol=atol)
    assert np.abs(dw).max() > 1  # not vacuous


def test_other_arguments_fall_back_to_lax():
    x, w = jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 4))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, DN)
    dilated = conv_nhwc(x, w, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2), dimension_numbers=dn)
    ref = lax.conv_general_dilated(x, w, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2),
                                   dimension_numbers=dn)
    np.testing.assert_array_equal(dilated, ref)
    np.testing.assert_array_equal(conv_nhwc(x, w, (1, 1), "SAME", dimension_numbers=dn),
                                  lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                           dimension_numbers=dn))
