"""Paste per-detection `M x M` mask probabilities into the image, like torchvision.

torchvision's `paste_masks_in_image` (models/detection/roi_heads.py) loops over detections:
it pads every mask with `padding` zeros on each side, expands the box by
`scale = (M + 2 * padding) / M` about its centre (`expand_boxes`, float32), truncates the
expanded box to integers (`.to(torch.int64)`), resizes the padded mask to the integer box
size `(h, w) = (max(y2 - y1 + 1, 1), max(x2 - x1 + 1, 1))` with
`F.interpolate(mode="bilinear", align_corners=False)`, and copies the part of it that lies
inside the image to rows y1..y2, columns x1..x2.

Here every output pixel of every mask is computed at once with static shapes: a pixel is
nonzero only if it lies inside its mask's integer box (and the image), and its value is the
bilinear sample of the padded mask at the source coordinate torch's resize uses for that
pixel (`resize.bilinear_source_index`, `resize.bilinear_combine`), including which of torch's
two CPU kernels (and so which float32 operation order) torch runs for that box size.

The pixels are computed by a compiled loop over masks (`lax.map`, each step a whole
(Hc, Wc) image, no Python loop): it keeps XLA from fusing the small per-row / per-column
tables into, and recomputing them for, every output pixel.

Boxes torchvision cannot paste (ones lying entirely below or to the right of the image make
its slicing fail) simply give all-zero masks here.
"""

import functools

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops.resize import (
    CHANNELS_LAST_MAX_OUTPUT_SUM,
    bilinear_combine,
    bilinear_source_index,
)


def expand_boxes(boxes, scale):
    """torchvision's `expand_boxes`: scale boxes about their centres, in float32.

    Args:
      boxes: (N, 4) float32 `(x1, y1, x2, y2)` boxes in absolute pixels.
      scale: Python float; like torch's `tensor *= float`, it is applied as a float32.

    Returns:
      (N, 4) float32 expanded boxes, bit-identical to torchvision's.
    """
    boxes = boxes.astype(jnp.float32)
    scale = jnp.float32(scale)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    w_half = (x2 - x1) * jnp.float32(0.5) * scale
    h_half = (y2 - y1) * jnp.float32(0.5) * scale
    # torch rounds `w_half * scale` before the sum. XLA contracts `p * q + r * s` into an FMA
    # of the left product, so the centre, whose product by 0.5 is exact, must come first:
    # fusing it changes nothing, fusing `w_half` would change the rounding.
    x_c = (x2 + x1) * jnp.float32(0.5)
    y_c = (y2 + y1) * jnp.float32(0.5)
    return jnp.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)


def expand_boxes_to_int(boxes, mask_size, padding=1):
    """torchvision's `expand_boxes(boxes, (M + 2p) / M).to(torch.int64)` (int32 here).

    Args:
      boxes: (N, 4) float32 `(x1, y1, x2, y2)` boxes in absolute pixels.
      mask_size: static Python int M.
      padding: static Python int p.

    Returns:
      (N, 4) int32 expanded boxes, truncated toward zero like torch's cast.
    """
    return expand_boxes(boxes, (mask_size + 2 * padding) / mask_size).astype(jnp.int32)


def _axis_samples(pixels, box_lo, box_hi, limit, in_size):
    """Per-mask source indices/weights and validity along one image axis.

    Args:
      pixels: (P,) int32 image coordinates along the axis.
      box_lo, box_hi: (N,) int32 integer box bounds (inclusive) along the axis.
      limit: int32 scalar, the image extent along the axis (pixels >= limit are outside).
      in_size: Python int, padded mask size M + 2p.

    Returns:
      (i0, i1, lambda0, lambda1, valid, out_size): (N, P) arrays, then the (N,) int32 resized
      mask size along the axis (torchvision's `max(box_hi - box_lo + 1, 1)`).
    """
    out_size = jnp.maximum(box_hi - box_lo + 1, 1)[:, None]
    dst = pixels[None, :] - box_lo[:, None]
    valid = (dst >= 0) & (pixels[None, :] <= box_hi[:, None]) & (pixels[None, :] < limit)
    # Clamp so that masked-out pixels still produce in-range gather indices.
    dst = jnp.clip(dst, 0, out_size - 1)
    i0, i1, lambda0, lambda1 = bilinear_source_index(dst, in_size, out_size)
    return i0, i1, lambda0, lambda1, valid, out_size[:, 0]


@functools.partial(jax.jit, static_argnames=("canvas_size", "padding"))
def paste_masks_into_canvas(masks, boxes, image_size, canvas_size, padding=1):
    """Paste masks into an image whose (traced) size fits a static canvas.

    The Predictor pastes into each original image size; with a static canvas (e.g. the
    largest expected image) and the actual size traced, all images share one compilation.

    Args:
      masks: (N, M, M) float32 mask probabilities (N may be 0).
      boxes: (N, 4) float32 `(x1, y1, x2, y2)` boxes in absolute pixels of the image.
      image_size: (im_h, im_w) int32 array or ints, the image size, <= canvas_size.
      canvas_size: static (Hc, Wc) Python ints.
      padding: static Python int, zero padding added around each mask (torchvision: 1).

    Returns:
      (N, Hc, Wc) float32: in the top-left (im_h, im_w) region, exactly
      `torchvision.models.detection.roi_heads.paste_masks_in_image(masks[:, None], boxes,
      (im_h, im_w), padding)[:, 0]`; 0 elsewhere.
    """
    canvas_h, canvas_w = (int(s) for s in canvas_size)
    num_masks, mask_size = masks.shape[0], masks.shape[-1]
    if num_masks == 0:
        return jnp.zeros((0, canvas_h, canvas_w), jnp.float32)
    in_size = mask_size + 2 * padding
    image_size = jnp.asarray(image_size, jnp.int32)
    padded = jnp.pad(masks.astype(jnp.float32), ((0, 0), (padding, padding), (padding, padding)))
    int_boxes = expand_boxes_to_int(boxes, mask_size, padding)

    rows = jnp.arange(canvas_h, dtype=jnp.int32)
    cols = jnp.arange(canvas_w, dtype=jnp.int32)
    h0, h1, hl0, hl1, row_valid, out_h = _axis_samples(
        rows, int_boxes[:, 1], int_boxes[:, 3], image_size[0], in_size)
    w0, w1, wl0, wl1, col_valid, out_w = _axis_samples(
        cols, int_boxes[:, 0], int_boxes[:, 2], image_size[1], in_size)

    # Columns first, on the small padded masks: (N, M+2p, Wc) each.
    left = jnp.take_along_axis(padded, w0[:, None, :], axis=2)
    right = jnp.take_along_axis(padded, w1[:, None, :], axis=2)
    # torch resizes small boxes with its channels-last kernel, large ones with the generic one.
    channels_last = out_h + out_w <= CHANNELS_LAST_MAX_OUTPUT_SUM

    def paste_one(per_mask):
        (left, right, h0, h1, hl0, hl1, wl0, wl1, row_valid, col_valid, channels_last) = per_mask
        a, b = left[h0], right[h0]
        c, d = left[h1], right[h1]
        values = bilinear_combine(a, b, c, d, hl0[:, None], hl1[:, None], wl0[None, :],
                                  wl1[None, :], channels_last)
        inside = row_valid[:, None] & col_valid[None, :]
        return jnp.where(inside, values, jnp.float32(0.0))

    # A loop over masks (not one (N, Hc, Wc) expression): loop inputs are materialized, so the
    # per-row / per-column tables above are computed once instead of being fused into, and
    # recomputed for, every output pixel (measured about 10x slower).
    return jax.lax.map(paste_one, (left, right, h0, h1, hl0, hl1, wl0, wl1, row_valid,
                                   col_valid, channels_last))


@functools.partial(jax.jit, static_argnames=("image_size", "padding"))
def paste_masks_in_image(masks, boxes, image_size, padding=1):
    """torchvision's `paste_masks_in_image`, vectorized over masks.

    Args:
      masks: (N, M, M) float32 mask probabilities (N may be 0).
      boxes: (N, 4) float32 `(x1, y1, x2, y2)` boxes in absolute pixels of the image.
      image_size: static (H, W) Python ints.
      padding: static Python int, zero padding added around each mask (torchvision: 1).

    Returns:
      (N, H, W) float32 pasted masks (torchvision returns them as (N, 1, H, W)).
    """
    height, width = (int(s) for s in image_size)
    return paste_masks_into_canvas(masks, boxes, (height, width), (height, width), padding)
