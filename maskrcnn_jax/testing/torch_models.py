"""torchvision models prepared for comparisons: non-trivial frozen batch norm, confident heads."""

import torch


@torch.no_grad()
def randomize_frozen_bn_and_biases(module, seed):
    """Set FrozenBatchNorm2d / BatchNorm2d parameters and buffers to a non-identity affine map
    (running_var > 0) and every bias to non-zero values, so that a comparison exercises them
    (torchvision initialises BN to the identity and many biases to zero)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
            c = m.weight.shape[0]
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(0.2 * torch.randn(c, generator=g))
            m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def freeze_batch_norm(module, eps=1e-5):
    """Replace every `nn.BatchNorm2d` in `module` (in place) by a `FrozenBatchNorm2d(eps=eps)`
    holding its weight, bias and running statistics; returns `module`.

    `maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)` builds its ResNet with
    BatchNorm2d; torchvision's pretrained builders use FrozenBatchNorm2d (eps 0.0 for the COCO_V1
    Mask R-CNN, after `overwrite_eps`): this makes the former the latter.
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key))
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child, eps)
    return module


@torch.no_grad()
def make_confident(model, class_scale=3.0, box_scale=5.0):
    """Random weights give flat scores: sharpen a Mask R-CNN's objectness, class, box and mask
    logits so that it detects confidently (without saturating the sigmoid/softmax).
    `class_scale` / `box_scale` multiply the box predictor's weights (v2's batch-normed box head
    gives ~100x larger features: 0.1 / 0.05 there keep its scores spread and its box deltas
    O(1) rather than saturating the decode's clamp)."""
    model.rpn.head.cls_logits.weight.mul_(4.0)
    model.roi_heads.box_predictor.cls_score.weight.mul_(class_scale)
    model.roi_heads.box_predictor.bbox_pred.weight.mul_(box_scale)
    model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(20.0)
    return model


_TORCHVISION_KWARGS = (
    "min_size", "max_size", "image_mean", "image_std",
    "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
    "rpn_post_nms_top_n_test", "rpn_nms_thresh", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh",
    "rpn_batch_size_per_image", "rpn_positive_fraction", "rpn_score_thresh",
    "box_score_thresh", "box_nms_thresh", "box_detections_per_img", "box_fg_iou_thresh",
    "box_bg_iou_thresh", "box_batch_size_per_image", "box_positive_fraction", "bbox_reg_weights",
    "size_divisible",
)


def torchvision_maskrcnn(config):
    """torchvision's `MaskRCNN` with the architecture and settings of a maskrcnn_jax config, in
    eval mode, with random weights: load `maskrcnn_jax.torchvision.convert.to_torchvision(config, v)` into it.

    `maskrcnn_resnet50_fpn` fixes the FPN and head widths; this builds the same network from
    torchvision's parts for any config: a `resnet18/34/50/101` body with FrozenBatchNorm2d of eps
    `frozen_bn_eps` (0.0 for the official COCO_V1 checkpoint), or BatchNorm2d where the config's
    batch norms train (`models.maskrcnn.norm_kinds`), in a `BackboneWithFPN` of
    `fpn_channels` (as `_resnet_fpn_extractor`, LastLevelMaxPool),
    `RPNHead(fpn_channels, 3)`, `TwoMLPHead(fpn_channels * 7 * 7, box_representation_size)`,
    `FastRCNNPredictor`, `MaskRCNNHeads(fpn_channels, mask_head_layers, 1)`,
    `MaskRCNNPredictor(mask_head_layers[-1], mask_dim_reduced, num_classes)`; for
    `architecture='v2'` as `maskrcnn_resnet50_fpn_v2`: FPN and mask head with `norm_layer`
    BatchNorm2d (FrozenBatchNorm2d for `batch_norm='frozen'`), `RPNHead(conv_depth=2)`,
    `FastRCNNConvFCHead((fpn_channels, 7, 7), [fpn_channels] * 4, [box_representation_size],
    norm_layer=...)`. The resize
    (`min_size`, `max_size`, `size_divisible`), normalization, RPN and box thresholds, and the
    RPN's minimum box size (`rpn_min_size`) follow the config. maskrcnn_jax's
    `box_pre_nms_top_n` has no torchvision counterpart (torchvision keeps every candidate above
    the score threshold).
    """
    from maskrcnn_jax.testing import import_torchvision
    from maskrcnn_jax.torchvision.convert import check_torchvision_architecture

    torchvision = import_torchvision()
    from torchvision.models.detection import backbone_utils
    from torchvision.models.detection.faster_rcnn import (
        FastRCNNConvFCHead,
        FastRCNNPredictor,
        TwoMLPHead,
    )
    from torchvision.models.detection.mask_rcnn import (
        MaskRCNN,
        MaskRCNNHeads,
        MaskRCNNPredictor,
    )
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops.misc import FrozenBatchNorm2d

    from maskrcnn_jax.models.maskrcnn import norm_kinds

    check_torchvision_architecture(config)
    # torchvision's module for each of our norm layers: BatchNorm2d where ours trains as it
    # (`norm_kinds`: 'batch_norm'), FrozenBatchNorm2d where ours is frozen.
    backbone_norm, head_norm = norm_kinds(config)
    layer_of = {"batch_norm": torch.nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d, None: None}
    body = getattr(torchvision.models, config.backbone)(weights=None,
                                                        norm_layer=layer_of[backbone_norm])
    # The state dict carries no eps: set the config's (as torchvision's `overwrite_eps`), so that
    # `to_torchvision` weights run here as in maskrcnn_jax (torchvision's 1e-5 by default).
    eps = float(config.get("frozen_bn_eps", 1e-5))
    for m in body.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = eps
    # As `_resnet_fpn_extractor` (C2..C5 into the FPN, LastLevelMaxPool), which fixes 256
    # channels.
    channels = int(config.fpn_channels)
    representation = int(config.box_representation_size)
    v2 = config.get("architecture", "v1") == "v2"
    norm = layer_of[head_norm]
    stage2 = body.inplanes // 8
    backbone = backbone_utils.BackboneWithFPN(
        body, {f"layer{k}": str(k - 1) for k in range(1, 5)},
        [stage2 * 2 ** (k - 1) for k in range(1, 5)], channels, norm_layer=norm)
    layers = tuple(int(c) for c in config.mask_head_layers)
    kwargs = {k: config[k] for k in _TORCHVISION_KWARGS}
    for key in ("image_mean", "image_std", "bbox_reg_weights"):
        kwargs[key] = list(kwargs[key])
    # Modules in the order torchvision's builders create them: the random initialisation (and
    # every seeded test model) depends on it.
    rpn_head = RPNHead(channels, 3, conv_depth=2 if v2 else 1)
    box_head = (FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [representation],
                                   norm_layer=norm) if v2 else
                TwoMLPHead(channels * 7 * 7, representation))
    model = MaskRCNN(
        backbone, num_classes=None,
        rpn_head=rpn_head,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(representation, int(config.num_classes)),
        mask_head=MaskRCNNHeads(channels, layers, 1, norm_layer=norm),
        mask_predictor=MaskRCNNPredictor(layers[-1], int(config.mask_dim_reduced),
                                         int(config.num_classes)),
        **kwargs)
    model.rpn.min_size = float(config.rpn_min_size)
    return model.eval()


def torchvision_coco_metrics(model, source, max_images=None, ground_truth=None):
    """COCO bbox and segm metrics of a torchvision detector on a data source, computed as
    torchvision's reference `coco_eval.py` does, independently of
    `maskrcnn_jax.inference.evaluation.evaluate` (no maskrcnn_jax pipeline, resize or model):
    each record's decoded uint8 image is scaled to [0, 1] and run alone through `model` (eval
    mode), its outputs go through
    `coco_results.detections_to_coco` and pycocotools.

    Args:
      model: a torchvision Mask R-CNN in eval mode.
      source: a data source (`builders.load(...)`); records give `image` and `image_id`.
      max_images: the first `max_images` records only (as `evaluate(max_images=...)`).
      ground_truth: a pycocotools `COCO` (default: `builders.coco_ground_truth(source)`).

    Returns:
      (metrics `{'bbox/AP': ..., ..., 'segm/ARl': ...}`, COCO result dicts).
    """
    import numpy as np

    from maskrcnn_jax.data import builders
    from maskrcnn_jax.inference import coco_results

    mapping = coco_results.label_to_category_map(builders.categories(source))
    n = len(source) if max_images is None else min(int(max_images), len(source))
    results, image_ids = [], []
    for index in range(n):
        record = source[index]
        image = np.array(record["image"], np.uint8)  # a writable copy for torch.from_numpy
        tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
        with torch.no_grad():
            out = model([tensor])[0]
        image_ids.append(int(record["image_id"]))
        results += coco_results.detections_to_coco(
            image_ids[-1], out["boxes"].numpy(), out["scores"].numpy(), out["labels"].numpy(),
            out["masks"].numpy(), mapping)
    if ground_truth is None:
        ground_truth = builders.coco_ground_truth(source)
    metrics = {}
    for iou_type in coco_results.IOU_TYPES:
        stats = coco_results.coco_evaluate(ground_truth, results, iou_type, image_ids=image_ids,
                                         verbose=False)
        metrics.update({f"{iou_type}/{k}": v for k, v in stats.items()})
    return metrics, results


@torch.no_grad()
def randomize_batch_norm(module, seed):
    """BatchNorm2d / FrozenBatchNorm2d to a mild random affine map near the identity (scale in
    [0.8, 1.25], small shifts), keeping activations of a deep random network at their scale:
    torchvision's v2 has a norm after every conv, whose identity initialisation a comparison
    would not exercise."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
            c = m.weight.shape[0]
            var = torch.rand(c, generator=g) + 0.5
            scale = torch.rand(c, generator=g) * 0.45 + 0.8
            m.weight.copy_(scale * var.sqrt())
            m.running_var.copy_(var)
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return module
