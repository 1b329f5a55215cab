"""ResNet body (C2..C5) with torchvision's exact padding and normalisation arithmetic.

Layout is NHWC. Parameters are float32 (`param_dtype`); `dtype` is the computation dtype
(None: the input's dtype, e.g. jnp.bfloat16 for mixed precision).

Variable names mirror torchvision's state-dict names so that conversion
(`maskrcnn_jax.torchvision`) stays a plain
renaming: `conv1`, `bn1`, `layer{i}_{j}` (torch `layer{i}.{j}`) with `conv1..3`, `bn1..3`,
`downsample_conv` / `downsample_bn` (torch `downsample.0` / `downsample.1`).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from maskrcnn_jax.models.norm import normalize as _normalize
from maskrcnn_jax.models.norm import valid_at
from maskrcnn_jax.ops.conv import conv_nhwc

# torchvision's ResNet initialises convs with kaiming_normal_(mode="fan_out", relu).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv2d(features, kernel_size, strides=1, padding=0, use_bias=False, dtype=None,
           kernel_init=_conv_init, name=None, bias_init=nn.initializers.zeros):
    """A torch-style `nn.Conv2d` as a Flax `nn.Conv` with explicit symmetric padding.

    Flax's 'SAME' pads stride-2 convolutions asymmetrically (more on the bottom/right), which
    torch never does, so padding is always given explicitly as `((p, p), (p, p))`. The kernel
    gradient is computed as matmuls (`ops.conv.conv_nhwc`: XLA's CPU one is several times
    slower).
    """
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=((padding, padding), (padding, padding)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        bias_init=bias_init,
        name=name,
        conv_general_dilated=conv_nhwc,
    )


def zero_outside(x, pixel_valid):
    """Zero an NHWC map outside each image's valid region.

    torchvision runs its backbone on each image padded only to a multiple of 32; maskrcnn_jax pads
    into a larger fixed canvas. Zeroing activations outside the region torchvision would have,
    before every layer that looks at neighbours (3x3 convs, the stem max-pool after a ReLU),
    makes those layers see exactly torchvision's zero padding, so features inside the region are
    identical whatever the canvas.

    Args:
      x: (N, h, w, C) map at stride `H // h` of the canvas.
      pixel_valid: (N, H, W) bool at canvas resolution, or None (no masking).
    """
    if pixel_valid is None:
        return x
    return x * valid_at(x, pixel_valid)[..., None].astype(x.dtype)


def _norm(block, name, x, pixel_valid, train):
    """The block's normalisation layer `name` applied to `x` (inside the caller's compact
    scope); FrozenBatchNorm uses the block's `frozen_bn_eps`."""
    return _normalize(block.norm, name, x, eps=block.frozen_bn_eps, dtype=block.dtype,
                      train=train, pixel_valid=pixel_valid)


class BasicBlock(nn.Module):
    """torchvision `BasicBlock` (ResNet-18/34): 3x3 (stride) -> 3x3, identity/1x1 shortcut.

    `features` is the block's output width (expansion 1). Input (N, H, W, Cin) ->
    (N, ceil(H/s), ceil(W/s), features).
    """

    features: int
    strides: int = 1
    dtype: Any = None
    norm: str = "frozen_bn"
    frozen_bn_eps: float = 1e-5
    expansion = 1

    @nn.compact
    def __call__(self, x, pixel_valid=None, train: bool = False):
        out_features = self.features * self.expansion
        y = conv2d(self.features, 3, self.strides, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(_norm(self, "bn1", y, pixel_valid, train))
        y = zero_outside(y, pixel_valid)
        y = conv2d(self.features, 3, 1, 1, dtype=self.dtype, name="conv2")(y)
        y = _norm(self, "bn2", y, pixel_valid, train)
        return zero_outside(nn.relu(y + _shortcut(self, x, out_features, pixel_valid, train)),
                            pixel_valid)


class BottleneckBlock(nn.Module):
    """torchvision `Bottleneck` (v1.5: the stride sits on the 3x3 conv, not the first 1x1).

    1x1 (features) -> 3x3 stride (features) -> 1x1 (4 * features), identity/1x1 shortcut.
    Input (N, H, W, Cin) -> (N, ceil(H/s), ceil(W/s), 4 * features).
    """

    features: int
    strides: int = 1
    dtype: Any = None
    norm: str = "frozen_bn"
    frozen_bn_eps: float = 1e-5
    expansion = 4

    @nn.compact
    def __call__(self, x, pixel_valid=None, train: bool = False):
        out_features = self.features * self.expansion
        y = conv2d(self.features, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(_norm(self, "bn1", y, pixel_valid, train))
        y = zero_outside(y, pixel_valid)
        y = conv2d(self.features, 3, self.strides, 1, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(_norm(self, "bn2", y, pixel_valid, train))
        y = conv2d(out_features, 1, dtype=self.dtype, name="conv3")(y)
        y = _norm(self, "bn3", y, pixel_valid, train)
        return zero_outside(nn.relu(y + _shortcut(self, x, out_features, pixel_valid, train)),
                            pixel_valid)


def _shortcut(block, x, out_features, pixel_valid, train):
    """Identity, or torchvision's `downsample` (1x1 conv with the block's stride + BN) when the
    spatial size or the width changes. Called inside the block's compact scope."""
    if block.strides == 1 and x.shape[-1] == out_features:
        return x.astype(block.dtype) if block.dtype is not None else x
    x = conv2d(out_features, 1, block.strides, dtype=block.dtype, name="downsample_conv")(x)
    return _norm(block, "downsample_bn", x, pixel_valid, train)


def max_pool_3x3_s2(x):
    """torch `max_pool2d(kernel 3, stride 2, padding 1)`: padding acts as -inf, so it never wins."""
    return lax.reduce_window(
        x, np.array(-np.inf, x.dtype), lax.max,  # a NumPy init value keeps max-pool's gradient rule
        window_dimensions=(1, 3, 3, 1), window_strides=(1, 2, 2, 1),
        padding=((0, 0), (1, 1), (1, 1), (0, 0)),
    )


class ResNet(nn.Module):
    """torchvision ResNet body without the classifier, returning the four stage outputs.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block_cls: `BottleneckBlock` or `BasicBlock`.
      width: stem / first-stage width (64 in torchvision); stage i uses width * 2**i.
      dtype: computation dtype (None: input dtype); parameters stay float32.
      norm: 'frozen_bn' (torchvision's FrozenBatchNorm2d, buffers in 'batch_stats': pretrained
        weights), 'batch_norm' (torch's BatchNorm2d, `norm.BatchNorm`: torchvision's ResNet
        without pretrained weights, and v2's) or 'group_norm' (`MaskedGroupNorm`).
      frozen_bn_eps: FrozenBatchNorm's eps (torchvision's 1e-5; 0.0 reproduces torchvision's
        official COCO_V1 Mask R-CNN checkpoint, which it runs with `overwrite_eps(model, 0.0)`).

    Call: x (N, H, W, 3) normalised image, float; optional pixel_valid (N, H, W) bool, the
    region torchvision would run on (see `zero_outside`); `train` (static): batch norms use
    batch statistics and update their running ones. Returns a tuple (C2, C3, C4, C5) of NHWC maps
    at strides 4, 8, 16, 32 (each spatial size is ceil of the previous / 2, as torch computes),
    with widths width * 2**i * block_cls.expansion — torchvision's `backbone.body` '0'..'3'.
    """

    stage_sizes: Sequence[int]
    block_cls: Any = BottleneckBlock
    width: int = 64
    dtype: Any = None
    norm: str = "frozen_bn"
    frozen_bn_eps: float = 1e-5

    @nn.compact
    def __call__(self, x, pixel_valid=None, train: bool = False):
        x = conv2d(self.width, 7, 2, 3, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(_norm(self, "bn1", x, pixel_valid, train))
        # After the ReLU every value is >= 0, so zeros outside the region act as torch's -inf
        # max-pool padding. Pooling windows straddling the region's edge leak valid values just
        # outside it, which the first block's 3x3 conv (BasicBlock) would read: zero them again.
        x = zero_outside(max_pool_3x3_s2(zero_outside(x, pixel_valid)), pixel_valid)
        features = []
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                strides = 2 if (i > 0 and j == 0) else 1
                x = self.block_cls(self.width * 2**i, strides, dtype=self.dtype, norm=self.norm,
                                   frozen_bn_eps=self.frozen_bn_eps,
                                   name=f"layer{i + 1}_{j}")(x, pixel_valid, train)
            features.append(x)
        return tuple(features)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock)
# A few-channel ResNet-18 for fast tests of the wiring (not a torchvision architecture).
TinyResNet = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, width=8)
