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
    eval mode, with random weights: load `maskrcnn_jax.convert.to_torchvision(config, v)` into it.

    `maskrcnn_resnet50_fpn` fixes the FPN and head widths; this builds the same network from
    torchvision's parts for any config: a `resnet18/34/50/101` body with FrozenBatchNorm2d in a
    `BackboneWithFPN` of `fpn_channels` (as `_resnet_fpn_extractor`, LastLevelMaxPool),
    `RPNHead(fpn_channels, 3)`, `TwoMLPHead(fpn_channels * 7 * 7, box_representation_size)`,
    `FastRCNNPredictor`, `MaskRCNNHeads(fpn_channels, mask_head_layers, 1)`,
    `MaskRCNNPredictor(mask_head_layers[-1], mask_dim_reduced, num_classes)`. The resize
    (`min_size`, `max_size`, `size_divisible`), normalization, RPN and box thresholds, and the
    RPN's minimum box size (`rpn_min_size`) follow the config. maskrcnn_jax's
    `box_pre_nms_top_n` has no torchvision counterpart (torchvision keeps every candidate above
    the score threshold).
    """
    from maskrcnn_jax.convert import check_torchvision_architecture
    from maskrcnn_jax.testing import import_torchvision

    torchvision = import_torchvision()
    from torchvision.models.detection import backbone_utils
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import (MaskRCNN, MaskRCNNHeads,
                                                        MaskRCNNPredictor)
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops.misc import FrozenBatchNorm2d

    check_torchvision_architecture(config)
    body = getattr(torchvision.models, config.backbone)(weights=None,
                                                        norm_layer=FrozenBatchNorm2d)
    # As `_resnet_fpn_extractor` (C2..C5 into the FPN, LastLevelMaxPool), which fixes 256
    # channels.
    channels = int(config.fpn_channels)
    stage2 = body.inplanes // 8
    backbone = backbone_utils.BackboneWithFPN(
        body, {f"layer{k}": str(k - 1) for k in range(1, 5)},
        [stage2 * 2 ** (k - 1) for k in range(1, 5)], channels)
    layers = tuple(int(c) for c in config.mask_head_layers)
    kwargs = {k: config[k] for k in _TORCHVISION_KWARGS}
    for key in ("image_mean", "image_std", "bbox_reg_weights"):
        kwargs[key] = list(kwargs[key])
    model = MaskRCNN(
        backbone, num_classes=None,
        rpn_head=RPNHead(channels, 3),
        box_head=TwoMLPHead(channels * 7 * 7, int(config.box_representation_size)),
        box_predictor=FastRCNNPredictor(int(config.box_representation_size),
                                        int(config.num_classes)),
        mask_head=MaskRCNNHeads(channels, layers, 1),
        mask_predictor=MaskRCNNPredictor(layers[-1], int(config.mask_dim_reduced),
                                         int(config.num_classes)),
        **kwargs)
    model.rpn.min_size = float(config.rpn_min_size)
    return model.eval()


def torchvision_coco_metrics(model, source, max_images=None, ground_truth=None):
    """COCO bbox and segm metrics of a torchvision detector on a data source, computed as
    torchvision's reference `coco_eval.py` does, independently of `maskrcnn_jax.evaluation.evaluate`
    (no maskrcnn_jax pipeline, resize or model): each record's decoded uint8 image is scaled to
    [0, 1] and run alone through `model` (eval mode), its outputs go through
    `evaluation.detections_to_coco` and pycocotools.

    Args:
      model: a torchvision Mask R-CNN in eval mode.
      source: a data source (`builders.load(...)`); records give `image` and `image_id`.
      max_images: the first `max_images` records only (as `evaluate(max_images=...)`).
      ground_truth: a pycocotools `COCO` (default: `builders.coco_ground_truth(source)`).

    Returns:
      (metrics `{'bbox/AP': ..., ..., 'segm/ARl': ...}`, COCO result dicts).
    """
    import numpy as np

    from maskrcnn_jax import evaluation
    from maskrcnn_jax.data import builders

    mapping = evaluation.label_to_category_map(builders.categories(source))
    n = len(source) if max_images is None else min(int(max_images), len(source))
    results, image_ids = [], []
    for index in range(n):
        record = source[index]
        image = np.array(record["image"], np.uint8)  # a writable copy for torch.from_numpy
        tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
        with torch.no_grad():
            out = model([tensor])[0]
        image_ids.append(int(record["image_id"]))
        results += evaluation.detections_to_coco(
            image_ids[-1], out["boxes"].numpy(), out["scores"].numpy(), out["labels"].numpy(),
            out["masks"].numpy(), mapping)
    if ground_truth is None:
        ground_truth = builders.coco_ground_truth(source)
    metrics = {}
    for iou_type in evaluation.IOU_TYPES:
        stats = evaluation.coco_evaluate(ground_truth, results, iou_type, image_ids=image_ids,
                                         verbose=False)
        metrics.update({f"{iou_type}/{k}": v for k, v in stats.items()})
    return metrics, results


def _roi_axis_weights(start, bin_size, grid, pooled, size):
    """`(K, pooled, size)` weights of one axis: for RoI k and output row/column p, the bilinear
    weight of each pixel summed over the bin's `grid[k]` samples and divided by `grid[k]`, with
    the C++ kernel's rules (a sample beyond [-1, size] counts 0, coordinates clamp to the
    border)."""
    k = start.shape[0]
    g = max(int(grid.max().item()), 1)
    i = torch.arange(g, dtype=start.dtype)
    p = torch.arange(pooled, dtype=start.dtype)
    coords = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
              + (i[None, None, :] + 0.5) * (bin_size / grid.clamp(min=1))[:, None, None])
    use = (i[None, None, :] < grid[:, None, None]) & (coords >= -1.0) & (coords <= size)
    coords = coords.clamp(min=0.0)
    low = coords.floor().long()
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    coords = torch.where(at_end, low.to(coords.dtype), coords)
    frac = coords - low.to(coords.dtype)
    weights = torch.zeros(k, pooled, g, size, dtype=start.dtype)
    weights.scatter_add_(3, low[..., None], ((1.0 - frac) * use)[..., None])
    weights.scatter_add_(3, high[..., None], (frac * use)[..., None])
    return weights.sum(2) / grid.clamp(min=1).to(start.dtype)[:, None, None]


def separable_roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                        aligned):
    """RoIAlign with the C++ kernel's semantics as two matrix products per image, a fast
    stand-in (same signature) for torchvision's pure-PyTorch `_roi_align`, whose 6-D indexing
    takes ~1 s per image of a small Mask R-CNN on a CPU.

    Bilinear sampling and the bin average factor into a y part times an x part, so
    `out[k, c] = Wy[k] @ F[b_k, c] @ Wx[k].T` with dense `(pooled, H)` / `(pooled, W)` weight
    tables (`_roi_axis_weights`). A different algorithm from both torchvision's Python path and
    maskrcnn_jax's gather-based op; equal up to float32 summation order.

    Args (torchvision's): input `(N, C, H, W)`; rois `(K, 5)` `(batch index, x1, y1, x2, y2)`;
    spatial_scale; pooled_height, pooled_width; sampling_ratio (<= 0: adaptive,
    `ceil(roi size / pooled size)` samples per bin); aligned (half-pixel offset).
    Returns `(K, C, pooled_height, pooled_width)` in the input's dtype.
    """
    n, c, h, w = input.shape
    k = rois.shape[0]
    if k == 0:
        return input.new_zeros((0, c, pooled_height, pooled_width))
    x = input.float()
    r = rois.float()
    offset = 0.5 if aligned else 0.0
    x1, y1 = r[:, 1] * spatial_scale - offset, r[:, 2] * spatial_scale - offset
    roi_w, roi_h = r[:, 3] * spatial_scale - offset - x1, r[:, 4] * spatial_scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / pooled_height, roi_w / pooled_width
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((k,), sampling_ratio, dtype=torch.long)
    else:
        grid_h = torch.ceil(roi_h / pooled_height).long()
        grid_w = torch.ceil(roi_w / pooled_width).long()
    wy = _roi_axis_weights(y1, bin_h, grid_h, pooled_height, h)  # (K, PH, H)
    wx = _roi_axis_weights(x1, bin_w, grid_w, pooled_width, w)  # (K, PW, W)
    out = x.new_zeros((k, c, pooled_height, pooled_width))
    batch = r[:, 0].long()
    for b in torch.unique(batch).tolist():
        sel = torch.nonzero(batch == b)[:, 0]
        rows = torch.einsum("kph,chw->kcpw", wy[sel], x[b])
        out[sel] = torch.einsum("kcpw,kqw->kcpq", rows, wx[sel])
    return out.to(input.dtype)


class fast_roi_align:  # noqa: N801  (used as a context manager, like torch.no_grad)
    """Within `with fast_roi_align():`, torchvision's Python RoIAlign fallback (used where its
    compiled ops are missing) is `separable_roi_align`; restored on exit."""

    def __enter__(self):
        import sys

        from maskrcnn_jax.testing import import_torchvision

        import_torchvision()
        self._module = sys.modules["torchvision.ops.roi_align"]
        self._saved = self._module._roi_align
        self._module._roi_align = separable_roi_align
        return self

    def __exit__(self, *exc):
        self._module._roi_align = self._saved
        return False
