"""COCO results and metrics: detections as COCO result dicts (boxes as xywh, masks thresholded
and RLE-encoded, as torchvision's reference `coco_eval.py`), and `COCOeval`'s 12 stats of them
(pycocotools, or faster-coco-eval's equal C++ one).

    results = detections_to_coco(image_id, boxes, scores, labels, masks, label_to_category)
    stats = coco_evaluate(ground_truth, results, "segm")   # {'AP': ..., 'AP50': ..., ...}
"""

import copy
from typing import Mapping, Optional, Sequence

import numpy as np

from maskrcnn_jax.data.transform import pasted_crops

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
