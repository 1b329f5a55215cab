"""The Mask R-CNN network and its jit-compiled inference, wired as torchvision's GeneralizedRCNN:
backbone -> FPN -> RPN -> box head -> detections -> mask head.

`MaskRCNN(config)` holds the weighted modules (names match `convert_weights`); `__call__` runs
inference on a batch already resized and padded into the config's canvas (`transform.preprocess`)
and returns fixed-size, padded detections in resized-image pixels. Batch elements never interact:
each image behaves as torchvision run on that image alone.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from maskrcnn_jax import models
from maskrcnn_jax.detections import postprocess_detections
from maskrcnn_jax.ops.anchors import DEFAULT_ASPECT_RATIOS, DEFAULT_SIZES, base_anchors
from maskrcnn_jax.ops.roi_align import multilevel_roi_align
from maskrcnn_jax.proposals import generate_proposals

BACKBONES = {
    "resnet18": models.ResNet18,
    "resnet34": models.ResNet34,
    "resnet50": models.ResNet50,
    "resnet101": models.ResNet101,
    "tiny": models.TinyResNet,
}

# FPN levels P2..P6 have strides 2**2 .. 2**6; RoIs pool from P2..P5.
FPN_LEVELS = (2, 3, 4, 5, 6)
ROI_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


def level_anchors_for_image(feature_size, level, padded_size, base):
    """Anchors of one level for one image, as torchvision computes them for that image alone.

    torchvision's strides are `padded // feature` with the image padded to a multiple of 32, so
    on P6 (feature `ceil(padded / 64)`) the stride is not always 64 (e.g. 800 // 13 = 61). The
    canvas grid is larger than that image's grid; positions beyond it are marked invalid.

    Args:
      feature_size: static `(h, w)` of this level on the canvas.
      level: static FPN level k (stride 2**k on the canvas).
      padded_size: `(2,)` int32 traced `(height, width)` of the image padded to 32.
      base: `(A, 4)` float32 zero-centred cell anchors (`ops.anchors.base_anchors`).

    Returns:
      anchors `(h * w * A, 4)` float32 `(x1, y1, x2, y2)` and valid `(h * w * A,)` bool, in
      torchvision's order (y, x, anchor).
    """
    h, w = feature_size
    size_h = -(-padded_size[0] // 2**level)  # ceil: torchvision's feature size on this level
    size_w = -(-padded_size[1] // 2**level)
    stride_h, stride_w = padded_size[0] // size_h, padded_size[1] // size_w
    ys, xs = jnp.arange(h, dtype=jnp.int32), jnp.arange(w, dtype=jnp.int32)
    shift_y = jnp.broadcast_to((ys * stride_h)[:, None], (h, w)).astype(jnp.float32)
    shift_x = jnp.broadcast_to((xs * stride_w)[None, :], (h, w)).astype(jnp.float32)
    shifts = jnp.stack([shift_x, shift_y, shift_x, shift_y], axis=-1)  # (h, w, 4)
    anchors = shifts[:, :, None, :] + jnp.asarray(base)[None, None]
    valid = (ys[:, None] < size_h) & (xs[None, :] < size_w)
    valid = jnp.broadcast_to(valid[:, :, None], (h, w, base.shape[0]))
    return anchors.reshape(-1, 4), valid.reshape(-1)


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
        # Configs saved before `frozen_bn_eps` existed ran with torchvision's default 1e-5.
        self.backbone = BACKBONES[cfg.backbone](
            dtype=dtype, norm=cfg.get("backbone_norm", "frozen_bn"),
            frozen_bn_eps=float(cfg.get("frozen_bn_eps", 1e-5)))
        self.fpn = models.FeaturePyramidNetwork(cfg.fpn_channels, dtype=dtype)
        self.rpn_head = models.RPNHead(num_anchors=3, dtype=dtype)
        self.box_head = models.TwoMLPHead(cfg.box_representation_size, dtype=dtype)
        self.box_predictor = models.FastRCNNPredictor(cfg.num_classes, dtype=dtype)
        self.mask_head = models.MaskRCNNHeads(tuple(cfg.mask_head_layers), dtype=dtype)
        self.mask_predictor = models.MaskRCNNPredictor(
            cfg.num_classes, cfg.mask_dim_reduced, dtype=dtype)

    def features(self, images, padded_sizes):
        """FPN levels P2..P6 `(B, h_l, w_l, 256)` of canvas images `(B, H, W, 3)`."""
        height, width = images.shape[1:3]
        pixel_valid = (
            (jnp.arange(height)[None, :, None] < padded_sizes[:, 0, None, None])
            & (jnp.arange(width)[None, None, :] < padded_sizes[:, 1, None, None])
        )
        return self.fpn(self.backbone(images, pixel_valid), pixel_valid)

    def proposals(self, fpn_features, image_sizes, padded_sizes, train: bool = False):
        """RPN head outputs and padded proposals per image (see `generate_proposals`)."""
        cfg = self.config
        objectness, deltas = self.rpn_head(fpn_features)
        base = [base_anchors(s, r) for s, r in zip(DEFAULT_SIZES, DEFAULT_ASPECT_RATIOS)]

        def one_image(obj, dlt, image_size, padded_size):
            anchors, valid = zip(*[
                level_anchors_for_image(f.shape[1:3], level, padded_size, b)
                for f, level, b in zip(fpn_features, FPN_LEVELS, base)
            ])
            return generate_proposals(
                obj, dlt, anchors, valid, image_size,
                pre_nms_top_n=cfg.rpn_pre_nms_top_n_train if train else cfg.rpn_pre_nms_top_n_test,
                post_nms_top_n=cfg.rpn_post_nms_top_n_train if train else cfg.rpn_post_nms_top_n_test,
                nms_thresh=cfg.rpn_nms_thresh, score_thresh=cfg.rpn_score_thresh,
                min_size=cfg.rpn_min_size,
            )

        boxes, scores, valid = jax.vmap(one_image)(objectness, deltas, image_sizes, padded_sizes)
        return {"objectness": objectness, "rpn_deltas": deltas,
                "proposals": boxes, "proposal_scores": scores, "proposal_valid": valid}

    def pool(self, fpn_features, boxes, padded_sizes, output_size):
        """RoIAlign `(B, R, 4)` boxes from P2..P5: `(B, R, oh, ow, 256)` (torchvision's
        `MultiScaleRoIAlign`, sampling ratio 2, each image's own feature extent)."""
        levels = fpn_features[: len(ROI_SCALES)]

        def one_image(feats, image_boxes, padded_size):
            valid_sizes = jnp.stack([-(-padded_size // 2**k) for k in FPN_LEVELS[:len(levels)]])
            return multilevel_roi_align(feats, image_boxes, output_size, ROI_SCALES,
                                        sampling_ratio=2, valid_sizes=valid_sizes)

        return jax.vmap(one_image)(levels, boxes, padded_sizes)

    def box_outputs(self, roi_features):
        """Box head + predictor on `(B, R, 7, 7, C)`: class logits `(B, R, K)`, deltas `(B, R, 4K)`."""
        b, r = roi_features.shape[:2]
        logits, deltas = self.box_predictor(self.box_head(roi_features.reshape(b * r, *roi_features.shape[2:])))
        return logits.reshape(b, r, -1), deltas.reshape(b, r, -1)

    def mask_logits(self, roi_features):
        """Mask head + predictor on `(B, D, 14, 14, C)`: logits `(B, D, 28, 28, K)`."""
        b, d = roi_features.shape[:2]
        logits = self.mask_predictor(self.mask_head(roi_features.reshape(b * d, *roi_features.shape[2:])))
        return logits.reshape(b, d, *logits.shape[1:])

    def __call__(self, images, image_sizes, padded_sizes, return_intermediates: bool = False):
        """Inference on canvas images.

        Args:
          images: `(B, H, W, 3)` float32 normalized images in the canvas, zero-padded.
          image_sizes: `(B, 2)` int32 resized `(height, width)` of each image.
          padded_sizes: `(B, 2)` int32 `image_sizes` rounded up to 32.
          return_intermediates: also return every stage's output (for `maskrcnn_jax.compare`).

        Returns:
          dict with `boxes (B, D, 4)` float32 `(x1, y1, x2, y2)` in resized-image pixels,
          `scores (B, D)`, `labels (B, D)` int32 (1-based), `valid (B, D)` bool and
          `mask_probs (B, D, 28, 28)` float32 for the predicted class; D = detections_per_img,
          padded entries zero.
        """
        cfg = self.config
        fpn_features = self.features(images, padded_sizes)
        rpn = self.proposals(fpn_features, image_sizes, padded_sizes)
        box_features = self.pool(fpn_features, rpn["proposals"], padded_sizes, (7, 7))
        class_logits, box_regression = self.box_outputs(box_features)
        detections = jax.vmap(
            lambda lg, rg, props, valid, size: postprocess_detections(
                lg, rg, props, valid, size,
                bbox_reg_weights=cfg.bbox_reg_weights, score_thresh=cfg.box_score_thresh,
                nms_thresh=cfg.box_nms_thresh, detections_per_img=cfg.box_detections_per_img,
                pre_nms_top_n=cfg.box_pre_nms_top_n,
            )
        )(class_logits, box_regression, rpn["proposals"], rpn["proposal_valid"], image_sizes)
        mask_features = self.pool(fpn_features, detections["boxes"], padded_sizes, (14, 14))
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


def frozen(config) -> ml_collections.FrozenConfigDict:
    """A hashable copy of a model config (Flax module attributes must be hashable for jit)."""
    return ml_collections.FrozenConfigDict(config)


def canvas_feature_sizes(canvas_size):
    """Static `(h, w)` of P2..P6 for a canvas (ceil halving, as the convolutions compute)."""
    return [tuple(int(math.ceil(s / 2**k)) for s in canvas_size) for k in FPN_LEVELS]
