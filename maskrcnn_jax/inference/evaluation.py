"""COCO evaluation (box and mask AP) of a Mask R-CNN on a data source split.

    metrics = evaluate(config, variables, builders.load('shapes', data_dir, 'validation'),
                       workdir='/tmp/eval')
    metrics['bbox/AP'], metrics['segm/AP50']

Inference runs batched through the compiled network (`runtime.compiled`, shared with
`Predictor`) over the input pipeline's eval batches, split over every device of every process
(a `('data',)` mesh). Each image goes to the smallest canvas of `config.canvas_buckets` that
holds it (as `Predictor`; one compiled function per canvas used): the buckets are planned from
the records' sizes, the same on every process, and each JAX process reads its own contiguous
share of each bucket (`eval_shards.PaddedShard`: every share padded to the same length with masked
images, so every process runs the same batches of the same canvas). The detections are
gathered to process 0 and put back in split order, one COCOeval runs there and its metrics are
broadcast, so the metrics are those of a single-process run. Detections are mapped back to
original-image pixels on the host as `Predictor` does (`transform.resize_boxes`; each mask
pasted within its box's extent only, `coco_results.pasted_mask_rles`, never as a full-image
array) and converted to COCO results as torchvision's reference `coco_eval.py` does.
"""

import logging
import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh

from maskrcnn_jax import files, runtime
from maskrcnn_jax.data.transform import resize_boxes
from maskrcnn_jax.errors import InputError
from maskrcnn_jax.inference.coco_results import (
    COCO_BACKENDS,
    IOU_TYPES,
    STAT_NAMES,
    coco_evaluate,
    detections_to_coco,
    label_to_category_map,
    pasted_mask_rles,
)
from maskrcnn_jax.inference.runner import compiled_detector, run_pipelined
from maskrcnn_jax.models.maskrcnn import frozen

log = logging.getLogger(__name__)


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
        (by process 0), each whole or not at all, after the evaluation succeeded: a failed
        run leaves the files of an earlier one as they were.
      max_images: evaluate the first `max_images` (>= 1) images only.
      progress: show a tqdm progress bar (process 0) and print pycocotools' summaries.
      mesh: a 1-D `('data',)` mesh (default `runtime.data_mesh()`: every device of every
        process).
      coco_backend: the COCOeval that computes the metrics (`COCO_BACKENDS`, see
        `coco_evaluate`): 'pycocotools' or the faster, equal 'faster_coco_eval'.

    Returns:
      `{'bbox/AP': ..., 'bbox/AP50': ..., ..., 'segm/ARl': ...}`: the 12 `COCOeval` stats of
      each IoU type as floats in 0..1 (-1 where pycocotools has nothing to average).

    Raises:
      ValueError: `batch_size` or `max_images` < 1, an unknown `coco_backend`.
      InputError: `source` has no images (nothing evaluated, nothing written).
    """
    import grain
    from tqdm import tqdm

    from maskrcnn_jax.data import builders, eval_shards, pipeline, record_buckets

    if batch_size < 1:
        raise ValueError(f"batch_size (images per device) must be >= 1, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if coco_backend not in COCO_BACKENDS:  # before the long inference, not after it
        raise ValueError(f"coco_backend {coco_backend!r}: choose from {COCO_BACKENDS}")
    config = frozen(model_config)
    mesh = runtime.data_mesh() if mesh is None else mesh
    if mesh.axis_names != (runtime.DATA_AXIS,):
        raise ValueError(f"expected a 1-D ('data',) mesh, got axes {mesh.axis_names}")
    forward = compiled_detector(config, mesh)
    variables = runtime.replicate(variables, mesh)
    local_batch = batch_size * runtime.local_device_count(mesh)
    label_to_category = label_to_category_map(builders.categories(source))
    data = source if max_images is None else _FirstImages(source, max_images)
    num_images = len(data)
    if num_images == 0:  # COCOeval would report -1 everywhere, as if that were a result
        raise InputError("the data set split to evaluate has no images")
    # Every process plans the same buckets from the records' sizes (no image decoded), then
    # reads its share of each bucket: the same batches per bucket on every process.
    split_ids, sizes = builders.image_ids_and_sizes(source, num_images)
    buckets = record_buckets.bucket_positions(sizes, config)
    shards = {canvas: eval_shards.PaddedShard(data, jax.process_index(), jax.process_count(),
                                              positions)
              for canvas, positions in buckets.items()}
    results, image_ids = [], []
    show = progress and runtime.is_main_process()
    bar = tqdm(total=sum(len(s) for s in shards.values()), desc="evaluate", unit="img",
               disable=not show)

    def batches():
        for canvas, shard in shards.items():
            # Ground-truth slots are not used here: keep their mask crops tiny. NoSharding: the
            # shard is this process's already. One compiled function per canvas.
            loader = pipeline.make_dataset(
                shard, _with_canvas(config, canvas), batch_size=local_batch, train=False,
                max_instances=128, mask_crop_size=4, shard_options=grain.sharding.NoSharding())
            for batch in loader:
                yield (variables, *[runtime.shard(batch[k], mesh) for k in (
                    "images", "image_sizes", "padded_sizes")]), batch

    def finish(out, batch):
        results.extend(_coco_results(out, batch, label_to_category, image_ids))
        bar.update(int(np.sum(batch["batch_valid"])))

    run_pipelined(batches(), forward, finish)
    bar.close()

    # Shards are contiguous and gathered in process order: the split's order, as one process.
    all_results = runtime.gather_to_process_zero(results)
    all_ids = runtime.gather_to_process_zero(image_ids)
    keys = [f"{t}/{name}" for t in IOU_TYPES for name in STAT_NAMES]
    metrics = None
    if runtime.is_main_process():
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
            files.write_json(os.path.join(workdir, "detections.json"), all_results)
            files.write_json(os.path.join(workdir, "metrics.json"),
                             {**metrics, "num_images": len(all_ids),
                              "num_detections": len(all_results)}, indent=2, sort_keys=True)
    return runtime.broadcast_from_process_zero(metrics, keys)


def _with_canvas(config, canvas):
    """`config` whose `canvas_size` (what the input pipeline pads into) is `canvas`."""
    values = config.to_dict()
    values["canvas_size"] = tuple(canvas)
    return frozen(values)


def _coco_results(out, batch, label_to_category, image_ids) -> list[dict]:
    """COCO results of the real images of a batch (boxes in original pixels as
    `runner.detect_in_batches`; each mask thresholded and RLE-encoded from its box's extent,
    `pasted_mask_rles`); appends their ids to `image_ids`."""
    out = {k: runtime.local_rows(v) for k, v in out.items()}
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
    return results
