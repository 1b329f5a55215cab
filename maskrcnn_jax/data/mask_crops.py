"""Ground-truth mask crops on the host: each resized mask RoIAligned onto its own box.

The input pipeline stores a ground-truth mask as a fixed `(S, S)` crop on its box (the compact
form of `ops.mask_targets.project_cropped_masks_on_boxes`) instead of a full-resolution mask.
A crop is computed from the original-resolution mask and the nearest-resize (and flip) index
maps, without materializing the resized mask, with the arithmetic of torchvision's
`project_masks_on_boxes` applied to the resized mask: RoIAlign at spatial scale 1, adaptive
sampling grid `ceil(box_side / S)`, aligned=False (the C++ kernel's sample positions and
clamping, in float32), the weighted sums in float64.
"""

import numpy as np


def _axis_weights(start, end, crop_size: int, size: int):
    """`(crop_size, n)` float32 sampling matrix along one axis of RoIAlign (C++ kernel rules,
    aligned=False, adaptive grid) and the first map index `lo` it covers (columns lo..lo+n-1).
    Rows are pre-divided by the grid so that the 2-D result is `Wy @ M @ Wx.T`."""
    start = np.float32(start)
    roi = max(np.float32(end) - start, np.float32(1.0))
    bin_size = roi / np.float32(crop_size)
    grid = max(int(np.ceil(bin_size)), 1)  # the kernel's ceil(roi / pooled), in float32
    p = np.arange(crop_size, dtype=np.float32)[:, None]
    i = np.arange(grid, dtype=np.float32)[None, :]
    pos = start + p * bin_size + (i + np.float32(0.5)) * bin_size / np.float32(grid)
    inside = (pos >= -1.0) & (pos <= size)
    pos = np.maximum(pos, np.float32(0.0))
    low = np.floor(pos).astype(np.int64)
    at_edge = low >= size - 1
    low = np.where(at_edge, size - 1, low)
    high = np.where(at_edge, size - 1, low + 1)
    pos = np.where(at_edge, low.astype(np.float32), pos)
    frac = pos - low.astype(np.float32)
    w_low, w_high = (np.float32(1.0) - frac) * inside, frac * inside
    lo = int(low.min())
    n = int(high.max()) - lo + 1
    weights = np.zeros((crop_size, n), np.float32)
    rows = np.broadcast_to(np.arange(crop_size)[:, None], low.shape)
    np.add.at(weights, (rows, low - lo), w_low)
    np.add.at(weights, (rows, high - lo), w_high)
    return weights / np.float32(grid), lo


def crop_resized_masks(masks: np.ndarray, row_map: np.ndarray, col_map: np.ndarray,
                       boxes: np.ndarray, crop_size: int) -> np.ndarray:
    """Crops of the resized masks onto their boxes, without materializing the resized masks.

    Args:
      masks: `(N, H0, W0)` uint8 original-resolution masks.
      row_map, col_map: `(H,)`, `(W,)` int source row/column of each resized pixel (nearest
        resize and, for columns, the horizontal flip).
      boxes: `(N, 4)` float32 `(x1, y1, x2, y2)` in resized-image pixels.
      crop_size: S.

    Returns:
      `(N, S, S)` float32: RoIAlign of each resized mask on its own box (spatial scale 1,
      adaptive sampling grid `ceil(box_side / S)`, aligned=False), the arithmetic of
      torchvision's `project_masks_on_boxes`; sums in float64, so it agrees with torchvision up
      to float32 summation order.
    """
    out = np.zeros((len(masks), crop_size, crop_size), np.float32)
    for n, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float32)):
        wy, r0 = _axis_weights(y1, y2, crop_size, len(row_map))
        wx, c0 = _axis_weights(x1, x2, crop_size, len(col_map))
        block = masks[n][np.ix_(row_map[r0:r0 + wy.shape[1]], col_map[c0:c0 + wx.shape[1]])]
        # einsum's own loops, not BLAS: small products where BLAS threads only add latency.
        rows = np.einsum("pr,rc->pc", wy.astype(np.float64), block.astype(np.float64))
        out[n] = np.einsum("pc,qc->pq", rows, wx.astype(np.float64))
    return out
