"""Box arithmetic matching torchvision's float32 results: area, IoU, clipping, size filter, coding.

All boxes are `(x1, y1, x2, y2)` in absolute pixels. Every function is a plain `jnp` function with
static shapes, usable under `jax.jit` and `jax.vmap`. The arithmetic follows torchvision's
operation order (torchvision/ops/boxes.py and models/detection/_utils.py `BoxCoder`) so float32
results agree with torchvision up to the last bit wherever XLA and ATen round the same way.
"""

import math
from typing import Optional, Sequence, Tuple

import jax.numpy as jnp

# torchvision's default clamp for the log-size deltas before exp(): log(1000 / 16).
DEFAULT_BBOX_XFORM_CLIP = math.log(1000.0 / 16)

# IoU given to pairs involving a padded box: below any threshold and below any real IoU (>= 0),
# so padded entries never match and never become a low-quality maximum.
PADDED_IOU = -1.0


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
    """Area `(x2 - x1) * (y2 - y1)` of each box, as `torchvision.ops.box_area`.

    Args:
      boxes: `(..., 4)` float boxes `(x1, y1, x2, y2)`.

    Returns:
      `(...)` areas, same dtype. Not clamped: inverted boxes (x2 < x1 xor y2 < y1) give negative
      areas, exactly as torchvision.
    """
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(
    boxes1: jnp.ndarray,
    boxes2: jnp.ndarray,
    valid1: Optional[jnp.ndarray] = None,
    valid2: Optional[jnp.ndarray] = None,
) -> jnp.ndarray:
    """Pairwise IoU with torchvision's `box_iou` arithmetic, padded pairs set to -1.

    Computes `inter / (area1[:, None] + area2[None, :] - inter)` with the intersection
    width/height clamped at 0 (so 0/0 for two empty boxes gives NaN, as torchvision).

    Args:
      boxes1: `(N, 4)` float boxes `(x1, y1, x2, y2)`; N may be 0.
      boxes2: `(M, 4)` float boxes; M may be 0.
      valid1: optional `(N,)` bool, False marks padded rows of `boxes1`.
      valid2: optional `(M,)` bool, False marks padded rows of `boxes2`.

    Returns:
      `(N, M)` IoU in the boxes' dtype; `-1.0` wherever either box of the pair is padded.
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = jnp.maximum(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    iou = inter / union
    if valid1 is None and valid2 is None:
        return iou
    pair_valid = jnp.ones(iou.shape, dtype=bool)
    if valid1 is not None:
        pair_valid = pair_valid & valid1[:, None]
    if valid2 is not None:
        pair_valid = pair_valid & valid2[None, :]
    return jnp.where(pair_valid, iou, jnp.asarray(PADDED_IOU, iou.dtype))


def clip_boxes(boxes: jnp.ndarray, image_size: Tuple) -> jnp.ndarray:
    """Clamp boxes into `[0, width] x [0, height]`, as `torchvision.ops.clip_boxes_to_image`.

    Args:
      boxes: `(..., 4)` float boxes `(x1, y1, x2, y2)`.
      image_size: `(height, width)`; Python numbers or traced scalars (the true image size inside
        a fixed padded canvas varies per image under jit/vmap).

    Returns:
      `(..., 4)` clipped boxes, same dtype.
    """
    height, width = image_size
    dtype = boxes.dtype
    height = jnp.asarray(height).astype(dtype)
    width = jnp.asarray(width).astype(dtype)
    zero = jnp.zeros((), dtype)
    # torch's clamp(min, max) is max-then-min, like jnp.clip; same order per coordinate.
    xs = jnp.minimum(jnp.maximum(boxes[..., 0::2], zero), width)
    ys = jnp.minimum(jnp.maximum(boxes[..., 1::2], zero), height)
    return jnp.stack((xs, ys), axis=-1).reshape(boxes.shape)


def small_box_mask(boxes: jnp.ndarray, min_size: float) -> jnp.ndarray:
    """Keep-mask of boxes whose both sides are `>= min_size` (torchvision `remove_small_boxes`).

    torchvision returns the kept indices; a mask keeps shapes static.

    Args:
      boxes: `(..., 4)` float boxes `(x1, y1, x2, y2)`.
      min_size: minimum side length (Python float or traced scalar).

    Returns:
      `(...)` bool, True where the box is kept.
    """
    ws = boxes[..., 2] - boxes[..., 0]
    hs = boxes[..., 3] - boxes[..., 1]
    return (ws >= min_size) & (hs >= min_size)


def encode_boxes(
    reference_boxes: jnp.ndarray,
    proposals: jnp.ndarray,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> jnp.ndarray:
    """Regression targets of `reference_boxes` relative to `proposals` (`BoxCoder.encode_single`).

    Args:
      reference_boxes: `(N, 4)` float target (ground-truth) boxes `(x1, y1, x2, y2)`.
      proposals: `(N, 4)` float boxes the targets are relative to (anchors / proposals).
      weights: `(wx, wy, ww, wh)` Python floats scaling `(dx, dy, dw, dh)`.

    Returns:
      `(N, 4)` deltas `(dx, dy, dw, dh)`, dtype of `reference_boxes`. Degenerate proposals give
      inf/NaN exactly as torchvision (callers only encode valid pairs).
    """
    dtype = reference_boxes.dtype
    # torchvision casts the weights to the boxes' dtype before multiplying.
    wx, wy, ww, wh = (jnp.asarray(w, dtype) for w in weights)
    proposals = proposals.astype(dtype)

    ex_widths = proposals[:, 2] - proposals[:, 0]
    ex_heights = proposals[:, 3] - proposals[:, 1]
    ex_ctr_x = proposals[:, 0] + 0.5 * ex_widths
    ex_ctr_y = proposals[:, 1] + 0.5 * ex_heights

    gt_widths = reference_boxes[:, 2] - reference_boxes[:, 0]
    gt_heights = reference_boxes[:, 3] - reference_boxes[:, 1]
    gt_ctr_x = reference_boxes[:, 0] + 0.5 * gt_widths
    gt_ctr_y = reference_boxes[:, 1] + 0.5 * gt_heights

    # Same association as torchvision: (w * diff) / size, w * log(ratio).
    targets_dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
    targets_dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
    targets_dw = ww * jnp.log(gt_widths / ex_widths)
    targets_dh = wh * jnp.log(gt_heights / ex_heights)
    return jnp.stack((targets_dx, targets_dy, targets_dw, targets_dh), axis=1)


def decode_boxes(
    deltas: jnp.ndarray,
    boxes: jnp.ndarray,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP,
) -> jnp.ndarray:
    """Apply regression deltas to boxes (`BoxCoder.decode_single`).

    Args:
      deltas: `(N, 4*K)` float deltas `(dx, dy, dw, dh)` per class (class-specific box predictor
        output), or `(N, 4)`.
      boxes: `(N, 4)` reference boxes `(x1, y1, x2, y2)` (anchors or proposals); cast to the
        deltas' dtype as torchvision does.
      weights: `(wx, wy, ww, wh)` Python floats the deltas are divided by.
      bbox_xform_clip: upper clamp of `dw, dh` (after the weights) before `exp`.

    Returns:
      `(N, K, 4)` decoded boxes for `(N, 4*K)` deltas with K > 1; `(N, 4)` for `(N, 4)` deltas.
    """
    n, four_k = deltas.shape
    if four_k % 4:
        raise ValueError(f"deltas must have 4*K columns, got {four_k}")
    k = four_k // 4
    boxes = boxes.astype(deltas.dtype)
    codes = deltas.reshape(n, k, 4)

    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights

    wx, wy, ww, wh = weights
    dx = codes[..., 0] / wx
    dy = codes[..., 1] / wy
    dw = codes[..., 2] / ww
    dh = codes[..., 3] / wh

    # Prevent sending too large values into exp() (torch.clamp(max=...) keeps NaN).
    dw = jnp.minimum(dw, bbox_xform_clip)
    dh = jnp.minimum(dh, bbox_xform_clip)

    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = jnp.exp(dw) * widths[:, None]
    pred_h = jnp.exp(dh) * heights[:, None]

    # Distance from centre to corner, computed as torchvision's `c_to_c_*`.
    c_to_c_h = 0.5 * pred_h
    c_to_c_w = 0.5 * pred_w

    pred = jnp.stack(
        (pred_ctr_x - c_to_c_w, pred_ctr_y - c_to_c_h, pred_ctr_x + c_to_c_w, pred_ctr_y + c_to_c_h),
        axis=-1,
    )
    if four_k == 4:
        return pred[:, 0, :]
    return pred
