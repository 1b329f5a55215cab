"""torchvision's `FeaturePyramidNetwork` with `LastLevelMaxPool` (P2..P6), NHWC.

Variable names mirror torchvision: `inner_blocks_{i}` (torch `inner_blocks.{i}.0`, 1x1 lateral
convs) and `layer_blocks_{i}` (torch `layer_blocks.{i}.0`, 3x3 output convs), both with bias;
with a `norm` (torchvision v2's `norm_layer=BatchNorm2d`: 'batch_norm', or 'frozen_bn' for its
running statistics only) the convs have no bias and are followed by `inner_bn_{i}` /
`layer_bn_{i}` (torch `inner_blocks.{i}.1` / `layer_blocks.{i}.1`).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from maskrcnn_jax.models.heads import head_norm
from maskrcnn_jax.models.resnet import conv2d, zero_outside
from maskrcnn_jax.ops.interpolate import nearest_indices

# torchvision initialises the FPN convs with kaiming_uniform_(a=1) (gain 1) and zero bias.
_fpn_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def resize_nearest_like_torch(x, out_hw):
    """Nearest-neighbour resize of x (N, H, W, C) to (N, out_h, out_w, C), as torch's
    `F.interpolate(x, size=out_hw, mode="nearest")` (a static gather, no arithmetic)."""
    rows = nearest_indices(x.shape[1], out_hw[0])
    cols = nearest_indices(x.shape[2], out_hw[1])
    return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


class FeaturePyramidNetwork(nn.Module):
    """Top-down FPN over backbone maps of increasing stride.

    Attributes:
      out_channels: width of every output level (256 in Mask R-CNN).
      extra_max_pool: append torchvision's `LastLevelMaxPool` level (`max_pool2d(kernel 1,
        stride 2)` of the coarsest output, i.e. `x[:, ::2, ::2]`), giving P6.
      norm: None (v1) or v2's conv without bias + batch norm: 'batch_norm' (batch statistics
        in training) or 'frozen_bn' (running statistics only).
      dtype: computation dtype (None: input dtype); parameters stay float32.

    Call: features, a sequence of NHWC maps (C2..C5), finest first. Returns a tuple of NHWC maps
    (P2..P5[, P6]) with `out_channels` channels, finest first (zeroed outside `pixel_valid`,
    (N, H, W) bool at canvas resolution, when given; see `resnet.zero_outside`) — torchvision's
    '0'..'3', 'pool'. `train` (static): batch norms use batch statistics.
    """

    out_channels: int = 256
    extra_max_pool: bool = True
    norm: Optional[str] = None
    dtype: Any = None

    @nn.compact
    def __call__(self, features: Sequence, pixel_valid=None, train: bool = False):
        def block(kind, i, kernel_size, x):
            x = conv2d(self.out_channels, kernel_size, 1, kernel_size // 2,
                       use_bias=self.norm is None, dtype=self.dtype, kernel_init=_fpn_init,
                       name=f"{kind}_blocks_{i}")(x)
            if self.norm is None:
                return x
            return head_norm(self.norm, f"{kind}_bn_{i}", x, self.dtype, train)

        def inner(i, x):
            return block("inner", i, 1, x)

        def layer(i, x):
            return block("layer", i, 3, x)

        last = len(features) - 1
        last_inner = inner(last, features[last])
        results = [layer(last, zero_outside(last_inner, pixel_valid))]
        for i in range(last - 1, -1, -1):
            lateral = inner(i, features[i])
            last_inner = lateral + resize_nearest_like_torch(last_inner, lateral.shape[1:3])
            results.insert(0, layer(i, zero_outside(last_inner, pixel_valid)))
        if self.extra_max_pool:
            # A 1x1 max-pool with stride 2 is pure subsampling: output size ceil(H/2).
            results.append(results[-1][:, ::2, ::2, :])
        return tuple(zero_outside(r, pixel_valid) for r in results)
