"""COCO-format folders: reading and validating annotations, masks as compressed RLE, ground truth.

A COCO folder (`manual_dir`) holds `annotations/instances_<name>.json` and the images of that
annotation file in `<name>/` (the official layout: `instances_val2017.json` + `val2017/`).
Every image becomes one record (see `RECORD_FIELDS`); images without annotations are kept.
Masks are stored as compressed RLE strings of the original image size: polygons and
uncompressed (crowd) RLE are converted with pycocotools, so every consumer decodes one format.

Records are plain dicts of NumPy values, shared by the synthetic `shapes` data set, so one input
pipeline and one ground-truth builder serve both.
"""

import io
import json
import math
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

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


class CocoFormatError(ValueError):
    """Malformed COCO input; the message names the file and the image / annotation id."""


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


def segmentation_to_rle(segmentation: Any, height: int, width: int, where: str) -> bytes:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE counts.

    Raises:
      CocoFormatError: naming `where` (file and annotation id) for a malformed segmentation.
    """
    try:
        if isinstance(segmentation, list):
            if not segmentation:
                raise ValueError("empty polygon list")
            for poly in segmentation:
                if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly)):
                    raise ValueError("a polygon must be a list of >= 3 finite (x, y) pairs")
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            if [int(v) for v in segmentation.get("size", [])] != [height, width]:
                raise ValueError(f"RLE size {segmentation.get('size')} != image size "
                                 f"{[height, width]}")
            counts = segmentation["counts"]
            if isinstance(counts, list):  # uncompressed (crowd) RLE
                if sum(counts) != height * width or any(c < 0 for c in counts):
                    raise ValueError("uncompressed RLE counts do not sum to height * width")
                rle = mask_utils.frPyObjects(segmentation, height, width)
            elif isinstance(counts, (str, bytes)):
                rle = {"size": [height, width],
                       "counts": counts.encode() if isinstance(counts, str) else counts}
                mask_utils.area(rle)  # parses the string
            else:
                raise ValueError(f"RLE counts of type {type(counts).__name__}")
        else:
            raise ValueError(f"segmentation of type {type(segmentation).__name__}")
    except CocoFormatError:
        raise
    except Exception as e:  # pycocotools raises assorted errors on bad input
        raise CocoFormatError(f"{where}: malformed segmentation: {e}") from e
    return rle["counts"]


def xywh_to_xyxy(bbox: Any, where: str) -> list[float]:
    """COCO `[x, y, w, h]` -> `[x1, y1, x2, y2]`; raises CocoFormatError for malformed boxes
    (not 4 finite numbers, negative width/height). Zero-size boxes are kept (the input pipeline
    drops them from the training targets, as torchvision's reference does)."""
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        raise CocoFormatError(f"{where}: malformed bbox {bbox!r}: expected [x, y, w, h]")
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        raise CocoFormatError(f"{where}: malformed bbox {bbox!r}: negative width/height")
    return [x, y, x + w, y + h]


def read_rgb_image(path: str, where: str) -> tuple[bytes, int, int]:
    """The encoded bytes of an RGB image (grayscale/palette/RGBA re-encoded as RGB PNG) and
    its `(height, width)`. Raises CocoFormatError naming the file if missing or corrupt."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CocoFormatError(f"{where}: cannot read image file {path}: {e}") from e
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes fully: truncated files fail here
            if image.mode != "RGB" or image.format not in ("JPEG", "PNG"):
                out = io.BytesIO()
                image.convert("RGB").save(out, format="PNG")
                data = out.getvalue()
            width, height = image.size
    except Exception as e:
        raise CocoFormatError(f"{where}: corrupt image file {path}: {e}") from e
    return data, height, width


def coco_records(annotation_file: str, image_dir: str,
                 categories: Sequence[Mapping]) -> Iterator[tuple[str, dict]]:
    """`(key, record)` for every image of a COCO annotation file, validated.

    Args:
      annotation_file: path of the json.
      image_dir: folder with the images (`file_name` relative to it).
      categories: `merge_categories(...)` output (ids -> contiguous labels).

    Raises:
      CocoFormatError: naming the file and image / annotation id, for an annotation with an
        unknown image or category id, a malformed bbox or segmentation, a missing or corrupt
        image file, or image sizes that disagree with the json.
    """
    data = load_annotation_file(annotation_file)
    label_of = {c["id"]: c["label"] for c in categories}
    images = {}
    for image in data["images"]:
        if "id" not in image or "file_name" not in image:
            raise CocoFormatError(f"{annotation_file}: image entry without id/file_name: {image}")
        images[int(image["id"])] = image
    per_image: dict[int, list] = {i: [] for i in images}
    for ann in data["annotations"]:
        where = f"{annotation_file}: annotation id {ann.get('id')}"
        image_id = ann.get("image_id")
        if image_id not in per_image:
            raise CocoFormatError(f"{where}: unknown image id {image_id}")
        if ann.get("category_id") not in label_of:
            raise CocoFormatError(f"{where}: unknown category id {ann.get('category_id')}")
        per_image[image_id].append(ann)
    for image_id in sorted(images):
        info = images[image_id]
        path = os.path.join(image_dir, info["file_name"])
        encoded, height, width = read_rgb_image(
            path, f"{annotation_file}: image id {image_id}")
        if ("height" in info and int(info["height"]) != height) or (
                "width" in info and int(info["width"]) != width):
            raise CocoFormatError(
                f"{annotation_file}: image id {image_id}: file {path} is {height}x{width}, the "
                f"json says {info.get('height')}x{info.get('width')}")
        anns = per_image[image_id]
        boxes, rles = [], []
        for ann in anns:
            where = f"{annotation_file}: annotation id {ann.get('id')} (image id {image_id})"
            boxes.append(xywh_to_xyxy(ann.get("bbox"), where))
            rles.append(segmentation_to_rle(ann.get("segmentation"), height, width, where))
        n = len(anns)
        record = {
            "image": encoded,
            "image_id": image_id,
            "original_size": np.asarray([height, width], np.int32),
            "file_name": str(info["file_name"]),
            "boxes": np.asarray(boxes, np.float32).reshape(n, 4),
            "labels": np.asarray([label_of[a["category_id"]] for a in anns], np.int32),
            "category_ids": np.asarray([a["category_id"] for a in anns], np.int64),
            "is_crowd": np.asarray([bool(a.get("iscrowd", 0)) for a in anns], np.bool_),
            "areas": np.asarray([float(a.get("area", 0.0)) for a in anns], np.float32),
            "annotation_ids": np.asarray([int(a.get("id", 0)) for a in anns], np.int64),
            "mask_rles": rles,
            "no_annotations": n == 0,
        }
        yield f"{image_id}", record


def decode_masks(rles: Sequence, height: int, width: int) -> np.ndarray:
    """Compressed RLE counts (bytes or str) -> `(N, height, width)` uint8 0/1 masks."""
    if len(rles) == 0:
        return np.zeros((0, height, width), np.uint8)
    objs = [{"size": [int(height), int(width)],
             "counts": r.encode() if isinstance(r, str) else bytes(r)} for r in rles]
    return np.ascontiguousarray(np.transpose(mask_utils.decode(objs), (2, 0, 1)))


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
