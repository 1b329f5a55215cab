"""FPN anchors identical to torchvision's `AnchorGenerator` (models/detection/anchor_utils.py).

Anchors depend only on static shapes (feature-map sizes and the padded canvas size), so they are
computed with NumPy float32 at trace time and enter jitted code as constants.
"""

from typing import List, Sequence, Tuple

import numpy as np

# maskrcnn_resnet50_fpn's defaults: one size per FPN level ('0'..'3', 'pool'), three ratios each.
DEFAULT_SIZES: Tuple[Tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
DEFAULT_ASPECT_RATIOS: Tuple[Tuple[float, ...], ...] = ((0.5, 1.0, 2.0),) * 5


def base_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """Zero-centred cell anchors as `AnchorGenerator.generate_anchors` (float32, rounded).

    Aspect ratio is height / width. Order is ratio-major: for each ratio, every size.

    Args:
      sizes: anchor sizes (sqrt of the area) for one level.
      aspect_ratios: height / width ratios for one level.

    Returns:
      `(len(aspect_ratios) * len(sizes), 4)` float32 `(x1, y1, x2, y2)` around the origin.
    """
    scales = np.asarray(sizes, dtype=np.float32)
    ratios = np.asarray(aspect_ratios, dtype=np.float32)
    # float32 throughout, as torch computes it; sqrt and 1/x are correctly rounded in both.
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    anchors = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
    # np.round rounds half to even, like torch.round.
    return np.round(anchors).astype(np.float32)


def level_anchors(
    feature_size: Tuple[int, int],
    stride: Tuple[int, int],
    sizes: Sequence[float],
    aspect_ratios: Sequence[float],
) -> np.ndarray:
    """All anchors of one feature level, in torchvision's order.

    Order is location-major (y outer, x inner), then the cell anchors of `base_anchors`, i.e.
    `(shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)`.

    Args:
      feature_size: `(h, w)` of the feature map.
      stride: `(stride_y, stride_x)` in pixels (ints).
      sizes: anchor sizes of this level.
      aspect_ratios: height / width ratios of this level.

    Returns:
      `(h * w * A, 4)` float32 anchors `(x1, y1, x2, y2)` in canvas pixels, A = #sizes * #ratios.
    """
    grid_h, grid_w = (int(v) for v in feature_size)
    stride_y, stride_x = (int(v) for v in stride)
    cell = base_anchors(sizes, aspect_ratios)
    # torchvision builds integer shifts, then adds them to the float32 cell anchors.
    shifts_x = np.arange(grid_w, dtype=np.int64) * stride_x
    shifts_y = np.arange(grid_h, dtype=np.int64) * stride_y
    shift_y, shift_x = np.meshgrid(shifts_y, shifts_x, indexing="ij")
    shift_x = shift_x.reshape(-1)
    shift_y = shift_y.reshape(-1)
    shifts = np.stack((shift_x, shift_y, shift_x, shift_y), axis=1).astype(np.float32)
    return (shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4).astype(np.float32)


def multilevel_anchors(
    feature_sizes: Sequence[Tuple[int, int]],
    image_size: Tuple[int, int],
    sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
    aspect_ratios: Sequence[Sequence[float]] = DEFAULT_ASPECT_RATIOS,
) -> List[np.ndarray]:
    """Anchors for every FPN level, as `AnchorGenerator.forward` (before concatenation).

    Strides are `canvas // feature` per axis (integer division), as torchvision computes them
    from the padded batch tensor.

    Args:
      feature_sizes: `(h, w)` per level.
      image_size: padded canvas `(H, W)` the features were computed from.
      sizes: anchor sizes per level.
      aspect_ratios: aspect ratios per level.

    Returns:
      list with one `(h_l * w_l * A_l, 4)` float32 array per level; concatenating them gives
      torchvision's per-image anchor tensor.
    """
    if not (len(feature_sizes) == len(sizes) == len(aspect_ratios)):
        raise ValueError(
            f"need one sizes/aspect_ratios entry per level: {len(feature_sizes)} levels, "
            f"{len(sizes)} sizes, {len(aspect_ratios)} aspect_ratios"
        )
    height, width = (int(v) for v in image_size)
    anchors = []
    for (h, w), level_sizes, level_ratios in zip(feature_sizes, sizes, aspect_ratios):
        stride = (height // int(h), width // int(w))
        anchors.append(level_anchors((h, w), stride, level_sizes, level_ratios))
    return anchors
