"""Records grouped by canvas bucket: which canvas of a model config each record's image pads into.

Planned from the records' `(height, width)` alone (`builders.image_ids_and_sizes`, no image
decoded), so every process plans the same buckets. Training groups each global batch by bucket
(`pipeline.make_dataset`, one compiled train step per bucket); evaluation runs one loader per
bucket, each sharded over the processes (`eval_shards.PaddedShard`).
"""

from typing import Optional

import numpy as np

from maskrcnn_jax.canvas import bucket_for, canvases
from maskrcnn_jax.data import transform


def record_canvas(height: int, width: int, config, min_size: int, position=None):
    """The smallest canvas of `config.canvas_buckets` that holds a `height x width` image
    resized at `min_size` (and `config.max_size`), padded to `size_divisible`.

    Returns:
      `(canvas_height, canvas_width)` ints.

    Raises:
      ValueError: naming the record (`position`) and its size, when no canvas holds it or a
        side resizes to 0 pixels.
    """
    buckets = canvases(config)
    out, pad = transform.padded_size_of(height, width, config, min_size)
    canvas = bucket_for(pad, buckets) if min(out) >= 1 else None
    if canvas is None:
        name = "a record" if position is None else f"record {position}"
        raise ValueError(f"{name}: size {height}x{width} resizes to {out[0]}x{out[1]} (padded "
                         f"{pad[0]}x{pad[1]}), which fits none of the canvases {buckets}")
    return canvas


def bucket_positions(sizes, config, min_size: Optional[int] = None) -> dict:
    """`{canvas: record positions}`: each record in its canvas (`record_canvas`) resized at
    `min_size` (default: the last of `config.min_size`, evaluation's); canvases in the config's
    order, positions in split order, canvases that hold no record left out.

    Args:
      sizes: `(N, 2)` `(height, width)` of the records (`builders.image_ids_and_sizes`).

    Returns:
      `{(canvas_height, canvas_width): (M,) int64 positions into the N records}`.

    Raises:
      ValueError: naming the record's position and size, for one that fits no canvas or
        resizes to 0 pixels.
    """
    if min_size is None:
        min_size = config.min_size if np.ndim(config.min_size) == 0 else config.min_size[-1]
    members: dict = {b: [] for b in canvases(config)}
    for position, (h, w) in enumerate(np.asarray(sizes).reshape(-1, 2)):
        members[record_canvas(h, w, config, min_size, position)].append(position)
    return {b: np.asarray(m, np.int64) for b, m in members.items() if m}
