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
dropped. Batches are dicts of NumPy arrays (`BATCH_FIELDS`). Shuffling and all randomness come
from grain's sampler and seed, so a run is deterministic for a seed and an iterator's
`get_state()` / `set_state()` resumes it exactly.

Training reads one global sequence, whatever the number of processes (`GlobalBatchSampler`):
record positions are shuffled over the whole split with the seed, global batch `s` is positions
`s * G .. (s + 1) * G - 1` and process `p` of `P` reads its slice `p * G / P .. (p + 1) * G / P - 1`
of it, each position with its own random draws (flip, scale). So the global batch of every step
(and its augmentation) is the same with 1 process or N, no position is read by two processes,
and a run resumes from the number of records consumed alone (`start_record`), also with another
process count. Evaluation: `PaddedShard` gives every process an equal-length contiguous shard
(of each canvas bucket's records, `record_buckets.bucket_positions`).
"""

import logging
import sys
import threading
from typing import Optional, Sequence

import grain
import numpy as np
from absl import flags

from maskrcnn_jax.canvas import canvases
from maskrcnn_jax.data import coco, transform
from maskrcnn_jax.data.record_buckets import bucket_positions, record_canvas
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
        "batch_valid": np.bool_(not record.get(PADDING_KEY, False)),
    }


class _Prepare(grain.transforms.RandomMap):
    """grain step: draws the flip and scale jitter from grain's per-record generator; with
    `bucketed`, pads each image into its canvas bucket (`record_buckets.record_canvas` at the
    largest `min_sizes`, so that every scale of the jitter fits), else into
    `config.canvas_size`."""

    def __init__(self, config, train: bool, min_sizes: Sequence[int], flip_probability: float,
                 max_instances: int, mask_crop_size: int, bucketed: bool = False):
        self.config, self.train, self.min_sizes = config, train, tuple(min_sizes)
        self.flip_probability = flip_probability
        self.max_instances, self.mask_crop_size = max_instances, mask_crop_size
        self.bucketed = bucketed

    def random_map(self, record, rng: np.random.Generator):
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


# Set in the records `PaddedShard` repeats to fill a shard: their examples get batch_valid=False.
PADDING_KEY = "is_padding"


class GlobalBatchSampler:
    """grain sampler of this process's slice of every global training batch.

    Position `g` of the global sequence is record `IndexSampler(shuffle=True, seed)[g]` (a new
    permutation every epoch) with the random generator grain gives that position, so the
    sequence does not depend on the process count. This process (`process_index` of
    `process_count`) reads, for global batch `s`, positions `start_record + s * G + p * L + r`,
    `r < L = G / process_count`. grain's worker `w` of `W` takes the loader's indices
    `w, w + W, ...` and batches its own records, so loader index `j` is mapped through
    `(worker, batch of that worker, row)` such that the loader's `k`-th batch is global batch
    `k` whatever the worker count.

    With `groups` (a group, e.g. a canvas bucket, per record), every global batch holds
    records of one group, as torchvision's `GroupedBatchSampler`: the global sequence's
    positions are taken in order, each joins its record's group, and a group that has G
    positions becomes the next global batch (`GroupedBatches`). It is still one sequence of
    global batches whatever the process count, and global batch `s` is a function of `s`
    alone (so `start_record = s * G` resumes it).

    Args:
      num_records: records in the split.
      global_batch_size: G, a multiple of `process_count`.
      process_index, process_count: this process and how many read the sequence.
      seed: shuffling and per-position random draws.
      start_record: positions already consumed (a resumed run: step * G).
      worker_count: the DataLoader's (0: in-process).
      num_epochs: None (forever) or the number of passes; then only whole global batches.
      groups: `(num_records,)` int group of each record, or None (no grouping).
    """

    def __init__(self, num_records: int, global_batch_size: int, process_index: int,
                 process_count: int, seed: int, start_record: int = 0, worker_count: int = 0,
                 num_epochs: Optional[int] = None, groups: Optional[Sequence[int]] = None):
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} must be a positive multiple "
                             f"of the process count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process index {process_index} not in [0, {process_count})")
        if start_record < 0:
            raise ValueError(f"start_record must be >= 0, got {start_record}")
        self.num_records, self.global_batch_size = int(num_records), int(global_batch_size)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.global_batch_size // self.process_count
        self.seed, self.start_record = int(seed), int(start_record)
        self.workers = max(int(worker_count), 1)
        # grain's DataLoader reads the sampler's own sharding: none, the slice is ours.
        self._shard_options = grain.sharding.NoSharding()
        self._global = grain.samplers.IndexSampler(num_records=self.num_records, shuffle=True,
                                                   seed=self.seed)
        self._grouped = None
        if groups is not None:
            if len(groups) != self.num_records:
                raise ValueError(f"{len(groups)} groups for {self.num_records} records")
            if self.start_record % self.global_batch_size:
                raise ValueError(f"grouped batches resume at a whole global batch: start_record "
                                 f"{start_record} is not a multiple of {global_batch_size}")
            self._grouped = GroupedBatches(self._global, np.asarray(groups),
                                           self.global_batch_size)
        self._len = None
        if num_epochs is not None:
            if self._grouped is None:
                total = (num_epochs * self.num_records) // self.global_batch_size
            else:  # the global batches complete within the epochs' positions
                total = self._grouped.batches_within(num_epochs * self.num_records)
            steps = total - self.start_record // self.global_batch_size
            self._len = max(steps, 0) * self.local_batch_size

    def __len__(self) -> int:
        return sys.maxsize if self._len is None else self._len

    def global_position(self, index: int) -> int:
        """The global sequence position that loader index `index` reads."""
        worker, q = index % self.workers, index // self.workers
        batch_of_worker, row = divmod(q, self.local_batch_size)
        step = batch_of_worker * self.workers + worker
        offset = self.process_index * self.local_batch_size + row
        if self._grouped is not None:
            return int(self._grouped.batch(self.start_record // self.global_batch_size
                                           + step)[offset])
        return self.start_record + step * self.global_batch_size + offset

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0 or (self._len is not None and index >= self._len):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        metadata = self._global[self.global_position(index)]
        return grain.RecordMetadata(index=index, record_key=metadata.record_key,
                                    rng=metadata.rng)

    def __repr__(self) -> str:
        return (f"GlobalBatchSampler(num_records={self.num_records}, "
                f"global_batch_size={self.global_batch_size}, process_index={self.process_index}, "
                f"process_count={self.process_count}, seed={self.seed}, "
                f"start_record={self.start_record}, workers={self.workers})")


class GroupedBatches:
    """Global batches of one group each, cut from the global sequence (torchvision's
    `GroupedBatchSampler` over an endless sequence): positions 0, 1, 2, ... are taken in
    order, each appended to its record's group; a group holding `batch_size` positions becomes
    the next batch. Batches are computed on demand, in order, and kept.

    Args:
      sequence: the global sequence: `sequence[position].record_key` (a grain sampler).
      groups: `(num_records,)` group of each record.
      batch_size: positions per batch.
    """

    def __init__(self, sequence, groups: np.ndarray, batch_size: int):
        self.sequence, self.groups, self.batch_size = sequence, np.asarray(groups), batch_size
        self._pending: dict = {}
        self._batches: list = []
        self._next = 0
        self._lock = threading.Lock()  # grain reads records (and so batches) from many threads

    def __getstate__(self):  # grain's worker processes get a copy (a lock does not pickle)
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _advance(self):
        """Read positions until one more batch is complete."""
        count = len(self._batches)
        while len(self._batches) == count:
            position = self._next
            self._next += 1
            group = int(self.groups[self.sequence[position].record_key])
            members = self._pending.setdefault(group, [])
            members.append(position)
            if len(members) == self.batch_size:
                self._batches.append(np.asarray(members, np.int64))
                members.clear()

    def batch(self, index: int) -> np.ndarray:
        """`(batch_size,)` global positions of batch `index`."""
        with self._lock:
            while len(self._batches) <= index:
                self._advance()
            return self._batches[index]

    def batches_within(self, num_positions: int) -> int:
        """How many batches are complete using positions `< num_positions` only."""
        count = 0
        while self.batch(count)[-1] < num_positions:
            count += 1
        return count


def position_state(records_consumed: int) -> bytes:
    """The training data position to checkpoint (JSON bytes): the global positions consumed.
    With `GlobalBatchSampler` it is the whole iterator state of every process."""
    import json

    return json.dumps({"records_consumed": int(records_consumed)}).encode()


def records_consumed(data_state: bytes, step: int, global_batch_size: int) -> int:
    """The global positions consumed by a checkpoint's data state (`position_state`); for a
    state of grain's own iterator (checkpoints written before `GlobalBatchSampler`),
    `step * global_batch_size` (the same position, another shuffle order), with a warning."""
    import json

    state = json.loads(data_state)
    if "records_consumed" in state:
        return int(state["records_consumed"])
    log.warning("data state of an older checkpoint (grain's iterator state): resuming at record "
                "%d of the global sequence, not in its old order", step * global_batch_size)
    return int(step) * int(global_batch_size)


def shard_bounds(num_records: int, process_index: int, process_count: int) -> tuple[int, int]:
    """`[start, end)` of a process's contiguous eval shard (grain's `even_split`: the first
    `num_records % process_count` shards hold one record more)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} not in [0, {process_count})")
    per_shard, extra = divmod(int(num_records), int(process_count))
    start = per_shard * process_index + min(process_index, extra)
    return start, start + per_shard + (process_index < extra)


class PaddedShard:
    """This process's contiguous share of a data source's records (`shard_bounds` of
    `positions`, default every record in order), padded to `ceil(len(positions) / P)` records by
    repeating record `positions[0]` marked `PADDING_KEY` (its example has batch_valid=False), so
    every process reads the same number of batches. With the positions of one canvas bucket
    (`record_buckets.bucket_positions`) the padding fits that canvas too."""

    def __init__(self, source, process_index: int, process_count: int,
                 positions: Optional[Sequence[int]] = None):
        positions = np.arange(len(source)) if positions is None else np.asarray(positions, np.int64)
        if len(positions) == 0:
            raise ValueError("cannot shard an empty data source")
        self.source = source
        self.start, self.end = shard_bounds(len(positions), process_index, process_count)
        self.positions = positions[self.start:self.end]
        self.padding = int(positions[0])
        self.length = -(-len(positions) // process_count)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        if index < len(self.positions):
            return self.source[int(self.positions[index])]
        return {**self.source[self.padding], PADDING_KEY: True}

    def __repr__(self):
        return f"PaddedShard({self.source!r}, [{self.start}, {self.end}), length={self.length})"


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
                 process_index: Optional[int] = None, process_count: Optional[int] = None
                 ) -> grain.DataLoader:
    """A grain `DataLoader` of batches (`BATCH_FIELDS`) from a random-access data source.

    Args:
      source: e.g. `builders.load('shapes', data_dir, 'train')`.
      config: model config (`min_size` int or tuple, `max_size`, `canvas_size`,
        `size_divisible`, `image_mean`, `image_std`).
      batch_size: images per batch on this process.
      train: shuffle, flip, scale jitter, repeat forever (unless `num_epochs`), drop the last
        short batch; this process's slice of one global sequence (`GlobalBatchSampler`). When
        the config has several `canvas_buckets`, each global batch is of one bucket (images
        padded into it: one compiled train step per bucket), grouped as torchvision's
        aspect-ratio grouping; else every image is padded into `config.canvas_size`.
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
        own shard (`evaluation.evaluate` passes `NoSharding` with a `PaddedShard` source).
      global_batch_size: training: G (default `batch_size * process_count`); `batch_size` must
        be `G / process_count`.
      start_record: training: global positions already consumed (resume: step * G).
      process_index, process_count: training: this process's slice (default JAX's).

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
        bucketed = len(buckets) > 1
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
                 bucketed),
        grain.transforms.Batch(batch_size, drop_remainder=train,
                               batch_fn=_stack_padded(batch_size)),
    ]
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags, which only `absl.app.run` parses; outside
        # of it, use the defaults (as `app.run` without command-line flags would).
        flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=worker_count)
