"""torchvision models prepared for comparisons: non-trivial frozen batch norm, confident heads."""

import torch


@torch.no_grad()
def randomize_frozen_bn_and_biases(module, seed):
    """Set FrozenBatchNorm2d buffers to a non-identity affine map (running_var > 0) and every
    bias to non-zero values, so that a comparison exercises them (torchvision initialises BN to
    the identity and many biases to zero)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.shape[0]
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(0.2 * torch.randn(c, generator=g))
            m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def make_confident(model):
    """Random weights give flat scores: sharpen a Mask R-CNN's objectness, class, box and mask
    logits so that it detects confidently (without saturating the sigmoid/softmax)."""
    model.rpn.head.cls_logits.weight.mul_(4.0)
    model.roi_heads.box_predictor.cls_score.weight.mul_(3.0)
    model.roi_heads.box_predictor.bbox_pred.weight.mul_(5.0)
    model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(20.0)
    return model
