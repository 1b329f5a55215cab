"""The Mask R-CNN network, wired once as torchvision's GeneralizedRCNN:
backbone -> FPN -> RPN -> box head -> detections -> mask head.

`MaskRCNN(config)` holds the weighted modules (names match torchvision's, see
`maskrcnn_jax.torchvision`); `__call__` runs on a batch already resized and padded into the
config's canvas (`transform.preprocess`). In
inference (default) it returns fixed-size, padded detections in resized-image pixels; with
`train=True`, targets and a key it samples anchors and RoIs as torchvision's training forward and
returns the raw head outputs with their targets (`losses.maskrcnn_losses` turns them into losses).
Anchors (`ops.anchors`), FPN levels, pooler sizes and RoI scales below are shared by both modes.
In inference batch elements never interact: each image behaves as torchvision run on that image
alone. In training, groups of `train_padding_group` consecutive images share their largest
padded size, as torchvision's batch tensor (`group_padded_sizes`).
"""

import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from maskrcnn_jax import models
from maskrcnn_jax.layers import targets as tg
from maskrcnn_jax.layers.detections import postprocess_detections
from maskrcnn_jax.layers.proposals import generate_proposals
from maskrcnn_jax.ops.anchors import multilevel_anchors_for_image
from maskrcnn_jax.ops.roi_align import multilevel_roi_align

BACKBONES = {
    "resnet18": models.ResNet18,
    "resnet34": models.ResNet34,
    "resnet50": models.ResNet50,
    "resnet101": models.ResNet101,
    "tiny": models.TinyResNet,
}

# FPN levels P2..P6 have strides 2**2 .. 2**6 (anchors on all five); RoIs pool from P2..P5
# (torchvision's MultiScaleRoIAlign on '0'..'3', sampling ratio 2, level mapping k0=4 over 2..5).
FPN_LEVELS = (2, 3, 4, 5, 6)
ROI_LEVELS = FPN_LEVELS[:4]
ROI_SCALES = tuple(1 / 2**k for k in ROI_LEVELS)
ROI_SAMPLING_RATIO = 2
BOX_POOL_SIZE = (7, 7)
DEFAULT_MASK_SIZE = 28  # torchvision's; a config without `mask_size` has it


def mask_pool_size(config) -> Tuple[int, int]:
    """Mask-head RoIAlign output: half the mask size (the predictor upsamples 2x)."""
    half = int(config.get("mask_size", DEFAULT_MASK_SIZE)) // 2
    return (half, half)


def is_cropped(masks, canvas_size, mask_format: Optional[str]) -> bool:
    """Whether gt masks are crops on their boxes (True) or canvas-sized full-resolution masks.

    `mask_format` 'crops' / 'full', or None: decided by shape (masks the canvas size are full).
    """
    if mask_format is None:
        return tuple(masks.shape[2:]) != tuple(canvas_size)
    if mask_format not in ("crops", "full"):
        raise ValueError(f"mask_format must be 'crops', 'full' or None, got {mask_format!r}")
    return mask_format == "crops"


def group_padded_sizes(padded_sizes, group: int):
    """`(B, 2)` int32: each image's padded size replaced by the largest height and width of its
    group of `group` consecutive images (the last group may be shorter), as torchvision pads a
    batch tensor to its largest image. `group` 1: unchanged."""
    num_images = padded_sizes.shape[0]
    if group <= 1 or num_images <= 1:
        return padded_sizes
    ids = jnp.arange(num_images) // group
    largest = jax.ops.segment_max(padded_sizes, ids, num_segments=-(-num_images // group),
                                  indices_are_sorted=True)
    return largest[ids]


def canvas_valid(canvas_hw, padded_sizes):
    """`(B, H, W)` bool: the pixels of each image's padded region `padded_sizes (B, 2)` in a
    canvas of `canvas_hw` (torchvision's batch tensor for that image alone)."""
    return ((jnp.arange(canvas_hw[0])[None, :, None] < padded_sizes[:, 0, None, None])
            & (jnp.arange(canvas_hw[1])[None, None, :] < padded_sizes[:, 1, None, None]))


class MaskRCNN(nn.Module):
    """Mask R-CNN with an FPN backbone (torchvision `maskrcnn_resnet50_fpn` and variants).

    Attributes:
      config: `maskrcnn_jax.config.model_config(...)` (a FrozenConfigDict is made of it).
    """

    config: Any

    def setup(self):
        cfg = self.config
        dtype = None if cfg.compute_dtype == "float32" else jnp.dtype(cfg.compute_dtype)
        if cfg.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {cfg.backbone!r}; choose from {sorted(BACKBONES)}")
        backbone_norm, head_norm = norm_kinds(cfg)
        # Defaults for configs without the keys: torchvision's eps and v1.
        self.backbone = BACKBONES[cfg.backbone](
            dtype=dtype, norm=backbone_norm, frozen_bn_eps=float(cfg.get("frozen_bn_eps", 1e-5)))
        # torchvision v2: batch norm in the FPN and heads, 2-conv RPN head, conv+fc box head.
        v2 = cfg.get("architecture", "v1") == "v2"
        self.fpn = models.FeaturePyramidNetwork(cfg.fpn_channels, norm=head_norm, dtype=dtype)
        self.rpn_head = models.RPNHead(num_anchors=3, conv_depth=2 if v2 else 1, dtype=dtype)
        if v2:
            self.box_head = models.FastRCNNConvFCHead(
                (cfg.fpn_channels,) * 4, (cfg.box_representation_size,), norm=head_norm,
                dtype=dtype)
        else:
            self.box_head = models.TwoMLPHead(cfg.box_representation_size, dtype=dtype)
        self.box_predictor = models.FastRCNNPredictor(cfg.num_classes, dtype=dtype)
        self.mask_head = models.MaskRCNNHeads(tuple(cfg.mask_head_layers), norm=head_norm,
                                              dtype=dtype)
        self.mask_predictor = models.MaskRCNNPredictor(
            cfg.num_classes, cfg.mask_dim_reduced, dtype=dtype)

    def features(self, images, padded_sizes, train: bool = False):
        """FPN levels P2..P6 `(B, h_l, w_l, 256)` of canvas images `(B, H, W, 3)`; `train`:
        batch norms on batch statistics (over the whole canvas batch, as torchvision's over its
        padded batch tensor)."""
        pixel_valid = canvas_valid(images.shape[1:3], padded_sizes)
        return self.fpn(self.backbone(images, pixel_valid, train), pixel_valid, train)

    def proposals(self, fpn_features, anchors, anchor_valid, image_sizes, train: bool = False,
                  pixel_valid=None):
        """RPN head outputs and padded proposals per image (see `generate_proposals`).

        `anchors` / `anchor_valid`: per level `(B, N_l, 4)` / `(B, N_l)` (`anchors_for_image`);
        `pixel_valid`: `canvas_valid(...)`, for a head of several convs (v2).
        """
        cfg = self.config
        objectness, deltas = self.rpn_head(fpn_features, pixel_valid)

        def one_image(obj, dlt, anc, anc_valid, image_size):
            return generate_proposals(
                obj, dlt, anc, anc_valid, image_size,
                pre_nms_top_n=cfg.rpn_pre_nms_top_n_train if train else cfg.rpn_pre_nms_top_n_test,
                post_nms_top_n=cfg.rpn_post_nms_top_n_train if train else cfg.rpn_post_nms_top_n_test,
                nms_thresh=cfg.rpn_nms_thresh, score_thresh=cfg.rpn_score_thresh,
                min_size=cfg.rpn_min_size,
            )

        boxes, scores, valid = jax.vmap(one_image)(
            objectness, deltas, anchors, anchor_valid, image_sizes)
        return {"objectness": objectness, "rpn_deltas": deltas,
                "proposals": boxes, "proposal_scores": scores, "proposal_valid": valid}

    def pool(self, fpn_features, boxes, padded_sizes, output_size):
        """RoIAlign `(B, R, 4)` boxes from P2..P5: `(B, R, oh, ow, 256)` (torchvision's
        `MultiScaleRoIAlign`, sampling ratio 2, each image's own feature extent)."""
        levels = fpn_features[: len(ROI_LEVELS)]

        def one_image(feats, image_boxes, padded_size):
            valid_sizes = jnp.stack([-(-padded_size // 2**k) for k in ROI_LEVELS])
            return multilevel_roi_align(feats, image_boxes, output_size, ROI_SCALES,
                                        sampling_ratio=ROI_SAMPLING_RATIO, valid_sizes=valid_sizes)

        return jax.vmap(one_image)(levels, boxes, padded_sizes)

    def box_outputs(self, roi_features, train: bool = False, valid=None):
        """Box head + predictor on `(B, R, 7, 7, C)`: class logits `(B, R, K)`, deltas
        `(B, R, 4K)`. `train` / `valid (B, R)`: a batch-normed head's statistics (v2) over the
        valid RoIs."""
        b, r = roi_features.shape[:2]
        flat = roi_features.reshape(b * r, *roi_features.shape[2:])
        if isinstance(self.box_head, models.FastRCNNConvFCHead):
            hidden = self.box_head(flat, train, None if valid is None else valid.reshape(b * r))
        else:
            hidden = self.box_head(flat)
        logits, deltas = self.box_predictor(hidden)
        return logits.reshape(b, r, -1), deltas.reshape(b, r, -1)

    def mask_logits(self, roi_features, train: bool = False, valid=None):
        """Mask head + predictor on `(B, D, 14, 14, C)`: logits `(B, D, 28, 28, K)`. `train` /
        `valid (B, D)`: a batch-normed head's statistics (v2) over the valid RoIs."""
        b, d = roi_features.shape[:2]
        flat = roi_features.reshape(b * d, *roi_features.shape[2:])
        hidden = self.mask_head(flat, train, None if valid is None else valid.reshape(b * d))
        logits = self.mask_predictor(hidden)
        return logits.reshape(b, d, *logits.shape[1:])

    def create_parameters(self, images, padded_sizes):
        """Runs every parameterized submodule once (backbone, FPN, RPN head, box and mask heads)
        without the proposal and detection steps between them: `init` with this method creates
        the variables of `__call__` at a fraction of its tracing time (`variable_shapes`)."""
        fpn_features = self.features(images, padded_sizes)
        self.rpn_head(fpn_features, canvas_valid(images.shape[1:3], padded_sizes))
        channels = fpn_features[0].shape[-1]
        self.box_outputs(jnp.zeros((1, 1, *BOX_POOL_SIZE, channels), fpn_features[0].dtype))
        return self.mask_logits(jnp.zeros((1, 1, *mask_pool_size(self.config), channels),
                                          fpn_features[0].dtype))

    def __call__(self, images, image_sizes, padded_sizes, targets=None, key=None,
                 train: bool = False):
        """The network on canvas images: inference (default) or training outputs (`train=True`).

        Args:
          images: `(B, H, W, 3)` float32 normalized images in the canvas, zero-padded.
          image_sizes: `(B, 2)` int32 resized `(height, width)` of each image.
          padded_sizes: `(B, 2)` int32 `image_sizes` rounded up to 32.
          targets: training only: dict with `boxes (B, G, 4)` float32 xyxy resized pixels,
            `labels (B, G)` int32 `1..K-1`, `valid (B, G)` bool, `masks` `(B, G, S, S)` crops on
            the gt boxes or `(B, G, H, W)` canvas-sized full-resolution masks (0/1, any dtype;
            which of the two: the config's `gt_mask_format`, see `is_cropped`).
          key: training only: PRNG key, the only randomness (anchor and RoI sampling).
          train: static; True gives the training outputs (`training_outputs`), else the
            detections (`detect`).
        """
        if train:
            return self.training_outputs(images, image_sizes, padded_sizes, targets, key)
        return self.detect(images, image_sizes, padded_sizes)

    def _rpn(self, images, padded_sizes, image_sizes, train: bool):
        """FPN features, anchors `(B, N_l, 4)` per level with their validity, RPN outputs."""
        fpn_features = self.features(images, padded_sizes, train)
        feature_sizes = [f.shape[1:3] for f in fpn_features]
        anchors, anchor_valid = jax.vmap(
            lambda p: multilevel_anchors_for_image(feature_sizes, FPN_LEVELS, p))(padded_sizes)
        rpn = self.proposals(fpn_features, anchors, anchor_valid, image_sizes, train=train,
                             pixel_valid=canvas_valid(images.shape[1:3], padded_sizes))
        return fpn_features, anchors, anchor_valid, rpn

    def detect(self, images, image_sizes, padded_sizes, return_intermediates: bool = False):
        """Inference (`__call__` with `train=False`).

        `return_intermediates` (static): also every stage's output, under `intermediates` (for
        `maskrcnn_jax.torchvision.compare`: `apply(..., method=MaskRCNN.detect)`).

        Returns:
          dict with `boxes (B, D, 4)` float32 `(x1, y1, x2, y2)` in resized-image pixels,
          `scores (B, D)`, `labels (B, D)` int32 (1-based), `valid (B, D)` bool and
          `mask_probs (B, D, 28, 28)` float32 for the predicted class; D =
          detections_per_img, padded entries zero.
        """
        cfg = self.config
        fpn_features, _, _, rpn = self._rpn(images, padded_sizes, image_sizes, train=False)
        box_features = self.pool(fpn_features, rpn["proposals"], padded_sizes, BOX_POOL_SIZE)
        class_logits, box_regression = self.box_outputs(box_features)
        detections = jax.vmap(
            lambda lg, rg, props, valid, size: postprocess_detections(
                lg, rg, props, valid, size,
                bbox_reg_weights=cfg.bbox_reg_weights, score_thresh=cfg.box_score_thresh,
                nms_thresh=cfg.box_nms_thresh, detections_per_img=cfg.box_detections_per_img,
                pre_nms_top_n=cfg.box_pre_nms_top_n,
            )
        )(class_logits, box_regression, rpn["proposals"], rpn["proposal_valid"], image_sizes)
        mask_features = self.pool(
            fpn_features, detections["boxes"], padded_sizes, mask_pool_size(cfg))
        logits = self.mask_logits(mask_features)
        labels = detections["labels"]
        chosen = jnp.take_along_axis(logits, labels[:, :, None, None, None], axis=-1)[..., 0]
        detections["mask_probs"] = jnp.where(
            detections["valid"][:, :, None, None], jax.nn.sigmoid(chosen.astype(jnp.float32)), 0.0)
        if return_intermediates:
            detections["intermediates"] = {
                "fpn": fpn_features, **rpn,
                "class_logits": class_logits, "box_regression": box_regression,
                "mask_logits": logits,
            }
        return detections

    def training_outputs(self, images, image_sizes, padded_sizes, targets, key):
        """torchvision's training forward (`__call__` with `train=True`): RPN in its train
        top-n, anchor and RoI sampling with their targets, box and mask heads on the samples.

        The mask head's static budget comes from the config (`mask_budget`): D slots per image
        (`mask_rois_per_image`; fewer than the image's positives drop those beyond D), or M
        slots shared by the batch (`mask_rois_per_batch`, or `mask_budget_per_image` x B:
        `_pack_mask_rois`, all positives kept while they fit, torchvision's loss; beyond it a
        uniform sample of them); the mask entries of the outputs then have shape
        `(mask_budget_groups, M / mask_budget_groups, ...)`. `max_mask_sampling_grid` bounds
        the RoIAlign grid of full-resolution gt masks (see `targets.mask_targets`). Each group
        of `train_padding_group` consecutive images runs on the group's padded extent
        (`group_padded_sizes`), as torchvision's batch tensor.

        Returns:
          dict (the input of `losses.maskrcnn_losses`) with `objectness (B, N)`,
          `rpn_deltas (B, N, 4)` over all anchors (levels concatenated), `rpn_targets`
          (`targets.rpn_targets` stacked over the batch), `proposals (B, P, 4)`,
          `proposal_valid (B, P)`, `class_logits (B, S, K)`, `box_regression (B, S, 4K)` of
          the sampled RoIs, `roi_targets` (`targets.roi_targets` stacked), `mask_rois`
          (`targets.positive_rois` stacked: boxes, labels, matched_idxs, valid `(B, D)`),
          `mask_logits (B, D, M, M, K)` and `mask_targets (B, D, M, M)` float32,
          `mask_positives (B,)` int32 (each image's sampled positives, all of which torchvision
          gives its mask head) and `mask_rois_kept` () int32 (those the budget kept).
        """
        cfg = self.config
        if targets is None or key is None:
            raise ValueError("MaskRCNN(train=True) needs targets and a PRNG key")
        padded_sizes = group_padded_sizes(padded_sizes, int(cfg.get("train_padding_group", 1)))
        fpn_features, anchors, anchor_valid, rpn = self._rpn(images, padded_sizes, image_sizes,
                                                             train=True)
        num_images = images.shape[0]
        num_mask_rois, batch_budget = mask_budget(cfg, num_images)
        max_mask_sampling_grid = cfg.get("max_mask_sampling_grid")
        cropped = is_cropped(targets["masks"], images.shape[1:3], cfg.get("gt_mask_format"))
        rpn_keys = jax.random.split(jax.random.fold_in(key, 0), num_images)
        roi_keys = jax.random.split(jax.random.fold_in(key, 1), num_images)
        gt_boxes = targets["boxes"].astype(jnp.float32)
        gt_labels = targets["labels"].astype(jnp.int32)
        gt_valid = targets["valid"].astype(bool)

        rpn_tg = jax.vmap(lambda anc, anc_valid, boxes, valid, k: tg.rpn_targets(
            jnp.concatenate(anc), jnp.concatenate(anc_valid), boxes, valid, k,
            batch_size_per_image=cfg.rpn_batch_size_per_image,
            positive_fraction=cfg.rpn_positive_fraction,
            fg_iou_thresh=cfg.rpn_fg_iou_thresh, bg_iou_thresh=cfg.rpn_bg_iou_thresh,
        ))(anchors, anchor_valid, gt_boxes, gt_valid, rpn_keys)

        # torchvision detaches the proposals: no gradient through the RoI coordinates.
        proposals = jax.lax.stop_gradient(rpn["proposals"])
        roi_tg = jax.vmap(lambda p, pv, b, lb, v, k: tg.roi_targets(
            p, pv, b, lb, v, k,
            batch_size_per_image=cfg.box_batch_size_per_image,
            positive_fraction=cfg.box_positive_fraction,
            fg_iou_thresh=cfg.box_fg_iou_thresh, bg_iou_thresh=cfg.box_bg_iou_thresh,
            bbox_reg_weights=tuple(cfg.bbox_reg_weights),
        ))(proposals, rpn["proposal_valid"], gt_boxes, gt_labels, gt_valid, roi_keys)
        box_features = self.pool(fpn_features, roi_tg["boxes"], padded_sizes, BOX_POOL_SIZE)
        class_logits, box_regression = self.box_outputs(box_features, True, roi_tg["valid"])

        rois = jax.vmap(lambda t: tg.positive_rois(t, num_mask_rois))(roi_tg)
        mask_size = 2 * mask_pool_size(cfg)[0]
        mask_targets = jax.vmap(lambda mk, b, r, s: tg.mask_targets(
            mk, b, r, s, mask_size, cropped, max_mask_sampling_grid
        ))(targets["masks"], gt_boxes, rois, image_sizes)
        if batch_budget is None:
            mask_features = self.pool(fpn_features, rois["boxes"], padded_sizes,
                                      mask_pool_size(cfg))
        else:
            rois, mask_targets, mask_features = self._pack_mask_rois(
                fpn_features, padded_sizes, rois, mask_targets, batch_budget,
                jax.random.fold_in(key, 2))
        mask_logits = self.mask_logits(mask_features, True, rois["valid"])
        return {
            "objectness": jnp.concatenate(rpn["objectness"], axis=1),
            "rpn_deltas": jnp.concatenate(rpn["rpn_deltas"], axis=1),
            "rpn_targets": rpn_tg,
            "proposals": proposals, "proposal_valid": rpn["proposal_valid"],
            "class_logits": class_logits, "box_regression": box_regression,
            "roi_targets": roi_tg,
            "mask_rois": rois, "mask_logits": mask_logits, "mask_targets": mask_targets,
            # Every sampled positive (torchvision's mask-head RoIs) per image, and how many of
            # the batch's the mask-head budget kept.
            "mask_positives": jnp.sum(roi_tg["positive"], axis=-1).astype(jnp.int32),
            "mask_rois_kept": jnp.sum(rois["valid"]).astype(jnp.int32),
        }

    def _pack_mask_rois(self, fpn_features, padded_sizes, rois, mask_targets, total, key):
        """The batch-wide mask budget: the batch's B images split into `mask_budget_groups`
        groups of consecutive images (train.py: one per device, so each group is one device's
        share of the batch and the packing never leaves it), each group's positives packed into
        `total / mask_budget_groups` slots (`targets.pack_positive_rois`).

        Returns the packed rois and mask targets with `(groups, N)` leading axes, and their
        RoIAligned features `(groups, N, S, S, C)`: each image pools its group's packed boxes
        and each slot keeps its own image's result."""
        cfg = self.config
        groups = int(cfg.get("mask_budget_groups") or 1)
        num_images = padded_sizes.shape[0]
        if num_images % groups or total % groups:
            raise ValueError(
                f"mask_budget_groups = {groups} must divide the batch ({num_images} images) and "
                f"its mask budget ({total} slots)")
        per_group = num_images // groups

        def grouped(x):
            return x.reshape(groups, per_group, *x.shape[1:])

        budget = total // groups
        rois, mask_targets, image_index = jax.vmap(
            lambda r, t, k: tg.pack_positive_rois(r, t, budget, k))(
                jax.tree_util.tree_map(grouped, rois), grouped(mask_targets),
                jax.random.split(key, groups))
        pooled = grouped(self.pool(fpn_features, jnp.repeat(rois["boxes"], per_group, axis=0),
                                   padded_sizes, mask_pool_size(cfg)))
        features = jnp.take_along_axis(
            pooled, image_index[:, None, :, None, None, None], axis=1)[:, 0]
        return rois, mask_targets, features


def mask_budget(config, num_images: int) -> Tuple[int, Optional[int]]:
    """The mask head's static budget in training (the config's mask keys, see `config.py`).

    Returns `(per_image, batch)`: the positive RoIs kept per image before any packing, and the
    slots of the batch-wide budget of `num_images` images (None: no packing, the mask head runs
    on the `per_image` slots of each image). Every positive (`box_batch_size_per_image *
    box_positive_fraction`, what torchvision's sampler can return) is kept per image unless
    `mask_rois_per_image` bounds it; a batch budget is `mask_rois_per_batch`, or else, without
    `mask_rois_per_image`, `mask_budget_per_image` per image when that is fewer than every
    positive (at least as many is every positive per image, without packing).
    """
    every = int(config.box_batch_size_per_image * config.box_positive_fraction)
    per_batch = config.get("mask_rois_per_batch")
    per_image = config.get("mask_rois_per_image")
    if per_batch is not None:
        return every, int(per_batch)
    if per_image is not None:
        return int(per_image), None
    mean = int(config.get("mask_budget_per_image") or 0)
    if not 0 < mean < every:
        return every, None
    return every, mean * num_images


def norm_kinds(config) -> Tuple[str, Optional[str]]:
    """The backbone's norm layer and the FPN's / heads' (None: v1 has none) for a config.

    torchvision's BatchNorm2d layers (v2's everywhere; a v1 backbone with
    `backbone_norm='batch_norm'`, torchvision's ResNet without pretrained weights) train as
    torchvision's in train mode (`batch_norm='train'`: batch statistics, running statistics
    updated) or, with `batch_norm='frozen'`, run on their running statistics as
    FrozenBatchNorm2d. A v1 backbone of `backbone_norm='frozen_bn'` (pretrained weights) is
    FrozenBatchNorm2d either way.
    """
    mode = config.get("batch_norm", "train")
    batch_norm = "batch_norm" if mode == "train" else "frozen_bn"
    backbone = config.get("backbone_norm", "frozen_bn")
    if backbone == "batch_norm":
        backbone = batch_norm
    return backbone, (batch_norm if config.get("architecture", "v1") == "v2" else None)


def frozen(config) -> ml_collections.FrozenConfigDict:
    """A hashable copy of a model config (Flax module attributes must be hashable for jit)."""
    return ml_collections.FrozenConfigDict(config)


def canvas_feature_sizes(canvas_size):
    """Static `(h, w)` of P2..P6 for a canvas (ceil halving, as the convolutions compute)."""
    return [tuple(int(math.ceil(s / 2**k)) for s in canvas_size) for k in FPN_LEVELS]
