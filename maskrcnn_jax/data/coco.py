"""COCO-format folders: annotation files, validated records, ground truth.

A COCO folder (`manual_dir`) holds `annotations/instances_<name>.json` and the images of that
annotation file in `<name>/` (the official layout: `instances_val2017.json` + `val2017/`).
Every usable image becomes one record (see `RECORD_FIELDS`); images without annotations
are kept.
Masks are stored as compressed RLE strings of the original image size: polygons and
uncompressed (crowd) RLE are converted with pycocotools (`coco_rle`), so every consumer decodes
one format (`coco_rle.decode_masks`). Images of other colour modes (gray, palette, CMYK, 16-bit,
alpha) become 8-bit RGB (`images.encoded_rgb_image`).

Real sets have defects (truncated files, polygons of < 3 points, degenerate boxes, ...):
`coco_records` skips what they make unusable and counts them per kind
(`coco_defects.DEFECT_KINDS`, a `DefectLog` summary with the first ids of each kind), or raises
`CocoFormatError` at the first one with a strict `DefectLog`.

Records are plain dicts of NumPy values, shared by the synthetic `shapes` data set, so one input
pipeline and one ground-truth builder serve both.
"""

import json
import logging
import math
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from maskrcnn_jax.data.coco_defects import (
    ANNOTATION_MALFORMED,
    ANNOTATION_UNKNOWN_CATEGORY,
    ANNOTATION_UNKNOWN_IMAGE,
    BBOX_MALFORMED,
    BBOX_NEGATIVE_SIZE,
    BBOX_NOT_FINITE,
    BBOX_ZERO_SIZE,
    IMAGE_ENTRY_MALFORMED,
    IMAGE_SIZE_MISMATCH,
    POLYGON_PART_DROPPED,
    SEGMENTATION_MALFORMED,
    CocoFormatError,
    Defect,
    DefectLog,
    format_defect_summary,
    is_json_number,
)
from maskrcnn_jax.data.coco_rle import parse_segmentation
from maskrcnn_jax.data.images import encoded_rgb_image

logger = logging.getLogger(__name__)

# Record layout (names -> meaning); the TFDS features in `builders.py` follow it.
RECORD_FIELDS = {
    "image": "(H, W, 3) uint8 RGB, stored encoded (PNG/JPEG bytes)",
    "image_id": "int64 COCO image id",
    "original_size": "(2,) int32 (height, width)",
    "file_name": "str, the image's file name",
    "boxes": "(N, 4) float32 (x1, y1, x2, y2) absolute pixels of the original image",
    "labels": "(N,) int32 contiguous labels 1..K (sorted category ids -> 1..K)",
    "category_ids": "(N,) int64 original category ids",
    "is_crowd": "(N,) bool",
    "areas": "(N,) float32 the annotation's area (COCO 'area')",
    "annotation_ids": "(N,) int64",
    "mask_rles": "N compressed RLE strings (pycocotools 'counts'), size = original_size",
    "no_annotations": "bool, True for an image without annotations",
}
def find_annotation_files(manual_dir: str) -> dict[str, tuple[str, str]]:
    """`{split: (annotation_json, image_dir)}` of a COCO folder.

    `annotations/instances_<name>.json` with images in `<name>/`; `<name>` 'train2017' and
    'val2017' (any year) become the splits 'train' and 'validation', other names stay as is.

    Raises:
      CocoFormatError: when the folder has no annotation file or an image folder is missing.
    """
    ann_dir = os.path.join(manual_dir, "annotations")
    names = sorted(f for f in (os.listdir(ann_dir) if os.path.isdir(ann_dir) else [])
                   if f.startswith("instances_") and f.endswith(".json"))
    if not names:
        raise CocoFormatError(f"{manual_dir}: no annotations/instances_<split>.json file found")
    splits = {}
    for file in names:
        name = file[len("instances_"):-len(".json")]
        image_dir = os.path.join(manual_dir, name)
        if not os.path.isdir(image_dir):
            raise CocoFormatError(f"{os.path.join(ann_dir, file)}: image folder {image_dir} missing")
        split = {"train": "train", "val": "validation"}.get(name.rstrip("0123456789"), name)
        splits[split] = (os.path.join(ann_dir, file), image_dir)
    return splits


def load_annotation_file(path: str) -> dict:
    """The parsed json, checked for the 'images' / 'annotations' / 'categories' lists."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CocoFormatError(f"{path}: cannot read annotation json: {e}") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoFormatError(f"{path}: missing list '{key}'")
    return data


def merge_categories(category_lists: Sequence[Sequence[Mapping]], path: str = "") -> list[dict]:
    """Categories of all splits, sorted by id, with `label` = 1..K in that order.

    Raises:
      CocoFormatError: for one id with two different names.
    """
    by_id: dict[int, str] = {}
    for categories in category_lists:
        for c in categories:
            cid, name = int(c["id"]), str(c.get("name", c["id"]))
            if by_id.setdefault(cid, name) != name:
                raise CocoFormatError(f"{path}: category id {cid} named both "
                                      f"{by_id[cid]!r} and {name!r}")
    return [{"id": cid, "name": by_id[cid], "label": i + 1} for i, cid in enumerate(sorted(by_id))]


def _xyxy(bbox: Any) -> list[float]:
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(is_json_number(v) for v in bbox)):
        raise Defect(BBOX_MALFORMED, "bbox", f"malformed bbox {bbox!r}: expected [x, y, w, h]")
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise Defect(BBOX_NOT_FINITE, "bbox", f"malformed bbox {bbox!r}: not finite")
    if w < 0 or h < 0:
        raise Defect(BBOX_NEGATIVE_SIZE, "bbox",
                     f"malformed bbox {bbox!r}: negative width/height")
    if w == 0 or h == 0:
        raise Defect(BBOX_ZERO_SIZE, "bbox", f"malformed bbox {bbox!r}: zero width/height")
    return [x, y, x + w, y + h]


def xywh_to_xyxy(bbox: Any, where: str) -> list[float]:
    """COCO `[x, y, w, h]` -> `[x1, y1, x2, y2]`; raises CocoFormatError for a malformed box
    (not 4 finite numbers, a negative or zero width/height: `coco_records` skips those)."""
    try:
        return _xyxy(bbox)
    except Defect as d:
        raise CocoFormatError(f"{where}: {d.detail}", kind=d.kind, field=d.field) from None


def coco_records(annotation_file: str, image_dir: str, categories: Sequence[Mapping],
                 defects: Optional[DefectLog] = None) -> Iterator[tuple[str, dict]]:
    """`(key, record)` for every usable image of a COCO annotation file, validated.

    Args:
      annotation_file: path of the json.
      image_dir: folder with the images (`file_name` relative to it).
      categories: `merge_categories(...)` output (ids -> contiguous labels).
      defects: where defects (`DEFECT_KINDS`) are counted, or raised at once if it is strict;
        default: a tolerant log whose summary is logged at the end.

    Tolerant (the default), an image defect skips the image with its annotations and an
    annotation defect skips the annotation (a polygon part of < 3 points is dropped alone when
    the annotation has usable parts). Images without (usable) annotations are kept.

    Raises:
      CocoFormatError: for an unreadable json or one without the images / annotations /
        categories lists; with a strict `defects`, at the first defect, naming the file, the
        image / annotation id and the field.
    """
    own_log = defects is None
    log = DefectLog() if own_log else defects
    data = load_annotation_file(annotation_file)
    label_of = {c["id"]: c["label"] for c in categories}
    log.images += len(data["images"])
    log.annotations += len(data["annotations"])
    images: dict[int, dict] = {}
    for image in data["images"]:
        raw_id = image.get("id") if isinstance(image, dict) else None
        where = f"{annotation_file}: image id {raw_id}"
        problem = None
        if not isinstance(image, dict):
            problem = "id", f"image entry is not an object: {image!r}"
        elif not (is_json_number(raw_id) and float(raw_id).is_integer()):
            problem = "id", f"image entry without an integer id: {image!r}"
        elif not isinstance(image.get("file_name"), str) or not image["file_name"]:
            problem = "file_name", f"image entry without a file_name: {image!r}"
        elif int(raw_id) in images:
            problem = "id", f"repeated image id (the first entry is kept): {image!r}"
        else:
            for key in ("height", "width"):
                if key in image and not (is_json_number(image[key])
                                         and float(image[key]).is_integer()):
                    problem = key, f"non-integer {key} {image[key]!r}"
        if problem:
            log.report(IMAGE_ENTRY_MALFORMED, problem[0], problem[1], file=annotation_file,
                       where=where, image_id=raw_id)
            continue
        images[int(raw_id)] = image
    per_image: dict[int, list] = {i: [] for i in images}
    for ann in data["annotations"]:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        where = f"{annotation_file}: annotation id {ann_id}"
        report = lambda kind, field, detail: log.report(  # noqa: E731
            kind, field, detail, file=annotation_file, where=where, annotation_id=ann_id,
            image_id=ann.get("image_id") if isinstance(ann, dict) else None)
        if not isinstance(ann, dict):
            report(ANNOTATION_MALFORMED, "annotation", f"annotation is not an object: {ann!r}")
            continue
        bad = [k for k in ("id", "area") if k in ann and not is_json_number(ann[k])]
        if bad:
            report(ANNOTATION_MALFORMED, bad[0], f"non-numeric {bad[0]} {ann[bad[0]]!r}")
            continue
        image_id = ann.get("image_id")
        if not _hashable_in(image_id, per_image):
            report(ANNOTATION_UNKNOWN_IMAGE, "image_id", f"unknown image id {image_id!r}")
            continue
        if not _hashable_in(ann.get("category_id"), label_of):
            report(ANNOTATION_UNKNOWN_CATEGORY, "category_id",
                   f"unknown category id {ann.get('category_id')!r}")
            continue
        per_image[image_id].append(ann)
    for image_id in sorted(images):
        info = images[image_id]
        anns = per_image[image_id]
        path = os.path.join(image_dir, info["file_name"])
        where = f"{annotation_file}: image id {image_id} (file {path})"
        try:
            encoded, height, width = encoded_rgb_image(path)
            if ("height" in info and int(info["height"]) != height) or (
                    "width" in info and int(info["width"]) != width):
                raise Defect(IMAGE_SIZE_MISMATCH, "height/width",
                             f"file {path} is {height}x{width}, the json says "
                             f"{info.get('height')}x{info.get('width')}")
        except Defect as d:
            log.report(d.kind, d.field, d.detail, file=path, where=where, image_id=image_id)
            continue
        kept, boxes, rles = [], [], []
        for ann in anns:
            ann_where = f"{annotation_file}: annotation id {ann.get('id')} (image id {image_id})"
            try:
                box = _xyxy(ann.get("bbox"))
                if "segmentation" not in ann:
                    raise Defect(SEGMENTATION_MALFORMED, "segmentation", "no segmentation")
                rle, dropped = parse_segmentation(ann["segmentation"], height, width)
            except Defect as d:
                log.report(d.kind, d.field, d.detail, file=annotation_file, where=ann_where,
                           image_id=image_id, annotation_id=ann.get("id"))
                continue
            for _ in range(dropped):  # counted per dropped part (detectron2 counts them too)
                log.report(POLYGON_PART_DROPPED, "segmentation",
                           "a polygon part of < 3 finite (x, y) points, dropped",
                           file=annotation_file, where=ann_where, image_id=image_id,
                           annotation_id=ann.get("id"))
            kept.append(ann)
            boxes.append(box)
            rles.append(rle)
        n = len(kept)
        log.images_kept += 1
        log.annotations_kept += n
        record = {
            "image": encoded,
            "image_id": image_id,
            "original_size": np.asarray([height, width], np.int32),
            "file_name": str(info["file_name"]),
            "boxes": np.asarray(boxes, np.float32).reshape(n, 4),
            "labels": np.asarray([label_of[a["category_id"]] for a in kept], np.int32),
            "category_ids": np.asarray([a["category_id"] for a in kept], np.int64),
            "is_crowd": np.asarray([bool(a.get("iscrowd", 0)) for a in kept], np.bool_),
            "areas": np.asarray([float(a.get("area", 0.0)) for a in kept], np.float32),
            "annotation_ids": np.asarray([int(a.get("id", 0)) for a in kept], np.int64),
            "mask_rles": rles,
            "no_annotations": n == 0,
        }
        yield f"{image_id}", record
    if own_log:
        summary = log.summary()
        (logger.warning if summary["kinds"] else logger.info)(
            "%s", format_defect_summary(annotation_file, summary))


def _hashable_in(value: Any, table: Mapping) -> bool:
    try:
        return value in table
    except TypeError:  # an unhashable json value (list, dict)
        return False


def ground_truth_dataset(records: Iterator[Mapping], categories: Sequence[Mapping],
                         use_labels: bool = False) -> dict:
    """A COCO-format ground-truth dict (images, annotations with RLE masks, iscrowd, areas).

    Args:
      records: records as `coco_records` yields them (the image field is not read).
      categories: `[{'id', 'name', 'label'}]` as stored in the builders' metadata.
      use_labels: category ids are the contiguous labels 1..K (what the model predicts)
        instead of the original category ids.
    """
    images, annotations = [], []
    next_id = 1
    for r in records:
        h, w = (int(v) for v in r["original_size"])
        image_id = int(r["image_id"])
        images.append({"id": image_id, "height": h, "width": w, "file_name": _text(r["file_name"])})
        classes = r["labels"] if use_labels else r["category_ids"]
        for i, box in enumerate(np.asarray(r["boxes"], np.float64).reshape(-1, 4)):
            annotations.append({
                "id": next_id, "image_id": image_id, "category_id": int(classes[i]),
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                "area": float(r["areas"][i]), "iscrowd": int(bool(r["is_crowd"][i])),
                "segmentation": {"size": [h, w], "counts": _text(r["mask_rles"][i])}})
            next_id += 1  # unique across the split whatever the stored ids are
    cats = [{"id": c["label"] if use_labels else c["id"], "name": c["name"]} for c in categories]
    return {"images": images, "annotations": annotations, "categories": cats}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
