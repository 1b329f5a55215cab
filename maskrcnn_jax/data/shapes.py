"""Synthetic instance segmentation: overlapping coloured shapes on textured, noisy backgrounds.

Every image is generated from its own PRNG stream `(seed, split, index)`, so records do not
depend on generation order and any image can be regenerated alone. Masks are exact: shapes are
painted in order, a later shape covers the earlier ones, each instance's mask is what stays
visible, and instances left mostly (or almost entirely) hidden are dropped. Boxes are the tight
boxes of the visible masks (pycocotools' `toBbox`), so masks and boxes agree by construction.

Images are small (sides `min_side..max_side`, default 96..160 px) so that a model can be trained
on them on a CPU in minutes. Records have the layout of `coco.RECORD_FIELDS`.
"""

import dataclasses
import io
from typing import Iterator

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CLASS_NAMES = ("circle", "square", "triangle", "star")
CATEGORIES = [{"id": i + 1, "name": n, "label": i + 1} for i, n in enumerate(CLASS_NAMES)]
_SPLIT_STREAM = {"train": 0, "validation": 1}


@dataclasses.dataclass(frozen=True)
class ShapesOptions:
    """How the synthetic images are drawn.

    min_side, max_side: range of image heights and widths (drawn independently).
    max_shapes: each image has 1..max_shapes shapes painted (before occlusion drops).
    min_visible_fraction: an instance is dropped when less than this fraction of its shape
      stays visible, or fewer than `min_visible_pixels` pixels do.
    num_classes: shapes are drawn from the first `num_classes` of `CLASS_NAMES` (a subset of
      the classes, e.g. to pretrain a model that is then fine-tuned on all of them).
    """

    min_side: int = 96
    max_side: int = 160
    max_shapes: int = 6
    min_visible_fraction: float = 0.4
    min_visible_pixels: int = 30
    num_classes: int = len(CLASS_NAMES)

    def __post_init__(self):
        if not 1 <= self.num_classes <= len(CLASS_NAMES):
            raise ValueError(f"shapes num_classes must be in 1..{len(CLASS_NAMES)}, got "
                             f"{self.num_classes}")


def _star_polygon_mask(xx, yy, cx, cy, radii, angles):
    """Inside-test of a polygon that is star-shaped around `(cx, cy)`: vertices at `angles`
    (increasing, spanning 2 pi) and distances `radii`. A pixel is inside when it lies on the
    centre's side of the edge of the angular sector it falls in."""
    vx, vy = cx + radii * np.cos(angles), cy + radii * np.sin(angles)
    theta = np.mod(np.arctan2(yy - cy, xx - cx) - angles[0], 2 * np.pi)
    sector = np.minimum(np.searchsorted(angles - angles[0], theta, side="right") - 1,
                        len(angles) - 1)
    x0, y0 = vx[sector], vy[sector]
    nxt = (sector + 1) % len(angles)
    x1, y1 = vx[nxt], vy[nxt]
    # Cross products: pixel and centre on the same side of the edge (x0, y0) -> (x1, y1).
    side_p = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
    side_c = (x1 - x0) * (cy - y0) - (y1 - y0) * (cx - x0)
    return side_p * side_c >= 0


def _shape_mask(kind: int, h: int, w: int, cx, cy, r, rot) -> np.ndarray:
    """`(h, w)` bool mask of shape class `kind` (index into CLASS_NAMES), tested at pixel
    centres; only the shape's bounding window is evaluated (speed)."""
    reach = 1.25 * r  # bounds every vertex radius below
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, h)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, w)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + np.float32(0.5)
    if kind == 0:
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    else:
        if kind == 1:
            n, radii = 4, np.full(4, r)
        elif kind == 2:
            n, radii = 3, np.full(3, r * 1.15)
        else:
            n, radii = 10, np.where(np.arange(10) % 2 == 0, r * 1.2, r * 0.5)
        angles = rot + 2 * np.pi * np.arange(n) / n
        inside = _star_polygon_mask(xx, yy, cx, cy, radii, angles)
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = inside
    return mask


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A float32 `(h, w, 3)` background: base colour plus a few low-frequency waves."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.empty((h, w, 3), np.float32)
    image[:] = rng.uniform(0, 255, 3)
    for _ in range(3):
        freq = rng.uniform(0.02, 0.15, 2)
        wave = np.sin(xx * np.float32(freq[0]) + yy * np.float32(freq[1])
                      + np.float32(rng.uniform(0, 2 * np.pi)))
        image += wave[..., None] * rng.uniform(-40, 40, 3).astype(np.float32)
    return image


def generate_image(seed: int, split: str, index: int,
                   options: ShapesOptions = ShapesOptions()) -> dict:
    """One record (layout of `coco.RECORD_FIELDS`); a pure function of its arguments."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM.get(split, 2), index])
    h, w = (int(v) for v in rng.integers(options.min_side, options.max_side + 1, 2))
    image = _background(rng, h, w)
    shapes = []
    for _ in range(int(rng.integers(1, options.max_shapes + 1))):
        kind = int(rng.integers(0, options.num_classes))
        r = rng.uniform(0.08, 0.3) * min(h, w)
        cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
        mask = _shape_mask(kind, h, w, cx, cy, r, rng.uniform(0, 2 * np.pi))
        image[mask] = rng.uniform(0, 255, 3).astype(np.float32)
        shapes.append((kind, mask))
    # Pixel noise over everything: textured shapes, and no shape is a flat-colour give-away.
    image += rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(12.0)
    # Visible part of each shape: what no later shape covers.
    covered = np.zeros((h, w), bool)
    kept = []
    for kind, mask in reversed(shapes):
        visible = mask & ~covered
        covered |= mask
        area = int(visible.sum())
        if area >= options.min_visible_pixels and area >= options.min_visible_fraction * mask.sum():
            kept.append((kind, visible))
    kept.reverse()  # painting order
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for _, m in kept]
    xywh = np.asarray([mask_utils.toBbox(r) for r in rles], np.float32).reshape(-1, 4)
    n = len(kept)
    # JPEG: ~5x faster to write than PNG and smaller; masks stay exact, only pixels are lossy.
    encoded = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        encoded, format="JPEG", quality=95)
    image_id = index + 1
    return {
        "image": encoded.getvalue(),
        "image_id": image_id,
        "original_size": np.asarray([h, w], np.int32),
        "file_name": f"{split}_{index:06d}.jpg",
        "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
        "labels": np.asarray([k + 1 for k, _ in kept], np.int32),
        "category_ids": np.asarray([k + 1 for k, _ in kept], np.int64),
        "is_crowd": np.zeros(n, np.bool_),
        "areas": np.asarray([mask_utils.area(r) for r in rles], np.float32).reshape(n),
        "annotation_ids": image_id * 100 + np.arange(n, dtype=np.int64),
        "mask_rles": [r["counts"] for r in rles],
        "no_annotations": n == 0,
    }


def shapes_records(seed: int, split: str, num_images: int,
                   options: ShapesOptions = ShapesOptions()) -> Iterator[tuple[str, dict]]:
    """`(key, record)` for images `0..num_images-1` of a split."""
    for index in range(num_images):
        yield f"{index}", generate_image(seed, split, index, options)
