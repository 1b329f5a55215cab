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
from maskrcnn_jax.models.resnet import (
    BasicBlock,
    BottleneckBlock,
    FrozenBatchNorm,
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    TinyResNet,
)

__all__ = [
    "BasicBlock",
    "BottleneckBlock",
    "FastRCNNConvFCHead",
    "FastRCNNPredictor",
    "FeaturePyramidNetwork",
    "FrozenBatchNorm",
    "MaskRCNNHeads",
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
