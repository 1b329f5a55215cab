"""FPN anchors identical to torchvision's `AnchorGenerator` (models/detection/anchor_utils.py).

The cell anchors (`base_anchors`) depend only on sizes and ratios: NumPy float32 constants. The
anchors of an image depend on its padded size, which is traced (a batch shares one canvas but each
image has its own padded size), so `level_anchors_for_image` / `anchors_for_image` are jnp
functions of it, for one image (batch with `jax.vmap`). The model's anchors are these functions.
"""

from typing import Sequence, Tuple

import jax.numpy as jnp
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


def level_anchors_for_image(feature_size, level, padded_size, base):
    """Anchors of one FPN level for one image, as torchvision computes them for that image alone.

    torchvision pads the image to a multiple of 32 (`padded_size`), its level-k feature map is
    `ceil(padded / 2**k)` and its strides are `padded // feature` per axis, so on P6 the stride is
    not always 64 (e.g. 800 // 13 = 61). A shared canvas's grid (`feature_size`) may be larger
    than that image's own grid; positions beyond it are marked invalid (their coordinates follow
    the same stride and are meaningless).

    Args:
      feature_size: static `(h, w)` of this level on the canvas.
      level: static FPN level k (stride 2**k on the canvas).
      padded_size: `(2,)` int32 (traced or concrete) `(height, width)` of the image padded to 32.
      base: `(A, 4)` float32 zero-centred cell anchors (`base_anchors`).

    Returns:
      anchors `(h * w * A, 4)` float32 `(x1, y1, x2, y2)` in canvas pixels and valid
      `(h * w * A,)` bool, in torchvision's order (y outer, x, then the cell anchors).
    """
    h, w = (int(v) for v in feature_size)
    padded_size = jnp.asarray(padded_size, jnp.int32)
    size_h = -(-padded_size[0] // 2**level)  # ceil: torchvision's feature size on this level
    size_w = -(-padded_size[1] // 2**level)
    stride_h, stride_w = padded_size[0] // size_h, padded_size[1] // size_w
    ys, xs = jnp.arange(h, dtype=jnp.int32), jnp.arange(w, dtype=jnp.int32)
    # torchvision builds integer shifts, then adds them to the float32 cell anchors.
    shift_y = jnp.broadcast_to((ys * stride_h)[:, None], (h, w)).astype(jnp.float32)
    shift_x = jnp.broadcast_to((xs * stride_w)[None, :], (h, w)).astype(jnp.float32)
    shifts = jnp.stack([shift_x, shift_y, shift_x, shift_y], axis=-1)  # (h, w, 4)
    anchors = shifts[:, :, None, :] + jnp.asarray(base, jnp.float32)[None, None]
    valid = (ys[:, None] < size_h) & (xs[None, :] < size_w)
    valid = jnp.broadcast_to(valid[:, :, None], (h, w, base.shape[0]))
    return anchors.reshape(-1, 4), valid.reshape(-1)


def multilevel_anchors_for_image(
    feature_sizes: Sequence[Tuple[int, int]],
    levels: Sequence[int],
    padded_size,
    sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
    aspect_ratios: Sequence[Sequence[float]] = DEFAULT_ASPECT_RATIOS,
):
    """Per-level anchors of one image (`AnchorGenerator.forward` before concatenation).

    Args:
      feature_sizes: static `(h_l, w_l)` of each level on the canvas.
      levels: static FPN level k of each entry (stride 2**k on the canvas).
      padded_size: `(2,)` int32 `(height, width)` of the image padded to 32.
      sizes, aspect_ratios: anchor sizes and height / width ratios per level.

    Returns:
      (anchors, valid): tuples with one `(h_l * w_l * A_l, 4)` float32 `(x1, y1, x2, y2)` and
      one `(h_l * w_l * A_l,)` bool array per level (see `level_anchors_for_image`).
    """
    if not (len(feature_sizes) == len(levels) == len(sizes) == len(aspect_ratios)):
        raise ValueError(
            f"need one level/sizes/aspect_ratios entry per feature map: {len(feature_sizes)} "
            f"maps, {len(levels)} levels, {len(sizes)} sizes, {len(aspect_ratios)} aspect_ratios")
    anchors, valid = zip(*[
        level_anchors_for_image(f, level, padded_size, base_anchors(s, r))
        for f, level, s, r in zip(feature_sizes, levels, sizes, aspect_ratios)
    ])
    return anchors, valid


def anchors_for_image(
    feature_sizes: Sequence[Tuple[int, int]],
    levels: Sequence[int],
    padded_size,
    sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
    aspect_ratios: Sequence[Sequence[float]] = DEFAULT_ASPECT_RATIOS,
):
    """All anchors of one image, levels concatenated: torchvision's per-image anchor tensor.

    Returns:
      anchors `(N, 4)` float32 `(x1, y1, x2, y2)` and valid `(N,)` bool, N = sum of
      `h_l * w_l * A_l` (see `multilevel_anchors_for_image` for the arguments).
    """
    anchors, valid = multilevel_anchors_for_image(
        feature_sizes, levels, padded_size, sizes, aspect_ratios)
    return jnp.concatenate(anchors), jnp.concatenate(valid)
