"""Final detections with fixed shapes (torchvision's `RoIHeads.postprocess_detections`).

Weightless: class scores and class-specific box deltas of the box predictor for one image's
proposals in, padded detections out. Batch with `jax.vmap`.
"""

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops.boxes import clip_boxes, decode_boxes, small_box_mask
from maskrcnn_jax.ops.nms import batched_nms_padded


def postprocess_detections(
    class_logits: jnp.ndarray,
    box_regression: jnp.ndarray,
    proposals: jnp.ndarray,
    proposal_valid: jnp.ndarray,
    image_size: tuple,
    *,
    bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    pre_nms_top_n: int = 5000,
):
    """Detections of one image, as torchvision's `postprocess_detections`.

    Softmax over classes, class-specific decode, clip to the image, drop the background class,
    every (proposal, class) pair a candidate; keep scores `> score_thresh` and boxes of at least
    1e-2 px; per-class NMS; the best `detections_per_img` in decreasing score order.
    Static-shape difference: NMS runs on the `pre_nms_top_n` best candidates (torchvision: all of
    them); it matters only if more than that many pairs pass the score threshold.

    Args:
      class_logits: `(P, C)` float logits, class 0 is background.
      box_regression: `(P, 4 * C)` float class-specific deltas.
      proposals: `(P, 4)` float32 boxes `(x1, y1, x2, y2)`.
      proposal_valid: `(P,)` bool, False for padded proposals.
      image_size: `(height, width)` of the resized image (traced scalars), for clipping.

    Returns:
      dict with `boxes (D, 4)` float32, `scores (D,)` float32, `labels (D,)` int32 (1-based),
      `valid (D,)` bool, D = `detections_per_img`; padded entries are zero.
    """
    num_classes = class_logits.shape[-1]
    boxes = decode_boxes(box_regression.astype(jnp.float32), proposals, bbox_reg_weights)
    boxes = clip_boxes(boxes, image_size)[:, 1:]  # (P, C-1, 4), background dropped
    scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, 1:]
    labels = jnp.broadcast_to(jnp.arange(1, num_classes, dtype=jnp.int32), scores.shape)

    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    valid = (
        jnp.repeat(proposal_valid, num_classes - 1)
        & (scores > score_thresh)
        & small_box_mask(boxes, 1e-2)
    )
    k = min(pre_nms_top_n, scores.shape[0])
    _, top = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), k)
    boxes, scores, labels, valid = boxes[top], scores[top], labels[top], valid[top]

    idx, _ = batched_nms_padded(boxes, scores, labels, valid, nms_thresh, detections_per_img)
    keep = idx >= 0
    safe = jnp.where(keep, idx, 0)
    return {
        "boxes": jnp.where(keep[:, None], boxes[safe], 0.0),
        "scores": jnp.where(keep, scores[safe], 0.0),
        "labels": jnp.where(keep, labels[safe], 0),
        "valid": keep,
    }
