"""Flax (linen) network modules of Mask R-CNN, numerically matched to torchvision (NHWC)."""

from maskrcnn_jax.models.fpn import FeaturePyramidNetwork, resize_nearest_like_torch
from maskrcnn_jax.models.heads import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    MaskRCNNHeads,
    MaskRCNNPredictor,
    RPNHead,
    TwoMLPHead,
)
from maskrcnn_jax.models.norm import BatchNorm, FrozenBatchNorm, MaskedGroupNorm
from maskrcnn_jax.models.resnet import (
    BasicBlock,
    BottleneckBlock,
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    TinyResNet,
)

__all__ = [
    "BasicBlock",
    "BatchNorm",
    "BottleneckBlock",
    "FastRCNNConvFCHead",
    "FastRCNNPredictor",
    "FeaturePyramidNetwork",
    "FrozenBatchNorm",
    "MaskRCNNHeads",
    "MaskedGroupNorm",
    "MaskRCNNPredictor",
    "RPNHead",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "TinyResNet",
    "TwoMLPHead",
    "resize_nearest_like_torch",
]
