"""The weighted heads of Mask R-CNN (torchvision v1 and v2), NHWC. No detection logic here.

Variable names mirror torchvision's state-dict names (see `torchvision.state_dict_to_flax`).
All modules take a computation `dtype` (None: input dtype); parameters stay float32.

torchvision's v2 (`maskrcnn_resnet50_fpn_v2`) differs in its heads: a 2-conv RPN head
(`RPNHead(conv_depth=2)`), `FastRCNNConvFCHead` as box head, and batch norm after each mask-head
conv (conv without bias). Its BatchNorm2d layers are `norm='batch_norm'` (`norm.BatchNorm`:
batch statistics over the valid RoIs in training) or, frozen, `norm='frozen_bn'` (running
statistics only, as torchvision's in eval mode).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.models.norm import BATCH_NORM_EPS, normalize
from maskrcnn_jax.models.resnet import conv2d, zero_outside
from maskrcnn_jax.ops.conv import conv_nhwc

_relu_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
HEAD_NORMS = ("frozen_bn", "batch_norm")


def head_norm(norm: str, name: str, x, dtype=None, train: bool = False, mask=None):
    """v2's BatchNorm2d after a conv of the FPN or a head, created in the caller's compact scope
    and applied to `x`: 'batch_norm' (`norm.BatchNorm`; `train`: statistics over `mask`'s
    entries) or 'frozen_bn' (its running statistics only)."""
    if norm not in HEAD_NORMS:
        raise ValueError(f"unknown head norm {norm!r}; choose from {HEAD_NORMS} or None")
    return normalize(norm, name, x, eps=BATCH_NORM_EPS, dtype=dtype, train=train, mask=mask)


def _torch_uniform(fan_in: int):
    """Initialiser uniform in +-1/sqrt(fan_in): torch's default bias of a conv or linear layer
    (and `nn.Linear`'s weight)."""
    bound = 1.0 / float(np.sqrt(fan_in))

    def uniform(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return uniform


def _dense(x, features, dtype, name):
    """`nn.Dense` on `x` (in the caller's compact scope) initialised as torch's `nn.Linear` (the
    box head's and predictor's layers keep torch's defaults): weight and bias uniform in
    +-1/sqrt(fan_in) (`kaiming_uniform_(a=sqrt(5))` and its bias bound)."""
    uniform = _torch_uniform(x.shape[-1])
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=uniform,
                    bias_init=uniform, name=name)(x)


class RPNHead(nn.Module):
    """torchvision `RPNHead`: shared 3x3 conv + relu, then 1x1 objectness and box-delta convs.

    Call: features, a sequence of NHWC maps (N, H_l, W_l, C) (the FPN levels); the same
    weights are applied to every level. Returns (objectness, deltas), two lists over levels:
      objectness[l]: (N, H_l * W_l * A) logits,
      deltas[l]:     (N, H_l * W_l * A, 4) box deltas (dx, dy, dw, dh) before weighting,
    flattened in torchvision's `permute_and_flatten` order (h, w, a): torch's channel index is
    a * 4 + k for the deltas, which is exactly an NHWC reshape of the last axis to (A, 4).

    `conv_depth` 3x3 conv + relu layers (torchvision's `conv_depth`: 1 in v1, 2 in v2) named
    `conv` (torch `conv.0.0`), then `conv_1`, `conv_2`, ... (torch `conv.1.0`, ...).
    """

    num_anchors: int = 3
    conv_depth: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, features: Sequence, pixel_valid=None):
        """`pixel_valid`: `(N, H, W)` canvas validity (see `resnet.zero_outside`): a conv after
        the first sees torchvision's zero padding at each image's region border."""
        init = nn.initializers.normal(0.01)  # torchvision: normal_(std=0.01), zero bias
        convs = [conv2d(features[0].shape[-1], 3, 1, 1, use_bias=True, dtype=self.dtype,
                        kernel_init=init, name="conv" if i == 0 else f"conv_{i}")
                 for i in range(self.conv_depth)]
        cls_logits = conv2d(self.num_anchors, 1, use_bias=True, dtype=self.dtype,
                            kernel_init=init, name="cls_logits")
        bbox_pred = conv2d(4 * self.num_anchors, 1, use_bias=True, dtype=self.dtype,
                           kernel_init=init, name="bbox_pred")
        objectness, deltas = [], []
        for x in features:
            t = x
            for i, conv in enumerate(convs):
                t = nn.relu(conv(t if i == 0 else zero_outside(t, pixel_valid)))
            n = x.shape[0]
            objectness.append(cls_logits(t).reshape(n, -1))
            deltas.append(bbox_pred(t).reshape(n, -1, 4))
        return objectness, deltas


class TwoMLPHead(nn.Module):
    """torchvision `TwoMLPHead`: flatten, fc6 + relu, fc7 + relu.

    Call: x (R, H, W, C) pooled RoI features (NHWC, 7x7x256 in Mask R-CNN). Flattened in
    (h, w, c) order; the converter permutes torch's fc6 weight (which sees (c, h, w) order) so
    no transpose is needed here. Returns (R, representation_size).
    """

    representation_size: int = 1024
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(_dense(x, self.representation_size, self.dtype, "fc6"))
        return nn.relu(_dense(x, self.representation_size, self.dtype, "fc7"))


class FastRCNNConvFCHead(nn.Module):
    """torchvision `FastRCNNConvFCHead` with batch norm (v2's box head): 3x3 conv (no bias) +
    norm + relu layers, flatten, linear + relu layers.

    Call: x (R, H, W, C) pooled RoI features (NHWC, 7x7x256); `train` (static) and `valid`
    (R,) bool, the RoIs the batch norms' statistics cover (training). Variables `conv_{i}` /
    `bn_{i}` (torch `box_head.{i}.0` / `box_head.{i}.1`) and `fc_{j}` (the j-th Linear).
    Flattened in (h, w, c) order (the converter permutes the first Linear's weight from torch's
    (c, h, w)). Returns (R, fc_layers[-1]).
    """

    conv_layers: Sequence[int] = (256, 256, 256, 256)
    fc_layers: Sequence[int] = (1024,)
    norm: str = "batch_norm"
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False, valid=None):
        mask = None if valid is None else valid[:, None, None]
        for i, features in enumerate(self.conv_layers):
            x = conv2d(features, 3, 1, 1, dtype=self.dtype, kernel_init=_relu_fan_out,
                       name=f"conv_{i}")(x)
            x = nn.relu(head_norm(self.norm, f"bn_{i}", x, self.dtype, train, mask))
        x = x.reshape(x.shape[0], -1)
        for j, features in enumerate(self.fc_layers):
            x = nn.relu(_dense(x, features, self.dtype, f"fc_{j}"))
        return x


class FastRCNNPredictor(nn.Module):
    """torchvision `FastRCNNPredictor`: two linear layers on the box-head representation.

    Call: x (R, D). Returns (class_logits (R, num_classes), box_deltas (R, 4 * num_classes)),
    the deltas class-major as in torchvision (entry k * 4 + j is coordinate j of class k).
    """

    num_classes: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        class_logits = _dense(x, self.num_classes, self.dtype, "cls_score")
        box_deltas = _dense(x, 4 * self.num_classes, self.dtype, "bbox_pred")
        return class_logits, box_deltas


class MaskRCNNHeads(nn.Module):
    """torchvision `MaskRCNNHeads`: a stack of 3x3 conv (+bias) + relu layers; with a `norm`
    (`HEAD_NORMS`, v2's `norm_layer=BatchNorm2d`) conv without bias + norm + relu.

    Call: x (R, 14, 14, C) pooled RoI features, NHWC; `train` (static) and `valid` (R,) bool,
    the RoIs the batch norms' statistics cover (training). Returns (R, 14, 14, layers[-1]).
    Variables `mask_fcn{i}` are torch's `mask_head.{i-1}.0`, `mask_bn{i}` its `mask_head.{i-1}.1`.
    """

    layers: Sequence[int] = (256, 256, 256, 256)
    dilation: int = 1
    norm: Optional[str] = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False, valid=None):
        mask = None if valid is None else valid[:, None, None]
        for i, features in enumerate(self.layers):
            conv = nn.Conv(
                features, (3, 3),
                padding=((self.dilation, self.dilation),) * 2,
                kernel_dilation=(self.dilation, self.dilation),
                use_bias=self.norm is None, dtype=self.dtype, param_dtype=jnp.float32,
                conv_general_dilated=conv_nhwc,
                kernel_init=_relu_fan_out, name=f"mask_fcn{i + 1}",
            )
            x = conv(x)
            if self.norm is not None:
                x = head_norm(self.norm, f"mask_bn{i + 1}", x, self.dtype, train, mask)
            x = nn.relu(x)
        return x


class Deconv2x2(nn.Module):
    """2x2 stride-2 transposed convolution (torch `ConvTranspose2d(k=2, s=2)`) as one einsum.

    With kernel = stride the output blocks do not overlap: output pixel (2h + k, 2w + l) is
    `x[h, w] @ kernel[k, l].T`. Same parameters as `nn.ConvTranspose(transpose_kernel=True)`:
    kernel (2, 2, out, in) = torch's weight (in, out, 2, 2) transposed by (2, 3, 1, 0), bias
    (out,). XLA:CPU's gradient of the general transposed conv is ~30x slower than this.
    """

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _relu_fan_out, (2, 2, self.features, x.shape[-1]), jnp.float32)
        # torch's ConvTranspose2d default: fan_in = weight.size(1) * kH * kW = out * 4.
        bias = self.param("bias", _torch_uniform(4 * self.features), (self.features,),
                          jnp.float32)
        dtype = self.dtype if self.dtype is not None else x.dtype
        n, h, w, _ = x.shape
        y = jnp.einsum("nhwi,kloi->nhkwlo", x.astype(dtype), kernel.astype(dtype))
        return y.reshape(n, 2 * h, 2 * w, self.features) + bias.astype(dtype)


class MaskRCNNPredictor(nn.Module):
    """torchvision `MaskRCNNPredictor`: 2x2 stride-2 transposed conv + relu, 1x1 conv logits.

    Call: x (R, H, W, C). Returns per-class mask logits (R, 2H, 2W, num_classes), NHWC.

    `conv5_mask` uses `transpose_kernel=True`, i.e. the true transpose (gradient) of a
    convolution: its kernel is (kH, kW, out, in) = torch's ConvTranspose2d weight
    (in, out, kH, kW) transposed by (2, 3, 1, 0), with no spatial flip needed.

    Initialised as torchvision's: weights kaiming-normal (fan_out, relu), biases left at
    torch's layer default (uniform in +-1/sqrt(fan_in): torchvision's zero init of them is
    commented out).
    """

    num_classes: int
    dim_reduced: int = 256
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        x = nn.relu(Deconv2x2(self.dim_reduced, dtype=self.dtype, name="conv5_mask")(x))
        return conv2d(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                      kernel_init=_relu_fan_out, name="mask_fcn_logits",
                      bias_init=_torch_uniform(x.shape[-1]))(x)
