"""torch's `F.interpolate(mode="nearest")` index arithmetic (NumPy on static sizes), shared by the
FPN's top-down upsampling (at trace time) and the host-side mask resizing of the data pipeline."""

import numpy as np


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of torch `F.interpolate(size=out_size, mode="nearest")` along one axis.

    torch computes `scale = float32(in) / out` and `src = min(floor(float32(dst) * scale), in-1)`
    in float32, with shortcuts for equal sizes and exact 2x upsampling (`dst >> 1`). Replicating
    the float32 rounding keeps odd sizes bit-identical to torch. Returns int32 indices of shape
    `(out_size,)`.
    """
    dst = np.arange(out_size)
    if in_size == out_size:
        return dst.astype(np.int32)
    if out_size == 2 * in_size:
        return (dst >> 1).astype(np.int32)
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(dst.astype(np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1).astype(np.int32)
