"""Reading image files as 8-bit RGB, every colour mode converted correctly (COCO builds, predict).

PIL's `convert('RGB')` is right for most modes but clips 16-bit grayscale at 255 (a 16-bit
image turns near-white); `to_rgb` scales it instead. `read_rgb` gives the decoded array
(predict, convert; optionally turned upright by its EXIF orientation, and refused above a pixel
count before decoding); `encoded_rgb_image` the encoded bytes a COCO record stores, re-encoded
only when the file is not 8-bit RGB already (the stored pixels, no EXIF orientation applied, as
torchvision's reference pipeline reads COCO).
"""

import io
import warnings
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from maskrcnn_jax.data.coco_defects import (
    IMAGE_CORRUPT,
    IMAGE_MISSING,
    IMAGE_MODE_UNSUPPORTED,
    CocoFormatError,
    Defect,
)
from maskrcnn_jax.errors import ImageError


def _gray16_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit grayscale ('I;16*', or 'I' read as 16-bit values) -> 8-bit RGB by round(v / 257)
    (65535 -> 255, the inverse of v8 * 257); PIL's convert('RGB') would clip at 255 instead and
    turn a 16-bit image near-white. 'I' values outside 0..65535 are clipped first."""
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    gray = ((values + 128) // 257).astype(np.uint8)  # == round(v / 257) (no ties for integers)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))


def to_rgb(image: Image.Image) -> Image.Image:
    """A decoded image of any PIL mode -> 8-bit 'RGB'.

    Alpha is dropped, not composited (on black or white): 'RGBA' / 'LA' / palettes with
    transparency keep their colour values, as torchvision's `read_image(mode=RGB)` and PIL's
    convert('RGB') do. 'L' / '1' repeat the gray value (1-bit: 0 / 255); 'CMYK' (including
    Adobe-inverted JPEGs, which PIL un-inverts when decoding) and 'YCbCr' etc. use PIL's
    conversion; palettes ('P', 'PA') map through their palette.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        return _gray16_to_rgb(image)
    if mode in ("P", "PA"):
        image = image.convert("RGBA")  # the palette's colours (its transparency -> alpha, dropped)
    return image.convert("RGB")


def read_rgb(path, exif_transpose: bool = False,
             max_pixels: Optional[int] = None) -> np.ndarray:
    """The image file at `path` as a `(H, W, 3)` uint8 RGB array (see `to_rgb`).

    Args:
      path: an image file PIL reads.
      exif_transpose: apply the file's EXIF orientation tag (a phone photo stored sideways
        comes out upright, as a viewer shows it). False (the default, as torchvision's
        `decode_image` and PIL): the stored pixels.
      max_pixels: refuse an image of more pixels (height x width), read from its header before
        anything is decoded. PIL's own limit (twice `PIL.Image.MAX_IMAGE_PIXELS`) applies too.

    Raises:
      ImageError: naming the path, when the file is missing, cannot be decoded (truncated,
        not an image), has no RGB conversion or is too large.
    """
    try:
        with warnings.catch_warnings():  # its size is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageError(f"too large: {e}", path=path) from e
    except Exception as e:  # PIL raises assorted errors on unreadable files
        raise ImageError(f"cannot read image: {e}", path=path) from e
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError(f"too large: {width}x{height} = {width * height:,} pixels, above "
                             f"the limit of {int(max_pixels):,} (max_pixels)", path=path)
        try:
            image.load()  # decodes fully: truncated files fail here
            if exif_transpose:
                ImageOps.exif_transpose(image, in_place=True)
            return np.asarray(to_rgb(image))
        except Exception as e:  # PIL raises assorted errors on unreadable files
            raise ImageError(f"cannot read image: {e}", path=path) from e


def _png_bit_depth(data: bytes) -> int:
    """The bit depth in a PNG's IHDR (PIL reads 48-bit RGB PNGs as mode 'RGB')."""
    return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else 8


def encoded_rgb_image(path: str) -> tuple[bytes, int, int]:
    """Encoded bytes of an 8-bit RGB image and `(height, width)`; raises `Defect`.

    8-bit RGB JPEG / PNG files (PNG without transparency) are kept as they are; anything else is
    decoded, converted (`to_rgb`) and re-encoded as a PNG, so that every decoder on read (PIL,
    or OpenCV's IMREAD_UNCHANGED in TFDS) gets (H, W, 3) uint8. 48-bit RGB PNGs: PIL keeps the
    high byte of each value (v >> 8, at most 1 below round(v / 257)).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Defect(IMAGE_MISSING, "file_name", f"cannot read image file {path}: {e}") from e
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes fully: truncated files fail here
    except Exception as e:  # PIL raises assorted errors on corrupt files
        raise Defect(IMAGE_CORRUPT, "file_name", f"corrupt image file {path}: {e}") from e
    with image:
        width, height = image.size
        keep = image.mode == "RGB" and (
            image.format == "JPEG" or (image.format == "PNG" and _png_bit_depth(data) == 8
                                       and "transparency" not in image.info))
        if not keep:
            try:
                rgb = to_rgb(image)
            except Exception as e:
                raise Defect(IMAGE_MODE_UNSUPPORTED, "file_name",
                             f"image file {path}: no RGB conversion of mode {image.mode}: "
                             f"{e}") from e
            out = io.BytesIO()
            rgb.save(out, format="PNG")
            data = out.getvalue()
    return data, height, width


def read_rgb_image(path: str, where: str) -> tuple[bytes, int, int]:
    """The encoded bytes of an 8-bit RGB image (other modes converted, see `to_rgb`, and
    re-encoded as PNG) and its `(height, width)`. Raises CocoFormatError naming the file if it
    is missing or corrupt."""
    try:
        return encoded_rgb_image(path)
    except Defect as d:
        raise CocoFormatError(f"{where}: {d.detail}", kind=d.kind, file=path,
                              field=d.field) from None
