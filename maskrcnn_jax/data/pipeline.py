"""grain input pipeline: records -> fixed-shape, normalized, padded NumPy batches.

Per image, as torchvision's reference training + `GeneralizedRCNNTransform` do it: decode;
(train) random horizontal flip of the original image, boxes and masks; resize (short side to
`min_size`, drawn from a tuple when training with scale jitter, long side <= `max_size`) with
`maskrcnn_jax.data.transform.preprocess`, which also normalizes and pads into the canvas; boxes scaled
by `new / original` size in float32 (torchvision `resize_boxes`); masks resized with torch's
`nearest` rule and cropped onto their resized boxes at `mask_crop_size`
(`mask_crops.crop_resized_masks`: RoIAlign with torchvision's `project_masks_on_boxes`
arithmetic: spatial scale 1, adaptive sampling grid, aligned=False).

Ground truth is padded to `max_instances` with a validity mask: crowd and zero-size boxes are not
targets (valid=False; crowd instances take slots after the targets, if any are left); an image
with more targets than `max_instances` keeps the largest (by annotation area) and logs the count
dropped. Batches are dicts of NumPy arrays (`BATCH_FIELDS`). Shuffling and all randomness come
from grain's sampler and seed, so a run is deterministic for a seed and an iterator's
`get_state()` / `set_state()` resumes it exactly.

Training with large-scale jitter instead (`prepare_lsj_example`, `data.lsj`: torchvision's
v2 recipe): every image augmented into one square canvas that is the whole image.

Training: every process reads its slice of one global sequence of batches, the same whatever
the process count (`samplers.GlobalBatchSampler`; grouped by canvas bucket when the config has
several, `record_buckets`). Evaluation: in order, one epoch; `evaluation.evaluate` gives every
process an equal-length contiguous shard of each bucket's records (`eval_shards.PaddedShard`).
"""

import logging
from typing import Optional, Sequence

import grain
import numpy as np
from absl import flags

from maskrcnn_jax.canvas import canvases
from maskrcnn_jax.data import coco_rle, lsj, transform
from maskrcnn_jax.data.eval_shards import PADDING_KEY
from maskrcnn_jax.data.mask_crops import crop_resized_masks
from maskrcnn_jax.data.record_buckets import bucket_positions, record_canvas
from maskrcnn_jax.data.samplers import GlobalBatchSampler
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


def _clipped_targets(record):
    """The record's boxes clipped to the image and which are targets: as torchvision's reference
    (coco_utils), crowd and zero-size boxes are not."""
    h0, w0 = np.asarray(record["image"]).shape[:2]
    boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
    boxes = np.clip(boxes, 0, np.asarray([w0, h0, w0, h0], np.float32))
    is_crowd = np.asarray(record["is_crowd"], bool).reshape(-1)
    keep = ~is_crowd & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes, is_crowd, keep


def prepare_example(record: dict, config, *, min_size: int, flip: bool, max_instances: int,
                    mask_crop_size: int = 112, canvas_size=None) -> dict:
    """One record -> the per-image arrays of a batch (`BATCH_FIELDS` without the batch axis).

    Args:
      record: a data source record (image decoded, `coco.RECORD_FIELDS`).
      config: model config: `canvas_size`, `max_size`, `size_divisible`, `image_mean/std`.
      min_size: the short-side size to resize to (the scale jitter's choice).
      flip: flip horizontally before resizing.
      max_instances: G.
      mask_crop_size: S.
      canvas_size: the canvas to pad into (default `config.canvas_size`).
    """
    image = np.asarray(record["image"])
    h0, w0 = image.shape[:2]
    boxes, is_crowd, keep = _clipped_targets(record)
    index, dropped = _select_instances(record, keep, max_instances)
    boxes = boxes[index]
    if flip:
        image = image[:, ::-1]
        boxes = np.stack([w0 - boxes[:, 2], boxes[:, 1], w0 - boxes[:, 0], boxes[:, 3]], 1)
    batch = transform.preprocess([np.ascontiguousarray(image)], config, min_size=min_size,
                                 canvas_size=canvas_size)
    h, w = (int(v) for v in batch.image_sizes[0])
    # torchvision resize_boxes: ratios new / original as float32 tensors.
    ratio = np.asarray([w, h, w, h], np.float32) / np.asarray([w0, h0, w0, h0], np.float32)
    boxes = boxes * ratio
    row_map, col_map = nearest_indices(h0, h), nearest_indices(w0, w)
    if flip:
        col_map = w0 - 1 - col_map
    rles = [record["mask_rles"][i] for i in index]
    masks = crop_resized_masks(coco_rle.decode_masks(rles, h0, w0), row_map, col_map, boxes,
                               mask_crop_size)
    return _example(record, batch, boxes, masks, index, keep, is_crowd, flip, dropped,
                    max_instances)


def prepare_lsj_example(record: dict, config, jitter: lsj.LargeScaleJitter, *, scale: float,
                        crop_draw: float, flip: bool, max_instances: int,
                        mask_crop_size: int = 112) -> dict:
    """One record -> the per-image arrays of a batch (`BATCH_FIELDS`), augmented by large-scale
    jitter (`data.lsj`: torchvision's ScaleJitter + FixedSizeCrop + flip) into a
    `jitter.size` square that is the whole image (`image_sizes` = `padded_sizes` = its size):
    targets the crop removes are not targets (valid=False)."""
    image = np.asarray(record["image"])
    h0, w0 = image.shape[:2]
    g = lsj.geometry(h0, w0, jitter, scale, crop_draw, flip)
    boxes, is_crowd, keep = _clipped_targets(record)
    boxes, inside = lsj.transform_boxes(boxes, g)
    keep = keep & inside
    index, dropped = _select_instances(record, keep, max_instances)
    boxes = boxes[index]
    size = np.asarray([[g.size, g.size]], np.int32)
    batch = transform.Batch(transform.normalize(lsj.transform_image(image, g, jitter.fill),
                                                config)[None], size, size,
                            np.asarray([[h0, w0]], np.int32))
    rles = [record["mask_rles"][i] for i in index]
    row_map, col_map = lsj.mask_maps(g)
    masks = crop_resized_masks(lsj.with_zero_border(coco_rle.decode_masks(rles, h0, w0)),
                               row_map, col_map, boxes, mask_crop_size)
    return _example(record, batch, boxes, masks, index, keep, is_crowd, flip, dropped,
                    max_instances)


def _example(record, batch, boxes, masks, index, keep, is_crowd, flip, dropped,
             max_instances) -> dict:
    """The batch fields of one prepared image, ground truth padded to `max_instances`."""
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
        "batch_valid": np.bool_(not record.get(PADDING_KEY, False)),
    }


class _Prepare(grain.transforms.RandomMap):
    """grain step: draws the flip and scale jitter from grain's per-record generator; with
    `bucketed`, pads each image into its canvas bucket (`record_buckets.record_canvas` at the
    largest `min_sizes`, so that every scale of the jitter fits), else into
    `config.canvas_size`; with `jitter` (training), large-scale jitter instead of the resize."""

    def __init__(self, config, train: bool, min_sizes: Sequence[int], flip_probability: float,
                 max_instances: int, mask_crop_size: int, bucketed: bool = False,
                 jitter: Optional[lsj.LargeScaleJitter] = None):
        self.config, self.train, self.min_sizes = config, train, tuple(min_sizes)
        self.flip_probability = flip_probability
        self.max_instances, self.mask_crop_size = max_instances, mask_crop_size
        self.bucketed, self.jitter = bucketed, jitter

    def random_map(self, record, rng: np.random.Generator):
        if self.train and self.jitter is not None:
            scale = lsj.draw_scale(self.jitter, rng.random())
            crop_draw = float(rng.random())
            flip = bool(rng.random() < self.flip_probability)
            return prepare_lsj_example(record, self.config, self.jitter, scale=scale,
                                       crop_draw=crop_draw, flip=flip,
                                       max_instances=self.max_instances,
                                       mask_crop_size=self.mask_crop_size)
        if self.train:  # torchvision: random choice of min_size in training, the last one else
            min_size = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
            flip = bool(rng.random() < self.flip_probability)
        else:
            min_size, flip = self.min_sizes[-1], False
        canvas = None
        if self.bucketed:
            h, w = (int(v) for v in np.asarray(record["original_size"]).reshape(2))
            canvas = record_canvas(h, w, self.config, max(self.min_sizes))
        return prepare_example(record, self.config, min_size=min_size, flip=flip,
                               max_instances=self.max_instances,
                               mask_crop_size=self.mask_crop_size, canvas_size=canvas)


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
                 shard_options: Optional[grain.sharding.ShardOptions] = None,
                 global_batch_size: Optional[int] = None, start_record: int = 0,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 jitter: Optional[lsj.LargeScaleJitter] = None) -> grain.DataLoader:
    """A grain `DataLoader` of batches (`BATCH_FIELDS`) from a random-access data source.

    Args:
      source: e.g. `builders.load('shapes', data_dir, 'train')`.
      config: model config (`min_size` int or tuple, `max_size`, `canvas_size`,
        `size_divisible`, `image_mean`, `image_std`).
      batch_size: images per batch on this process.
      train: shuffle, flip, scale jitter, repeat forever (unless `num_epochs`), drop the last
        short batch; this process's slice of one global sequence
        (`samplers.GlobalBatchSampler`). When the config has several `canvas_buckets`, each
        global batch is of one bucket (images padded into it: one compiled train step per
        bucket), grouped as torchvision's aspect-ratio grouping; else every image is padded
        into `config.canvas_size`.
        Otherwise: in order, one epoch, the last batch padded (`batch_valid`), in
        `config.canvas_size`.
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
      shard_options: evaluation only; default `ShardByJaxProcess`: each JAX process reads its
        own shard (`evaluation.evaluate` passes `NoSharding` with an
        `eval_shards.PaddedShard` source).
      global_batch_size: training: G (default `batch_size * process_count`); `batch_size` must
        be `G / process_count`.
      start_record: training: global positions already consumed (resume: step * G).
      process_index, process_count: training: this process's slice (default JAX's).
      jitter: training: large-scale jitter (`data.lsj`) into one `jitter.size` square canvas
        instead of the resize to `min_sizes` (which evaluation keeps using).

    Returns:
      A `grain.DataLoader`; `iter(loader)` has `get_state()` / `set_state(state)`.
    """
    if min_sizes is None:
        min_sizes = config.min_size
    min_sizes = (min_sizes,) if isinstance(min_sizes, (int, np.integer)) else tuple(min_sizes)
    if train:
        if shard_options is not None:
            raise ValueError("shard_options is for evaluation; training reads its slice of the "
                             "global sequence (process_index, process_count)")
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size is None:
            global_batch_size = batch_size * process_count
        if global_batch_size != batch_size * process_count:
            raise ValueError(f"batch_size {batch_size} per process x {process_count} processes "
                             f"!= global_batch_size {global_batch_size}")
        buckets = canvases(config)
        bucketed = len(buckets) > 1 and jitter is None
        groups = None
        if bucketed:  # one canvas per global batch: group the records by canvas bucket
            from maskrcnn_jax.data import builders

            _, sizes = builders.image_ids_and_sizes(source)
            canvas_index = {b: i for i, b in enumerate(buckets)}
            groups = np.empty(len(source), np.int64)
            for canvas, positions in bucket_positions(sizes, config, max(min_sizes)).items():
                groups[positions] = canvas_index[canvas]
        sampler = GlobalBatchSampler(len(source), global_batch_size, process_index, process_count,
                                     seed, start_record, worker_count, num_epochs, groups)
    else:
        bucketed = False  # evaluation: `evaluation.evaluate` runs one loader per bucket
        if shard_options is None:
            shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=False)
        sampler = grain.samplers.IndexSampler(
            num_records=len(source), shard_options=shard_options, shuffle=False,
            num_epochs=num_epochs if num_epochs is not None else 1, seed=seed)
    operations = [
        _Prepare(config, train, min_sizes, flip_probability, max_instances, mask_crop_size,
                 bucketed, jitter),
        grain.transforms.Batch(batch_size, drop_remainder=train,
                               batch_fn=_stack_padded(batch_size)),
    ]
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags, which only `absl.app.run` parses; outside
        # of it, use the defaults (as `app.run` without command-line flags would).
        flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=worker_count)
