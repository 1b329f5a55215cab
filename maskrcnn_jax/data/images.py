"""Reading image files as 8-bit RGB, every colour mode converted correctly (COCO builds, predict).

PIL's `convert('RGB')` is right for most modes but clips 16-bit grayscale at 255 (a 16-bit
image turns near-white); `to_rgb` scales it instead.
"""

import numpy as np
from PIL import Image


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


def read_rgb(path) -> np.ndarray:
    """The image file at `path` as a `(H, W, 3)` uint8 RGB array (see `to_rgb`).

    Raises:
      ValueError: naming the path, when the file is missing, cannot be decoded (truncated,
        not an image) or has no RGB conversion.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decodes fully: truncated files fail here
            return np.asarray(to_rgb(image))
    except Exception as e:  # PIL raises assorted errors on unreadable files
        raise ValueError(f"{path}: cannot read image: {e}") from e
