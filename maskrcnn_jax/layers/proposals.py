"""RPN proposal generation with fixed shapes (torchvision's `RegionProposalNetwork.filter_proposals`).

Weightless: takes the RPN head's per-level outputs for one image and returns a padded, fixed-size
set of proposals. Batch with `jax.vmap`.
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops.boxes import clip_boxes, decode_boxes, small_box_mask
from maskrcnn_jax.ops.nms import batched_nms_padded


def generate_proposals(
    objectness: Sequence[jnp.ndarray],
    deltas: Sequence[jnp.ndarray],
    anchors: Sequence[jnp.ndarray],
    anchor_valid: Sequence[jnp.ndarray],
    image_size: tuple,
    *,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    score_thresh: float = 0.0,
    min_size: float = 1e-3,
):
    """Proposals of one image, as torchvision's RPN in eval (or train) mode.

    Per level: the `min(pre_nms_top_n, anchors)` highest objectness logits among valid anchors;
    decode (weights 1,1,1,1), clip to the image, drop boxes smaller than `min_size` and scores
    below `score_thresh` (as masks), NMS per level at `nms_thresh`, keep the best
    `post_nms_top_n` overall in decreasing score order.

    Args:
      objectness: per level `(N_l,)` float logits in anchor order.
      deltas: per level `(N_l, 4)` float box deltas.
      anchors: per level `(N_l, 4)` float32 anchors `(x1, y1, x2, y2)` on the padded canvas.
      anchor_valid: per level `(N_l,)` bool, False for anchors outside the region torchvision
        would have (the image padded to a multiple of 32); they are never selected.
      image_size: `(height, width)` of the resized image (traced scalars), for clipping.
      pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh, min_size: torchvision's RPN
        settings (static).

    Returns:
      boxes: `(post_nms_top_n, 4)` float32 proposals `(x1, y1, x2, y2)`, decreasing score,
        padded with zeros.
      scores: `(post_nms_top_n,)` float32 objectness probabilities, 0 where padded.
      valid: `(post_nms_top_n,)` bool.
    """
    cand_logits, cand_deltas, cand_anchors, cand_valid, cand_level = [], [], [], [], []
    for level, (logits, level_deltas, level_anchors, valid) in enumerate(
        zip(objectness, deltas, anchors, anchor_valid)
    ):
        k = min(pre_nms_top_n, logits.shape[0])
        masked = jnp.where(valid, logits.astype(jnp.float32), -jnp.inf)
        _, idx = jax.lax.top_k(masked, k)
        cand_logits.append(logits[idx].astype(jnp.float32))
        cand_deltas.append(level_deltas[idx].astype(jnp.float32))
        cand_anchors.append(jnp.asarray(level_anchors)[idx])
        cand_valid.append(valid[idx])
        cand_level.append(jnp.full((k,), level, jnp.int32))
    logits = jnp.concatenate(cand_logits)
    boxes = decode_boxes(jnp.concatenate(cand_deltas), jnp.concatenate(cand_anchors))
    boxes = clip_boxes(boxes, image_size)
    scores = jax.nn.sigmoid(logits)
    keep = jnp.concatenate(cand_valid) & small_box_mask(boxes, min_size) & (scores >= score_thresh)
    idx, _ = batched_nms_padded(
        boxes, scores, jnp.concatenate(cand_level), keep, nms_thresh, post_nms_top_n
    )
    valid = idx >= 0
    safe = jnp.where(valid, idx, 0)
    boxes = jnp.where(valid[:, None], boxes[safe], 0.0)
    scores = jnp.where(valid, scores[safe], 0.0)
    return boxes, scores, valid
