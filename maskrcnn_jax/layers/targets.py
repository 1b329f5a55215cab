"""Training targets of Mask R-CNN with static shapes: RPN anchor targets, sampled RoIs, mask targets.

Reproduces torchvision's `RegionProposalNetwork.assign_targets_to_anchors` (models/detection/rpn.py)
and `RoIHeads.select_training_samples` / `maskrcnn_loss`'s target projection (roi_heads.py) per
image; batch them with `jax.vmap` (one PRNG key per image). Ground truth is padded to a fixed
count G and marked by `gt_valid`; anchors and proposals carry validity masks too. torchvision
drops entries; here every dropped or padded entry stays in place with label -1 (ignored) and is
excluded from sampling and from the losses (`losses.py`).

Boxes are `(x1, y1, x2, y2)` in resized-image pixels throughout.
"""

import math
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops import mask_targets as ops_mask_targets
from maskrcnn_jax.ops.boxes import box_iou, encode_boxes
from maskrcnn_jax.ops.matcher import BELOW_LOW_THRESHOLD, match
from maskrcnn_jax.ops.sampler import sample_balanced, sampled_mask

# A unit box substituted for the reference boxes of entries whose regression target is unused
# (negatives, ignored, padded): encoding against degenerate padded boxes gives inf/NaN, which a
# later `where` hides in the forward pass but not in the gradient.
# A plain tuple: a module-level array would initialise JAX's backend at import, before
# `jax.distributed.initialize` could run.
_UNIT_BOX = (0.0, 0.0, 1.0, 1.0)


def _safe_encode(gt_boxes, reference_boxes, use, weights):
    """`encode_boxes(gt_boxes, reference_boxes, weights)` where `use`, exactly 0 elsewhere."""
    use = use[:, None]
    unit = jnp.asarray(_UNIT_BOX, jnp.float32)
    gt = jnp.where(use, gt_boxes, unit)
    ref = jnp.where(use, reference_boxes, unit)
    return jnp.where(use, encode_boxes(gt, ref, weights), 0.0)


def rpn_targets(
    anchors: jnp.ndarray,
    anchor_valid: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_valid: jnp.ndarray,
    key: jax.Array,
    *,
    batch_size_per_image: int,
    positive_fraction: float,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
) -> Dict[str, jnp.ndarray]:
    """RPN targets of one image: anchor labels, the balanced sample and box-regression targets.

    As torchvision: IoU of valid gt x valid anchors, `Matcher(fg, bg, allow_low_quality_matches
    =True)`; label 1 for matched anchors, 0 below `bg_iou_thresh`, -1 in between; an image without
    valid gt is all background. Then `batch_size_per_image` anchors are sampled (at most
    `positive_fraction` of them positive), and positives get `encode_boxes(gt, anchor)` targets
    with weights (1, 1, 1, 1).

    Args:
      anchors: `(N, 4)` float32 anchors of all levels concatenated (torchvision's order).
      anchor_valid: `(N,)` bool; False for canvas positions outside this image's padded size
        (torchvision has no such anchors): never matched, never sampled.
      gt_boxes: `(G, 4)` float32 ground-truth boxes; padded rows arbitrary.
      gt_valid: `(G,)` bool, False for padded (or crowd) rows.
      key: PRNG key of the sampling.
      batch_size_per_image, positive_fraction: static sampler settings.
      fg_iou_thresh, bg_iou_thresh: static matcher thresholds.

    Returns:
      dict with
        `labels` `(N,)` float32 1 / 0 / -1 (-1 also for invalid anchors),
        `sampled` `(N,)` bool, the anchors in the balanced sample,
        `positive` `(N,)` bool, sampled positives,
        `box_targets` `(N, 4)` float32 deltas, zero except at labelled positives.
    """
    quality = box_iou(gt_boxes, anchors, gt_valid, anchor_valid)
    matched = match(quality, gt_valid, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
    # Invalid anchors can only end below the low threshold (their IoU is -1); they are not anchors
    # of this image at all, so they are ignored rather than background.
    labels = jnp.where(matched >= 0, 1.0, jnp.where(matched == BELOW_LOW_THRESHOLD, 0.0, -1.0))
    labels = jnp.where(anchor_valid, labels, -1.0).astype(jnp.float32)

    indices, is_positive, valid = sample_balanced(
        key, labels.astype(jnp.int32), batch_size_per_image, positive_fraction)
    sampled = sampled_mask(indices, valid, anchors.shape[0])
    positive = sampled_mask(indices, valid & is_positive, anchors.shape[0])

    matched_boxes = gt_boxes[jnp.maximum(matched, 0)]
    box_targets = _safe_encode(matched_boxes, anchors, labels > 0, (1.0, 1.0, 1.0, 1.0))
    return {"labels": labels, "sampled": sampled, "positive": positive, "box_targets": box_targets}


def roi_targets(
    proposals: jnp.ndarray,
    proposal_valid: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_labels: jnp.ndarray,
    gt_valid: jnp.ndarray,
    key: jax.Array,
    *,
    batch_size_per_image: int,
    positive_fraction: float,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    bbox_reg_weights: Sequence[float],
) -> Dict[str, jnp.ndarray]:
    """Sampled RoIs of one image and their targets (`RoIHeads.select_training_samples`).

    As torchvision: the gt boxes are appended to the proposals (padded gt rows appended too, but
    invalid); IoU of valid gt x valid candidates, `Matcher(fg, bg, allow_low_quality_matches=
    False)`; class label of the matched gt, 0 below `bg_iou_thresh`, -1 in between; an image
    without valid gt is all background. `batch_size_per_image` candidates are sampled (at most
    `positive_fraction` positive) and positives get `encode_boxes(gt, roi, bbox_reg_weights)`.

    Args:
      proposals: `(P, 4)` float32 RPN proposals (no gradient flows into targets).
      proposal_valid: `(P,)` bool.
      gt_boxes: `(G, 4)` float32; gt_labels: `(G,)` int32 classes `1..K-1`; gt_valid: `(G,)` bool.
      key: PRNG key of the sampling.
      batch_size_per_image (S), positive_fraction, fg_iou_thresh, bg_iou_thresh,
        bbox_reg_weights: static settings.

    Returns:
      dict of `(S, ...)` arrays, sampled positives first (then negatives, then padding):
        `boxes` `(S, 4)` float32 sampled RoIs (0 where padded),
        `labels` `(S,)` int32 class of positives, 0 for negatives and padding,
        `valid` `(S,)` bool sampled entries, `positive` `(S,)` bool sampled positives,
        `matched_idxs` `(S,)` int32 matched gt row of positives (0 elsewhere),
        `box_targets` `(S, 4)` float32 weighted deltas of positives (0 elsewhere).
    """
    candidates = jnp.concatenate([proposals.astype(jnp.float32), gt_boxes.astype(jnp.float32)])
    candidate_valid = jnp.concatenate([proposal_valid, gt_valid])
    quality = box_iou(gt_boxes, candidates, gt_valid, candidate_valid)
    matched = match(quality, gt_valid, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
    clamped = jnp.maximum(matched, 0)
    labels = jnp.where(matched >= 0, gt_labels[clamped].astype(jnp.int32),
                       jnp.where(matched == BELOW_LOW_THRESHOLD, 0, -1))
    labels = jnp.where(candidate_valid, labels, -1)

    indices, is_positive, valid = sample_balanced(key, labels, batch_size_per_image, positive_fraction)
    boxes = jnp.where(valid[:, None], candidates[indices], 0.0)
    sampled_labels = jnp.where(valid, labels[indices], 0)
    matched_idxs = jnp.where(is_positive, clamped[indices], 0)
    box_targets = _safe_encode(gt_boxes[matched_idxs], boxes, is_positive, tuple(bbox_reg_weights))
    return {"boxes": boxes, "labels": sampled_labels, "valid": valid, "positive": is_positive,
            "matched_idxs": matched_idxs.astype(jnp.int32), "box_targets": box_targets}


def edge_extend_masks(masks: jnp.ndarray, image_size) -> jnp.ndarray:
    """Replicate each mask's last row/column of the image over the canvas beyond it.

    Why: torchvision projects gt masks of the resized image's own size `(h, w)`; RoIAlign clamps
    samples in `(h - 1, h]` to row `h - 1`. On a zero-padded canvas the same samples would blend
    with zeros. Replicating the border makes the canvas-sized mask give torchvision's values for
    every RoI inside the image (proposals are clipped to it).

    Args:
      masks: `(G, H, W)` canvas-sized masks of one image (any dtype).
      image_size: `(2,)` int32 `(h, w)` of the resized image (traced).

    Returns:
      `(G, H, W)` masks of the same dtype, `masks[:, min(y, h-1), min(x, w-1)]`.
    """
    height, width = masks.shape[1:]
    rows = jnp.minimum(jnp.arange(height), image_size[0] - 1)
    cols = jnp.minimum(jnp.arange(width), image_size[1] - 1)
    return masks[:, rows][:, :, cols]


def positive_rois(targets: Dict[str, jnp.ndarray], num_rois: int) -> Dict[str, jnp.ndarray]:
    """The first `num_rois` slots of `roi_targets`' sample: the positives (the mask head's RoIs).

    `sample_balanced` puts the positives first, at most `int(S * positive_fraction)` of them, so
    `num_rois` equal to that bound keeps every positive (torchvision's `labels > 0`).

    Returns:
      dict with `boxes (D, 4)`, `labels (D,)` int32, `matched_idxs (D,)` int32, `valid (D,)`
      bool (True for positives), D = `num_rois` (static).
    """
    d = min(num_rois, targets["boxes"].shape[0])
    out = {
        "boxes": targets["boxes"][:d],
        "labels": targets["labels"][:d],
        "matched_idxs": targets["matched_idxs"][:d],
        "valid": targets["positive"][:d],
    }
    if d < num_rois:  # more mask slots than sampled RoIs: pad with invalid entries
        pad = num_rois - d
        out = {k: jnp.pad(v, ((0, pad),) + ((0, 0),) * (v.ndim - 1)) for k, v in out.items()}
    return out


def pack_positive_rois(rois: Dict[str, jnp.ndarray], mask_targets: jnp.ndarray,
                       num_rois: int, key: jax.Array):
    """The valid entries of a group of images' `positive_rois` (and their `mask_targets`) in
    `num_rois` slots: one mask-head budget shared by the group instead of one per image.

    While the group's positives fit, all are kept (torchvision's mask loss: the mean over every
    positive). Beyond the budget, `num_rois` of them are drawn uniformly without replacement
    from the whole group: every positive is kept with the same probability, whichever image
    it belongs to. Kept entries stay in image order.

    Args:
      rois: `positive_rois` stacked over the group's g images: `(g, D)` leading axes.
      mask_targets: `(g, D, M, M)`.
      num_rois: static N.
      key: PRNG key of the draw (used only when the positives exceed N).

    Returns:
      (rois with an `(N,)` leading axis, mask targets `(N, M, M)`, the index `(N,)` int32 of
      each slot's image within the group). Slots beyond the positives are invalid.
    """
    rois = {k: jnp.asarray(v) for k, v in rois.items()}
    mask_targets = jnp.asarray(mask_targets)
    g, d = rois["valid"].shape
    flat_valid = rois["valid"].reshape(g * d)
    if num_rois >= g * d:  # the budget holds every slot: keep all, pad with invalid ones
        chosen = jnp.pad(jnp.arange(g * d), (0, num_rois - g * d))
        keep = jnp.arange(num_rois) < g * d
    else:
        # Each valid entry gets a random priority in [0, 1), invalid ones 2: the N smallest are
        # a uniform sample of the positives (or all of them, when at most N), put back in order.
        priority = jnp.where(flat_valid, jax.random.uniform(key, (g * d,)), 2.0)
        chosen = jnp.sort(jnp.argsort(priority)[:num_rois])
        keep = jnp.ones(num_rois, bool)
    packed = {k: v.reshape(g * d, *v.shape[2:])[chosen] for k, v in rois.items()}
    packed["valid"] = packed["valid"] & keep
    targets = mask_targets.reshape(g * d, *mask_targets.shape[2:])[chosen]
    return packed, targets, (chosen // d).astype(jnp.int32)


def mask_targets(
    gt_masks: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    rois: Dict[str, jnp.ndarray],
    image_size: jnp.ndarray,
    mask_size: int,
    cropped: bool,
    max_sampling_grid: Optional[int] = None,
) -> jnp.ndarray:
    """`(D, M, M)` float32 mask targets of one image's positive RoIs (`positive_rois`).

    Full-resolution masks are projected exactly as torchvision's `project_masks_on_boxes`
    (RoIAlign with spatial scale 1, adaptive sampling grid, aligned=False); pipeline crops
    (each gt mask resampled onto its own box) are projected with `project_cropped_masks_on_boxes`.

    Args:
      gt_masks: `(G, H, W)` canvas-sized masks (0/1, any dtype) or `(G, S, S)` crops.
      gt_boxes: `(G, 4)` float32 gt boxes (the crops' boxes).
      rois: `positive_rois(...)` of this image.
      image_size: `(2,)` int32 resized image `(h, w)` (full-resolution path only).
      mask_size: static M (28).
      cropped: static; True for crops.
      max_sampling_grid: static bound of the adaptive RoIAlign grid on full-resolution masks;
        default `ceil(max(H, W) / M)`, exact for every RoI inside the canvas.

    Returns:
      `(D, M, M)` float32 targets, 0 for invalid rows.
    """
    gt_masks, gt_boxes = jnp.asarray(gt_masks), jnp.asarray(gt_boxes, jnp.float32)
    rois = {k: jnp.asarray(v) for k, v in rois.items()}
    matched = rois["matched_idxs"]
    if cropped:
        targets = ops_mask_targets.project_cropped_masks_on_boxes(
            gt_masks.astype(jnp.float32), gt_boxes, rois["boxes"], matched, mask_size)
    else:
        if max_sampling_grid is None:
            max_sampling_grid = int(math.ceil(max(gt_masks.shape[1:]) / mask_size))
        masks = edge_extend_masks(gt_masks, image_size).astype(jnp.float32)
        targets = ops_mask_targets.project_masks_on_boxes(
            masks, rois["boxes"], matched, mask_size, max_sampling_grid)
    return jnp.where(rois["valid"][:, None, None], targets, 0.0)
