"""Host-side pre- and post-processing, as torchvision's `GeneralizedRCNNTransform` computes it.

Images of any size are resized on the host (NumPy, float32, torch's bilinear arithmetic) and
padded into the model's fixed canvas, so one compiled function serves them all. Outputs are mapped
back to original-image pixels here too: box rescaling and mask pasting, whose sizes depend on
the original image and therefore stay out of the compiled function.
"""

import math
from typing import NamedTuple, Sequence

import numpy as np

from maskrcnn_jax.errors import ImageError


class Batch(NamedTuple):
    """A batch of images in the canvas.

    images: `(B, Hc, Wc, 3)` float32 normalized images, zero outside each resized image.
    image_sizes: `(B, 2)` int32 `(height, width)` of each resized image.
    padded_sizes: `(B, 2)` int32 each resized size rounded up to `size_divisible`: the region
      torchvision would run its backbone on for that image alone (used to reproduce its border
      effects exactly).
    original_sizes: `(B, 2)` int32 `(height, width)` of each input image.
    """

    images: np.ndarray
    image_sizes: np.ndarray
    padded_sizes: np.ndarray
    original_sizes: np.ndarray


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The size torchvision's transform resizes an image to (short side to `min_size` unless the
    long side would pass `max_size`), truncating `size * scale` in double as torch does."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(height * scale), int(width * scale)


# Host-side twins of `ops/resize.py` (which documents torch's kernels): the same float32
# arithmetic in NumPy, so that images and masks of any size need no compilation. torch's build
# evaluates some steps as fused multiply-adds; `_fma` reproduces one exactly by computing in
# float64 (a float32 product is exact there) and rounding once to float32.
_CHANNELS_LAST_MAX_OUTPUT_SUM = 128


def _fma(a, b, c):
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + c).astype(np.float32)


def _source_index(in_size: int, out_size: int):
    """torch's bilinear source indices `(i0, i1)` and float32 weights `(l0, l1)` along one axis."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = _fma(scale, np.arange(out_size, dtype=np.float32) + np.float32(0.5), np.float32(-0.5))
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    l1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, np.float32(1.0) - l1, l1


def bilinear_resize(array: np.ndarray, out_height: int, out_width: int,
                    elementwise=None) -> np.ndarray:
    """torch's CPU `F.interpolate(mode='bilinear', align_corners=False)` of a `(H, W)` or
    `(H, W, C)` float32 array (multi-threaded torch's kernel choice, see `ops/resize.py`).

    `elementwise`: a per-element function to float32 (e.g. the normalisation of uint8 pixels),
    applied to the source values the interpolation reads: the result equals
    `bilinear_resize(elementwise(array), ...)` exactly, without the full-size array of
    `elementwise(array)` (for a large photo, several times the decoded image)."""
    if elementwise is None:
        array = np.asarray(array, np.float32)
        elementwise = _identity
    h0, h1, hl0, hl1 = _source_index(array.shape[0], out_height)
    w0, w1, wl0, wl1 = _source_index(array.shape[1], out_width)
    trailing = (None,) * (array.ndim - 2)
    hl0, hl1 = (v[(slice(None), None) + trailing] for v in (hl0, hl1))
    wl0, wl1 = (v[(None, slice(None)) + trailing] for v in (wl0, wl1))
    if out_height + out_width <= _CHANNELS_LAST_MAX_OUTPUT_SUM:
        row0, row1 = array[h0], array[h1]
        a, b, c, d = (elementwise(v) for v in (row0[:, w0], row0[:, w1], row1[:, w0],
                                               row1[:, w1]))
        w00, w01, w10, w11 = hl0 * wl0, hl0 * wl1, hl1 * wl0, hl1 * wl1
        return _fma(d, w11, _fma(c, w10, _fma(a, w00, b * w01)))
    # Separable: each output row interpolates two source rows along x, then the pair along y.
    # Along x once per source row (the same arithmetic, on in_height rows instead of twice
    # out_height): an upsampled mask costs one pass over its output pixels.
    along_x = _fma(elementwise(array[:, w0]), wl0, elementwise(array[:, w1]) * wl1)
    return _fma(along_x[h0], hl0, along_x[h1] * hl1)


def _identity(values):
    return values


def padded_size(image: np.ndarray, config, index: int = 0,
                min_size: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """`((out_h, out_w), (pad_h, pad_w))`: an image's resized size (torchvision's) and that
    rounded up to `size_divisible`.

    Raises:
      ImageError (a ValueError): naming the image's `index`, for a wrong shape or dtype, or a
        side that resizes to 0 pixels (e.g. 1x1000 at min_size 800 / max_size 1333).
    """
    min_size = int(config.min_size if min_size is None else min_size)
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageError(f"expected an (H, W, 3) RGB array, got shape {image.shape}", index)
    if image.dtype != np.uint8:
        raise ImageError(f"expected dtype uint8, got {image.dtype}", index)
    h, w = image.shape[:2]
    (out_h, out_w), pad = padded_size_of(h, w, config, min_size)
    if out_h < 1 or out_w < 1:
        raise ImageError(
            f"size {h}x{w} resizes to {out_h}x{out_w} (min_size {min_size}, max_size "
            f"{config.max_size}): a side of 0 pixels; crop or pad the image to a less extreme "
            "aspect ratio", index)
    return (out_h, out_w), pad


def padded_size_of(height: int, width: int, config, min_size: int):
    """`padded_size` of a `height x width` image, without checks: `((out_h, out_w), (pad_h,
    pad_w))`, the resized size and that rounded up to `config.size_divisible`."""
    out = resized_size(int(height), int(width), int(min_size), config.max_size)
    divisible = config.size_divisible
    return out, tuple(int(math.ceil(v / divisible) * divisible) for v in out)


def normalize(image: np.ndarray, config) -> np.ndarray:
    """uint8 `(H, W, 3)` -> float32 `(image / 255 - image_mean) / image_std` (torchvision's
    `GeneralizedRCNNTransform.normalize` of its [0, 1] image)."""
    mean = np.asarray(config.image_mean, np.float32)
    std = np.asarray(config.image_std, np.float32)
    return (np.asarray(image).astype(np.float32) / np.float32(255.0) - mean) / std


def preprocess(images: Sequence[np.ndarray], config, indices: Sequence[int] | None = None,
               min_size: int | None = None, canvas_size=None) -> Batch:
    """uint8 `(H, W, 3)` RGB images (any sizes) -> a `Batch` in one canvas.

    As torchvision: scale to [0, 1], normalize with `image_mean`/`image_std`, resize, pad with 0.
    `min_size` overrides `config.min_size` (training's multi-scale resizing), `canvas_size`
    `config.canvas_size` (a canvas bucket).

    Raises:
      ImageError (a ValueError): naming the image's index (`indices[k]`, its index in the
        caller's list; default its position in `images`), for a wrong shape/dtype, a side that
        resizes to 0 pixels or a resized image that does not fit the canvas.
    """
    canvas_h, canvas_w = tuple(canvas_size or config.canvas_size)
    batch = np.zeros((len(images), canvas_h, canvas_w, 3), np.float32)
    image_sizes, padded_sizes, original_sizes = [], [], []
    indices = range(len(images)) if indices is None else indices
    for k, (i, image) in enumerate(zip(indices, images)):
        image = np.asarray(image)
        (out_h, out_w), (pad_h, pad_w) = padded_size(image, config, i, min_size)
        h, w = image.shape[:2]
        if pad_h > canvas_h or pad_w > canvas_w:
            raise ImageError(
                f"size {h}x{w} resizes to {out_h}x{out_w} (padded {pad_h}x{pad_w}), which does "
                f"not fit the canvas {canvas_h}x{canvas_w}; raise config.canvas_size", i)
        # Normalised as it is read: only the pixels the resize reads are converted.
        batch[k, :out_h, :out_w] = bilinear_resize(
            image, out_h, out_w, elementwise=lambda pixels: normalize(pixels, config))
        image_sizes.append((out_h, out_w))
        padded_sizes.append((pad_h, pad_w))
        original_sizes.append((h, w))
    as_array = lambda sizes: np.asarray(sizes, np.int32).reshape(len(images), 2)  # noqa: E731
    return Batch(batch, as_array(image_sizes), as_array(padded_sizes), as_array(original_sizes))


def resize_boxes(boxes: np.ndarray, image_size, original_size) -> np.ndarray:
    """Boxes `(N, 4)` from resized-image to original-image pixels (torchvision `resize_boxes`)."""
    ratio_h = np.float32(original_size[0]) / np.float32(image_size[0])
    ratio_w = np.float32(original_size[1]) / np.float32(image_size[1])
    boxes = np.asarray(boxes, np.float32)
    return np.stack([boxes[:, 0] * ratio_w, boxes[:, 1] * ratio_h,
                     boxes[:, 2] * ratio_w, boxes[:, 3] * ratio_h], axis=1)


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_size, padding: int = 1) -> np.ndarray:
    """Paste `(N, M, M)` mask probabilities into a `(N, H, W)` image, as torchvision's
    `paste_masks_in_image` (one-pixel zero padding, expanded boxes truncated to int64, each
    mask resized to its box with bilinear interpolation, clipped placement)."""
    out = np.zeros((len(masks), int(image_size[0]), int(image_size[1])), np.float32)
    for i, (ya, yb, xa, xb), crop in pasted_crops(masks, boxes, image_size, padding):
        out[i, ya:yb, xa:xb] = crop
    return out


def pasted_crops(masks: np.ndarray, boxes: np.ndarray, image_size, padding: int = 1):
    """`paste_masks` one box extent at a time, without the full-image arrays: yields
    `(i, (y0, y1, x0, x1), crop)` for each mask `i` whose expanded box meets the image, `crop`
    `(y1 - y0, x1 - x0)` float32 being `paste_masks(...)[i, y0:y1, x0:x1]` (zero elsewhere)."""
    im_h, im_w = int(image_size[0]), int(image_size[1])
    if len(masks) == 0:
        return
    m = masks.shape[-1]
    scale = np.float32((m + 2 * padding) / m)  # torch: a Python float applied as float32
    padded = np.pad(np.asarray(masks, np.float32), ((0, 0), (padding, padding), (padding, padding)))
    boxes = np.asarray(boxes, np.float32)
    w_half = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5) * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5) * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
    y_c = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
    expanded = np.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], 1)
    expanded = np.trunc(expanded).astype(np.int64)  # torch .to(int64) truncates toward zero
    for i, (x0, y0, x1, y1) in enumerate(expanded.tolist()):
        xa, xb = max(x0, 0), min(x1 + 1, im_w)
        ya, yb = max(y0, 0), min(y1 + 1, im_h)
        if xb > xa and yb > ya:
            resized = bilinear_resize(padded[i], max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1))
            yield i, (ya, yb, xa, xb), resized[ya - y0:yb - y0, xa - x0:xb - x0]
