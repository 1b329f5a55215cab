"""Canvases: the fixed `(height, width)` sizes that resized images are padded into.

A compiled function serves one canvas, so images of any size share a few compiled shapes. A
model config lists its canvases in `canvas_buckets` (sorted by area; sides multiples of 32) and
keeps one square `canvas_size` for training and export; each image goes to the smallest canvas
that holds its resized size rounded up to `size_divisible` (`bucket_for`). The defaults here are
what `config.model_config` fills in when those settings are None.

Imports nothing of maskrcnn_jax: `config` (below every other module) uses it.
"""

import math


def default_canvas_buckets(min_size: int, max_size: int, size_divisible: int = 32):
    """Canvases that fit common photo shapes with little padding: square, 4:3 / 3:4 and the
    longest (16:9 / 9:16 and anything longer), each side `min_size` or `max_size` resized as
    torchvision does and rounded up to `size_divisible`. Every resized image fits the last two.
    """
    short = _round_up(min(min_size, max_size), size_divisible)
    long = _round_up(max(min_size, max_size), size_divisible)
    four_three = min(_round_up(min(min_size, max_size) * 4 / 3, size_divisible), long)
    return ((short, short), (short, four_three), (four_three, short), (short, long), (long, short))


def default_canvas_size(min_size: int, max_size: int, size_divisible: int = 32):
    """`(side, side)`: a square of the largest resized side rounded up to `size_divisible`, so
    every resized image fits in either orientation."""
    side = _round_up(max(min_size, max_size), size_divisible)
    return (side, side)


def canvases(config) -> list:
    """The canvas buckets of a model config as `(height, width)` tuples (`canvas_size` alone
    for a config without `canvas_buckets`)."""
    return [tuple(int(v) for v in b) for b in (config.get("canvas_buckets") or
                                               [config.canvas_size])]


def bucket_for(padded_size, buckets):
    """The smallest canvas of `buckets` (sorted by area) that holds `(height, width)`, or None."""
    for canvas in buckets:
        if padded_size[0] <= canvas[0] and padded_size[1] <= canvas[1]:
            return tuple(canvas)
    return None


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(float(value) / multiple) * multiple)
