"""COCO evaluation of a Mask R-CNN on a data source (bbox and segm AP with pycocotools).

    metrics = evaluate(config, variables, builders.load('shapes', data_dir, 'validation'),
                       workdir='/tmp/eval')
    metrics['bbox/AP'], metrics['segm/AP50']

Inference runs batched through one jit-compiled function over the input pipeline's eval batches,
sharded over every device of every process (a `('data',)` mesh). Each image goes to the
smallest canvas of `config.canvas_buckets` that holds it (as `Predictor`; one compiled
function per canvas used): the buckets are planned from the records' sizes, the same on every
process, and each JAX process reads its own contiguous share of each bucket
(`eval_shards.PaddedShard`: every share padded to the same length with masked images, so every
process runs the same batches of the same canvas). The detections are gathered to process 0
and put back in split order, one COCOeval runs there and its metrics are broadcast, so the
metrics are those of a single-process run. Detections are mapped back to original-image
pixels on the host as `Predictor` does (`transform.resize_boxes`; each mask pasted within its
box's extent only, `pasted_mask_rles`, never as a full-image array) and converted to COCO
results as torchvision's reference `coco_eval.py` does (masks thresholded at 0.5 and
RLE-encoded, boxes as xywh, contiguous labels mapped back to the data set's category ids).
"""

import copy
import functools
import json
import logging
import os
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maskrcnn_jax.data.transform import pasted_crops, resize_boxes
from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen

log = logging.getLogger(__name__)

# COCOeval.stats order (`COCOeval.summarize`): AP over IoU .5:.95, at .5, at .75, by area
# (small/medium/large), then AR at 1/10/100 detections and by area.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")

def label_to_category_map(categories: Sequence[Mapping]) -> dict[int, int]:
    """`{contiguous label: category id}` from `builders.categories(source)` entries."""
    return {int(c["label"]): int(c["id"]) for c in categories}


def detections_to_coco(image_id: int, boxes, scores, labels, masks,
                       label_to_category: Mapping[int, int],
                       mask_threshold: float = 0.5) -> list[dict]:
    """One image's detections -> COCO result dicts (as torchvision's reference `coco_eval.py`).

    Args:
      image_id: the image's COCO id.
      boxes: `(N, 4)` float `(x1, y1, x2, y2)` in original-image pixels (no padding entries).
      scores: `(N,)` float.
      labels: `(N,)` int contiguous labels 1..K.
      masks: `(N, H, W)` or `(N, 1, H, W)` float mask probabilities pasted in the original
        image, or None for box results only.
      label_to_category: contiguous label -> data set category id (`label_to_category_map`).
      mask_threshold: a pixel is in the mask when its probability is > this.

    Returns:
      `N` dicts `{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}` plus
      `'segmentation': {'size': [H, W], 'counts': str}` (COCO RLE) when masks are given.

    Raises:
      KeyError: for a label that has no category.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    # xyxy -> xywh in float32 (torchvision subtracts the float32 tensors), then Python floats.
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
    results = []
    for i in range(len(boxes)):
        label = int(labels[i])
        if label not in label_to_category:
            raise KeyError(f"label {label} has no category; known labels {sorted(label_to_category)}")
        results.append({"image_id": int(image_id), "category_id": label_to_category[label],
                        "bbox": xywh[i], "score": float(scores[i])})
    if masks is not None and len(results):
        masks = np.asarray(masks)
        masks = masks.reshape(len(results), *masks.shape[-2:])
        for result, rle in zip(results, encode_masks(masks > mask_threshold)):
            result["segmentation"] = rle
    return results


def encode_masks(binary_masks: np.ndarray) -> list[dict]:
    """`(N, H, W)` bool masks -> COCO RLEs `{'size': [H, W], 'counts': str}` (JSON-ready)."""
    from pycocotools import mask as mask_utils

    if len(binary_masks) == 0:
        return []
    # pycocotools encodes (H, W, N) column-major uint8.
    rles = mask_utils.encode(np.asfortranarray(np.transpose(binary_masks, (1, 2, 0)).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("utf-8")
    return rles


# COCOeval implementations `coco_evaluate` can run: pycocotools (the reference) and
# faster-coco-eval (a C++ COCOeval, `pip install faster-coco-eval`; the same 12 stats).
COCO_BACKENDS = ("pycocotools", "faster_coco_eval")


def pasted_mask_rles(mask_probs, boxes, image_size, mask_threshold: float = 0.5) -> list[dict]:
    """COCO RLEs of `transform.paste_masks(mask_probs, boxes, image_size) > mask_threshold`
    (what `detections_to_coco` encodes), computed from each box's extent alone: the full-image
    masks are never built (`transform.pasted_crops`), so the cost is the boxes' area, not
    `N x H x W`.

    Args:
      mask_probs: `(N, M, M)` float mask probabilities on their boxes.
      boxes: `(N, 4)` float `(x1, y1, x2, y2)` in original-image pixels.
      image_size: `(H, W)` of the original image.

    Returns:
      `N` RLEs `{'size': [H, W], 'counts': str}`, equal to `encode_masks` of the pasted masks.
    """
    from pycocotools import mask as mask_utils

    height, width = int(image_size[0]), int(image_size[1])
    counts = [[height * width] for _ in range(len(mask_probs))]
    for i, (y0, _, x0, _), crop in pasted_crops(mask_probs, boxes, image_size):
        counts[i] = _column_major_counts(crop > mask_threshold, y0, x0, height, width)
    if not counts:
        return []
    rles = mask_utils.frPyObjects([{"size": [height, width], "counts": c} for c in counts],
                                  height, width)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("utf-8")
    return rles


def _column_major_counts(binary: np.ndarray, y0: int, x0: int, height: int,
                         width: int) -> list[int]:
    """Uncompressed COCO RLE counts (run lengths of 0s and 1s alternating, from a 0-run, in
    column-major order, as `pycocotools.mask.encode`) of a `(height, width)` mask that is
    `binary` at `[y0:, x0:]` and 0 elsewhere."""
    # Per crop column, +1 / -1 where a run of 1s starts / ends (zero rows padded around it);
    # nonzero() walks the columns in order: the image's column-major order.
    edges = np.diff(np.pad(binary.T.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    cols, rows = np.nonzero(edges)
    index = (x0 + cols) * height + y0 + rows  # start, end, start, end, ... (end exclusive)
    # A run reaching a column's last row and one starting at the next column's first row are
    # one run in column-major order.
    joined = np.flatnonzero(index[1:-1:2] == index[2::2])
    index = np.delete(index, np.concatenate([2 * joined + 1, 2 * joined + 2]))
    counts = np.diff(np.concatenate([[0], index, [height * width]])).tolist()
    if len(counts) > 1 and counts[-1] == 0:  # ends with a 1-run: no trailing 0-run
        counts.pop()
    return counts


def coco_evaluate(ground_truth, results: Sequence[dict], iou_type: str,
                  image_ids: Optional[Sequence[int]] = None, verbose: bool = True,
                  backend: str = "pycocotools") -> dict:
    """`COCOeval` of COCO result dicts; `{'AP': ..., 'AP50': ..., ...}` (12 stats).

    Args:
      ground_truth: a pycocotools `COCO` (e.g. `builders.coco_ground_truth(source)`).
      results: result dicts (`detections_to_coco`); for 'bbox' their boxes are used, for 'segm'
        their masks (the area ranges then use the mask areas, as torchvision's reference and
        detectron2, not the box areas `loadRes` would take when both are present).
      iou_type: 'bbox' or 'segm'.
      image_ids: evaluate these images only (default: every ground-truth image).
      verbose: print the implementation's progress and the 12-line summary.
      backend: 'pycocotools' or 'faster_coco_eval' (`COCO_BACKENDS`; the latter must be
        installed: the `fast-eval` extra).

    An empty `results` gives AP and AR 0 (an image set with no ground truth gives -1).

    Raises:
      ValueError: for an unknown backend; ImportError (naming the package) when the backend
        is not installed.
    """
    import contextlib
    import io

    if backend not in COCO_BACKENDS:
        raise ValueError(f"COCO evaluation backend {backend!r}: choose from {COCO_BACKENDS}")
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as COCOeval
        except ImportError as e:
            raise ImportError("the faster_coco_eval backend needs `pip install faster-coco-eval` "
                              "(the fast-eval extra)") from e
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth.dataset)
        gt.createIndex()
        ground_truth = gt
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

    drop = "segmentation" if iou_type == "bbox" else "bbox"
    results = [{k: v for k, v in r.items() if k != drop} for r in results]  # loadRes mutates
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        if results:
            detections = ground_truth.loadRes(results)
        else:  # loadRes reads results[0]: build the empty result set directly
            detections = COCO()
            detections.dataset = {"images": copy.deepcopy(ground_truth.dataset["images"]),
                                  "categories": copy.deepcopy(ground_truth.dataset["categories"]),
                                  "annotations": []}
            detections.createIndex()
        options = {} if backend == "pycocotools" else {"print_function": print}
        evaluator = COCOeval(ground_truth, detections, iou_type, **options)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        if verbose:
            print(f"IoU metric: {iou_type}")
        evaluator.summarize()
    return {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}


@functools.lru_cache(maxsize=4)
def inference_fn(config, mesh: Optional[Mesh] = None):
    """The jit-compiled `MaskRCNN(config).apply`, shared by every evaluation of an equal config
    (a FrozenConfigDict) and mesh, so repeated evaluations (e.g. during training) compile once.
    With a mesh: variables replicated, images and outputs sharded on 'data'."""
    apply = MaskRCNN(config).apply
    if mesh is None:
        return jax.jit(apply)
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(apply, in_shardings=(replicated, data, data, data), out_shardings=data)


def eval_mesh() -> Mesh:
    """A 1-D `('data',)` mesh over every device of every process (process-major order, so each
    process's devices hold a contiguous block of the global batch)."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def gather_to_process_zero(items: list) -> Optional[list]:
    """Process 0: the JSON-serialisable `items` of every process, concatenated in process
    order; other processes: None. One process: `items` itself. (Two all-gathers of the
    zlib-compressed JSON: the byte counts, then the bytes padded to the longest.)"""
    if jax.process_count() == 1:
        return items
    import zlib

    from jax.experimental import multihost_utils

    payload = np.frombuffer(zlib.compress(json.dumps(items).encode()), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([payload.size], np.int64)))
    sizes = sizes.reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    if jax.process_index() != 0:
        return None
    merged = []
    for p, size in enumerate(sizes):
        merged += json.loads(zlib.decompress(gathered[p, :int(size)].tobytes()).decode())
    return merged


def broadcast_from_process_zero(metrics: Optional[dict], keys: Sequence[str]) -> dict:
    """Process 0's `{key: float}` on every process (float64, so the values are bit-identical)."""
    if jax.process_count() == 1:
        return metrics
    from jax.experimental import multihost_utils

    values = (np.asarray([metrics[k] for k in keys], np.float64) if jax.process_index() == 0
              else np.zeros(len(keys), np.float64))
    # As bytes: without jax_enable_x64 a float64 array would travel as float32.
    raw = np.asarray(multihost_utils.broadcast_one_to_all(values.view(np.uint8)), np.uint8)
    return {k: float(v) for k, v in zip(keys, raw.view(np.float64))}


class _FirstImages:
    """The first `n` records of a random-access data source (for `max_images`)."""

    def __init__(self, source, n: int):
        self.source, self.n = source, min(int(n), len(source))

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.source[index]


def evaluate(model_config, variables, source, *, batch_size: int = 8,
             workdir: Optional[str] = None, max_images: Optional[int] = None,
             progress: bool = True, mesh: Optional[Mesh] = None,
             coco_backend: str = "pycocotools") -> dict:
    """COCO bbox and segm metrics of a model on a data source, on every device of every process.

    Every process must call it (the batches are global arrays and the detections are
    gathered); each reads its own shard of the split. Process 0 runs COCOeval and writes the
    files; every process returns the same metrics.

    Args:
      model_config: the model config (`maskrcnn_jax.config.model_config`); its `min_size` (the
        last one when a tuple) and `max_size` set the eval resize, as torchvision.
      variables: `{'params': ..., 'batch_stats': ...}` of `MaskRCNN(model_config)`.
      source: a data source of one split (`builders.load(...)`); its categories and ground
        truth (`builders.categories`, `builders.coco_ground_truth`) are used.
      batch_size: images per device per compiled call: a call takes `batch_size` x the
        number of devices images (the last batches are padded with masked images).
      workdir: if given, `detections.json` (COCO results) and `metrics.json` are written there
        (by process 0).
      max_images: evaluate the first `max_images` images only.
      progress: show a tqdm progress bar (process 0) and print pycocotools' summaries.
      mesh: a 1-D `('data',)` mesh (default `eval_mesh()`: every device of every process).
      coco_backend: the COCOeval that computes the metrics (`COCO_BACKENDS`, see
        `coco_evaluate`): 'pycocotools' or the faster, equal 'faster_coco_eval'.

    Returns:
      `{'bbox/AP': ..., 'bbox/AP50': ..., ..., 'segm/ARl': ...}`: the 12 `COCOeval` stats of
      each IoU type as floats in 0..1 (-1 where pycocotools has nothing to average).
    """
    import grain
    from tqdm import tqdm

    from maskrcnn_jax.data import builders, eval_shards, pipeline, record_buckets

    if batch_size < 1:
        raise ValueError(f"batch_size (images per device) must be >= 1, got {batch_size}")
    if coco_backend not in COCO_BACKENDS:  # before the long inference, not after it
        raise ValueError(f"coco_backend {coco_backend!r}: choose from {COCO_BACKENDS}")
    config = frozen(model_config)
    mesh = eval_mesh() if mesh is None else mesh
    if mesh.axis_names != ("data",):
        raise ValueError(f"expected a 1-D ('data',) mesh, got axes {mesh.axis_names}")
    forward = inference_fn(config, mesh)
    variables = _replicated(variables, mesh)
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    local_batch = batch_size * local_devices
    label_to_category = label_to_category_map(builders.categories(source))
    data = source if max_images is None else _FirstImages(source, max_images)
    num_images = len(data)
    # Every process plans the same buckets from the records' sizes (no image decoded), then
    # reads its share of each bucket: the same batches per bucket on every process.
    split_ids, sizes = builders.image_ids_and_sizes(source, num_images)
    buckets = record_buckets.bucket_positions(sizes, config)
    shards = {canvas: eval_shards.PaddedShard(data, jax.process_index(), jax.process_count(),
                                              positions)
              for canvas, positions in buckets.items()}
    results, image_ids = [], []
    pending = None
    show = progress and jax.process_index() == 0
    bar = tqdm(total=sum(len(s) for s in shards.values()), desc="evaluate", unit="img",
               disable=not show)
    for canvas, shard in shards.items():
        # Ground-truth slots are not used here: keep their mask crops tiny. NoSharding: the
        # shard is this process's already.
        loader = pipeline.make_dataset(shard, _with_canvas(config, canvas),
                                       batch_size=local_batch, train=False, max_instances=128,
                                       mask_crop_size=4, shard_options=grain.sharding.NoSharding())
        # Dispatch a batch before finishing the previous one: host post-processing overlaps
        # the device computation (jax dispatch is asynchronous). One compiled function per
        # canvas (the images' shape).
        for batch in loader:
            inputs = [_shard_local(batch[k], mesh) for k in ("images", "image_sizes",
                                                             "padded_sizes")]
            out = forward(variables, *inputs)
            if pending is not None:
                results += _finish_batch(*pending, label_to_category, image_ids, bar)
            pending = (out, batch)
    if pending is not None:
        results += _finish_batch(*pending, label_to_category, image_ids, bar)
    bar.close()

    # Shards are contiguous and gathered in process order: the split's order, as one process.
    all_results = gather_to_process_zero(results)
    all_ids = gather_to_process_zero(image_ids)
    keys = [f"{t}/{name}" for t in IOU_TYPES for name in STAT_NAMES]
    metrics = None
    if jax.process_index() == 0:
        if len(all_ids) != num_images or len(set(all_ids)) != num_images:
            raise RuntimeError(f"evaluated {len(all_ids)} images ({len(set(all_ids))} distinct), "
                               f"expected the {num_images} of the split once each")
        # Buckets and shards reorder the images: back to the split's order (each image's
        # detections in their own order, a stable sort), as one process with one canvas.
        position = {int(image_id): k for k, image_id in enumerate(split_ids)}
        all_results.sort(key=lambda r: position[r["image_id"]])
        all_ids.sort(key=position.__getitem__)
        ground_truth = builders.coco_ground_truth(source)
        metrics = {}
        for iou_type in IOU_TYPES:
            stats = coco_evaluate(ground_truth, all_results, iou_type, image_ids=all_ids,
                                  verbose=progress, backend=coco_backend)
            metrics.update({f"{iou_type}/{name}": value for name, value in stats.items()})
        log.info("evaluated %d images on %d devices (%d processes), %d detections: bbox AP "
                 "%.4f, segm AP %.4f", len(all_ids), mesh.devices.size, jax.process_count(),
                 len(all_results), metrics["bbox/AP"], metrics["segm/AP"])
        if workdir is not None:
            os.makedirs(workdir, exist_ok=True)
            with open(os.path.join(workdir, "detections.json"), "w") as f:
                json.dump(all_results, f)
            with open(os.path.join(workdir, "metrics.json"), "w") as f:
                json.dump({**metrics, "num_images": len(all_ids),
                           "num_detections": len(all_results)}, f, indent=2, sort_keys=True)
    return broadcast_from_process_zero(metrics, keys)


def _with_canvas(config, canvas):
    """`config` whose `canvas_size` (what the input pipeline pads into) is `canvas`."""
    values = config.to_dict()
    values["canvas_size"] = tuple(canvas)
    return frozen(values)


def _replicated(variables, mesh: Mesh):
    """Variables replicated on every device of `mesh`: arrays already so stay on device; others
    (host arrays, or arrays on one local device, e.g. restored by `load_checkpoint`) go through
    the host, since every process puts its own copy (no cross-host transfer)."""
    target = NamedSharding(mesh, P())

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim):
            return x
        return jax.device_put(np.asarray(x), target)

    return jax.tree.map(put, variables)


def _shard_local(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's rows -> a global array sharded on 'data' (its devices' block)."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")),
                                                  np.asarray(array))


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a global array sharded on its leading axis, in order."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def _finish_batch(out, batch, label_to_category, image_ids, bar) -> list[dict]:
    """COCO results of the real images of a batch (as `Predictor._finish`, plus encoding: each
    mask thresholded and RLE-encoded from its box's extent, `pasted_mask_rles`)."""
    out = {k: _local_rows(v) for k, v in out.items()}
    results = []
    for i in np.flatnonzero(batch["batch_valid"]):
        n = int(out["valid"][i].sum())  # detections are packed first, padding after
        image_id = int(batch["image_ids"][i])
        original = tuple(int(v) for v in batch["original_sizes"][i])
        boxes = resize_boxes(out["boxes"][i, :n], batch["image_sizes"][i], original)
        image_results = detections_to_coco(image_id, boxes, out["scores"][i, :n],
                                           out["labels"][i, :n], None, label_to_category)
        for result, rle in zip(image_results,
                               pasted_mask_rles(out["mask_probs"][i, :n], boxes, original)):
            result["segmentation"] = rle
        results += image_results
        image_ids.append(image_id)
        bar.update(1)
    return results
