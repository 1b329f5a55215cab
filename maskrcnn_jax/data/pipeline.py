"""grain input pipeline: records -> fixed-shape, normalized, padded NumPy batches.

Per image, as torchvision's reference training + `GeneralizedRCNNTransform` do it: decode;
(train) random horizontal flip of the original image, boxes and masks; resize (short side to
`min_size`, drawn from a tuple when training with scale jitter, long side <= `max_size`) with
`maskrcnn_jax.data.transform.preprocess`, which also normalizes and pads into the canvas; boxes scaled
by `new / original` size in float32 (torchvision `resize_boxes`); masks resized with torch's
`nearest` rule and cropped onto their resized boxes at `mask_crop_size` (RoIAlign with torchvision's
`project_masks_on_boxes` arithmetic: spatial scale 1, adaptive sampling grid, aligned=False).

Ground truth is padded to `max_instances` with a validity mask: crowd and zero-size boxes are not
targets (valid=False; crowd instances take slots after the targets, if any are left); an image
with more targets than `max_instances` keeps the largest (by annotation area) and logs the count
dropped. Batches are dicts of NumPy arrays (`BATCH_FIELDS`). Sharding per JAX process, shuffling
and all randomness come from grain's sampler and seed, so a run is deterministic for a seed and
an iterator's `get_state()` / `set_state()` resumes it exactly.
"""

import logging
from typing import Optional, Sequence

import grain
import numpy as np
from absl import flags

from maskrcnn_jax.data import coco, transform
from maskrcnn_jax.ops.interpolate import nearest_indices

BATCH_FIELDS = {
    "images": "(B, Hc, Wc, 3) float32 normalized, zero padded",
    "image_sizes": "(B, 2) int32 resized (h, w)",
    "padded_sizes": "(B, 2) int32 image_sizes rounded up to size_divisible",
    "original_sizes": "(B, 2) int32 (h, w) of the record's image",
    "image_ids": "(B,) int64",
    "boxes": "(B, G, 4) float32 (x1, y1, x2, y2) resized-image pixels (flipped when flipped), "
             "0 where padded",
    "labels": "(B, G) int32 contiguous 1..K, 0 where padded",
    "valid": "(B, G) bool: a training target (False for padding, crowd, zero-size boxes)",
    "is_crowd": "(B, G) bool",
    "masks": "(B, G, S, S) float32 mask crops on their boxes, 0 where padded",
    "no_annotations": "(B,) bool the image has no annotations",
    "flipped": "(B,) bool",
    "num_dropped": "(B,) int32 targets dropped by the max_instances limit",
    "batch_valid": "(B,) bool False for the padding images of a short last (eval) batch",
}

log = logging.getLogger(__name__)


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


def _select_instances(record, keep: np.ndarray, max_instances: int):
    """Indices into the record's instances to emit (targets first, then crowd) and the number
    of targets dropped. Too many targets: keep the largest by area (stable order kept)."""
    targets = np.flatnonzero(keep)
    dropped = max(len(targets) - max_instances, 0)
    if dropped:
        areas = np.asarray(record["areas"], np.float32)[targets]
        largest = np.sort(np.argsort(-areas, kind="stable")[:max_instances])
        targets = targets[largest]
        log.warning("image id %s: %d instances, keeping the %d largest, dropped %d",
                    int(record["image_id"]), len(keep), max_instances, dropped)
    crowd = np.flatnonzero(np.asarray(record["is_crowd"], bool))
    crowd = crowd[:max_instances - len(targets)]
    return np.concatenate([targets, crowd]).astype(np.int64), dropped


def prepare_example(record: dict, config, *, min_size: int, flip: bool, max_instances: int,
                    mask_crop_size: int = 112) -> dict:
    """One record -> the per-image arrays of a batch (`BATCH_FIELDS` without the batch axis).

    Args:
      record: a data source record (image decoded, `coco.RECORD_FIELDS`).
      config: model config: `canvas_size`, `max_size`, `size_divisible`, `image_mean/std`.
      min_size: the short-side size to resize to (the scale jitter's choice).
      flip: flip horizontally before resizing.
      max_instances: G.
      mask_crop_size: S.
    """
    image = np.asarray(record["image"])
    h0, w0 = image.shape[:2]
    boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
    # As torchvision's reference (coco_utils): clamp to the image, zero-size boxes are no target.
    boxes = np.clip(boxes, 0, np.asarray([w0, h0, w0, h0], np.float32))
    is_crowd = np.asarray(record["is_crowd"], bool).reshape(-1)
    keep = ~is_crowd & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    index, dropped = _select_instances(record, keep, max_instances)
    boxes = boxes[index]
    if flip:
        image = image[:, ::-1]
        boxes = np.stack([w0 - boxes[:, 2], boxes[:, 1], w0 - boxes[:, 0], boxes[:, 3]], 1)
    batch = transform.preprocess([np.ascontiguousarray(image)], config, min_size=min_size)
    h, w = (int(v) for v in batch.image_sizes[0])
    # torchvision resize_boxes: ratios new / original as float32 tensors.
    ratio = np.asarray([w, h, w, h], np.float32) / np.asarray([w0, h0, w0, h0], np.float32)
    boxes = boxes * ratio
    row_map, col_map = nearest_indices(h0, h), nearest_indices(w0, w)
    if flip:
        col_map = w0 - 1 - col_map
    rles = [record["mask_rles"][i] for i in index]
    masks = crop_resized_masks(coco.decode_masks(rles, h0, w0), row_map, col_map, boxes,
                               mask_crop_size)
    n, g = len(index), max_instances
    pad = lambda a, dtype: np.concatenate(  # noqa: E731
        [np.asarray(a, dtype), np.zeros((g - n,) + np.shape(a)[1:], dtype)])
    return {
        "images": batch.images[0],
        "image_sizes": batch.image_sizes[0],
        "padded_sizes": batch.padded_sizes[0],
        "original_sizes": batch.original_sizes[0],
        "image_ids": np.int64(record["image_id"]),
        "boxes": pad(boxes.reshape(n, 4), np.float32),
        "labels": pad(np.asarray(record["labels"], np.int32)[index], np.int32),
        "valid": pad(keep[index], bool),
        "is_crowd": pad(is_crowd[index], bool),
        "masks": pad(masks, np.float32),
        "no_annotations": np.bool_(record["no_annotations"]),
        "flipped": np.bool_(flip),
        "num_dropped": np.int32(dropped),
        "batch_valid": np.bool_(True),
    }


class _Prepare(grain.transforms.RandomMap):
    """grain step: draws the flip and scale jitter from grain's per-record generator."""

    def __init__(self, config, train: bool, min_sizes: Sequence[int], flip_probability: float,
                 max_instances: int, mask_crop_size: int):
        self.config, self.train, self.min_sizes = config, train, tuple(min_sizes)
        self.flip_probability = flip_probability
        self.max_instances, self.mask_crop_size = max_instances, mask_crop_size

    def random_map(self, record, rng: np.random.Generator):
        if self.train:  # torchvision: random choice of min_size in training, the last one else
            min_size = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
            flip = bool(rng.random() < self.flip_probability)
        else:
            min_size, flip = self.min_sizes[-1], False
        return prepare_example(record, self.config, min_size=min_size, flip=flip,
                               max_instances=self.max_instances,
                               mask_crop_size=self.mask_crop_size)


def _stack_padded(batch_size: int):
    """Stacks examples; a short (last, eval) batch is padded with zero images, batch_valid=False."""
    def stack(examples):
        examples = list(examples)
        filler = {k: np.zeros_like(v) for k, v in examples[0].items()}
        examples += [filler] * (batch_size - len(examples))
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    return stack


def make_dataset(source, config, *, batch_size: int, train: bool, seed: int = 0,
                 max_instances: int = 100, mask_crop_size: int = 112,
                 min_sizes: Optional[Sequence[int]] = None, flip_probability: float = 0.5,
                 num_epochs: Optional[int] = None, worker_count: int = 0,
                 shard_options: Optional[grain.sharding.ShardOptions] = None
                 ) -> grain.DataLoader:
    """A grain `DataLoader` of batches (`BATCH_FIELDS`) from a random-access data source.

    Args:
      source: e.g. `builders.load('shapes', data_dir, 'train')`.
      config: model config (`min_size` int or tuple, `max_size`, `canvas_size`,
        `size_divisible`, `image_mean`, `image_std`).
      batch_size: images per batch on this process.
      train: shuffle, flip, scale jitter, repeat forever (unless `num_epochs`), drop the last
        short batch. Otherwise: in order, one epoch, the last batch padded (`batch_valid`).
      seed: shuffling and per-record random draws.
      max_instances: G, ground-truth slots per image.
      mask_crop_size: S, side of the mask crops.
      min_sizes: short-side sizes for scale jitter (default `config.min_size`; evaluation uses
        the last one, as torchvision).
      flip_probability: of the horizontal flip in training.
      num_epochs: default None (forever) when training, 1 otherwise.
      worker_count: grain worker processes (0: in this process). Each worker batches its own
        records (grain's design), so batch composition depends on the worker count; for a
        fixed count, runs are deterministic and iterator states restore exactly.
      shard_options: default `ShardByJaxProcess`: each JAX process reads its own shard.

    Returns:
      A `grain.DataLoader`; `iter(loader)` has `get_state()` / `set_state(state)`.
    """
    if min_sizes is None:
        min_sizes = config.min_size
    min_sizes = (min_sizes,) if isinstance(min_sizes, (int, np.integer)) else tuple(min_sizes)
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=train)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard_options, shuffle=train,
        num_epochs=num_epochs if num_epochs is not None else (None if train else 1), seed=seed)
    operations = [
        _Prepare(config, train, min_sizes, flip_probability, max_instances, mask_crop_size),
        grain.transforms.Batch(batch_size, drop_remainder=train,
                               batch_fn=_stack_padded(batch_size)),
    ]
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags, which only `absl.app.run` parses; outside
        # of it, use the defaults (as `app.run` without command-line flags would).
        flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=worker_count)
