"""Large-scale jitter (LSJ): the training augmentation of torchvision's `maskrcnn_resnet50_fpn_v2`
recipe, detectron2's LSJ baselines and the TPU Mask R-CNN configs.

torchvision's reference recipe (`references/detection/presets.py`, `--data-augmentation lsj`,
PIL backend) applies to each training image, in order:
  1. `transforms.v2.ScaleJitter(target_size=(S, S), scale_range=(0.1, 2.0))`: a scale drawn
     uniformly in the range, `r = min(S / h, S / w) * scale`, the image resized to
     `(int(h * r), int(w * r))` with antialiased bilinear interpolation (PIL's), boxes
     multiplied by `new / old` size (ratios in double, applied in float32), masks resized with
     torch's `nearest` rule;
  2. `references/detection/transforms.FixedSizeCrop(size=(S, S), fill=mean)`: where the image
     is larger than S, a crop at `top = int((h - S) * u)`, `left = int((w - S) * u)` with ONE
     uniform draw `u` for both axes; boxes shifted and clamped to the crop, boxes that become
     empty dropped with their masks; then padding on the bottom and right to S x S with the
     fill colour (123, 117, 104) for the image and 0 for the masks;
  3. `transforms.v2.RandomHorizontalFlip(0.5)` of the S x S result (padding included).
Its model is built with `_skip_resize=True`: in training the S x S image goes in as it is (its
size is the image size, the padding part of the image), while evaluation resizes as usual
(min_size / max_size). So the batch-norm statistics of a training batch cover the whole S x S
canvas, padding colour included, exactly as ours do.

Here the image operations are those of the PIL backend (the recipe's default), the box
arithmetic is torchvision's, and the masks are never materialised at S x S: `mask_maps` gives,
for every output row and column, the source pixel (or an all-zero one for padding), which
`mask_crops.crop_resized_masks` reads when it crops each mask onto its box.
"""

import dataclasses
from typing import Tuple

import numpy as np
from PIL import Image

from maskrcnn_jax.ops.interpolate import nearest_indices


@dataclasses.dataclass(frozen=True)
class LargeScaleJitter:
    """LSJ settings: output `size` x `size`, scale range, the image's padding colour (RGB)."""

    size: int = 1024
    scale_range: Tuple[float, float] = (0.1, 2.0)
    fill: Tuple[int, int, int] = (123, 117, 104)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where an image of `(h, w)` lands: resized to `resized`, crop `(top, left)` of
    `cropped = (ch, cw)` pixels, padded to `size`, then flipped or not."""

    original: Tuple[int, int]
    resized: Tuple[int, int]
    top: int
    left: int
    cropped: Tuple[int, int]
    size: int
    flip: bool


def draw_scale(jitter: "LargeScaleJitter", uniform: float) -> np.float32:
    """ScaleJitter's scale for a uniform draw in [0, 1), in its float32 arithmetic."""
    low, high = jitter.scale_range
    return np.float32(low) + np.float32(uniform) * np.float32(high - low)


def geometry(height: int, width: int, lsj: LargeScaleJitter, scale: float, crop_draw: float,
             flip: bool) -> Geometry:
    """The LSJ geometry of a `height x width` image for the draws `scale` (`draw_scale`),
    `crop_draw` (uniform in [0, 1)) and `flip`."""
    s = lsj.size
    # ScaleJitter (target_size (S, S)): its scale and ratio are float32 tensors.
    r = np.float32(min(s / height, s / width)) * np.float32(scale)
    new_h, new_w = int(np.float32(height) * r), int(np.float32(width) * r)
    if new_h < 1 or new_w < 1:
        raise ValueError(f"size {height}x{width} at LSJ scale {scale:.3f} resizes to "
                         f"{new_h}x{new_w}: a side of 0 pixels")
    crop_h, crop_w = min(new_h, s), min(new_w, s)  # FixedSizeCrop
    u = np.float32(crop_draw)  # one float32 draw for both axes
    top, left = int(np.float32(max(new_h - s, 0)) * u), int(np.float32(max(new_w - s, 0)) * u)
    return Geometry((height, width), (new_h, new_w), top, left, (crop_h, crop_w), s, flip)


def transform_image(image: np.ndarray, g: Geometry, fill) -> np.ndarray:
    """uint8 `(h, w, 3)` -> the `(S, S, 3)` uint8 LSJ image (PIL's antialiased bilinear
    resize, crop, padding with `fill`, flip)."""
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(
        (g.resized[1], g.resized[0]), Image.BILINEAR))
    out = np.empty((g.size, g.size, 3), np.uint8)
    out[...] = np.asarray(fill, np.uint8)
    ch, cw = g.cropped
    out[:ch, :cw] = resized[g.top:g.top + ch, g.left:g.left + cw]
    return out[:, ::-1] if g.flip else out


def transform_boxes(boxes: np.ndarray, g: Geometry) -> Tuple[np.ndarray, np.ndarray]:
    """`(N, 4)` float32 xyxy boxes in original pixels -> (their LSJ boxes in the S x S image,
    `(N,)` bool kept: non-empty after the crop's clamping)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    h, w = g.original
    # ScaleJitter: python-float ratios as a float32 tensor, multiplied in float32.
    ratios = np.asarray([g.resized[1] / w, g.resized[0] / h] * 2, np.float32)
    boxes = boxes * ratios
    # FixedSizeCrop: shift, clamp to the crop, drop the empty ones.
    boxes = boxes - np.asarray([g.left, g.top, g.left, g.top], np.float32)
    ch, cw = g.cropped
    boxes = np.stack([np.clip(boxes[:, 0], 0, cw), np.clip(boxes[:, 1], 0, ch),
                      np.clip(boxes[:, 2], 0, cw), np.clip(boxes[:, 3], 0, ch)], axis=1)
    kept = (boxes[:, 0] < boxes[:, 2]) & (boxes[:, 1] < boxes[:, 3])
    if g.flip:  # x -> S - x on the padded image
        s = np.float32(g.size)
        boxes = np.stack([s - boxes[:, 2], boxes[:, 1], s - boxes[:, 0], boxes[:, 3]], axis=1)
    return boxes.astype(np.float32), kept


def mask_maps(g: Geometry) -> Tuple[np.ndarray, np.ndarray]:
    """`(row_map (S,), col_map (S,))`: the source row / column of the original masks for each
    pixel of the S x S LSJ masks (nearest resize, crop, flip), `h` / `w` (one past the last)
    for padding: read them from masks with a zero row and column appended."""
    h, w = g.original
    ch, cw = g.cropped
    rows = np.full(g.size, h, np.int64)
    rows[:ch] = nearest_indices(h, g.resized[0])[g.top:g.top + ch]
    cols = np.full(g.size, w, np.int64)
    cols[:cw] = nearest_indices(w, g.resized[1])[g.left:g.left + cw]
    return rows, (cols[::-1].copy() if g.flip else cols)


def with_zero_border(masks: np.ndarray) -> np.ndarray:
    """`(N, h, w)` masks with a zero row and column appended (`mask_maps`' padding pixel)."""
    return np.pad(masks, ((0, 0), (0, 1), (0, 1)))
