"""COCO-format folders: reading and validating annotations, masks as compressed RLE, ground truth.

A COCO folder (`manual_dir`) holds `annotations/instances_<name>.json` and the images of that
annotation file in `<name>/` (the official layout: `instances_val2017.json` + `val2017/`).
Every usable image becomes one record (see `RECORD_FIELDS`); images without annotations
are kept.
Masks are stored as compressed RLE strings of the original image size: polygons and
uncompressed (crowd) RLE are converted with pycocotools, so every consumer decodes one format.
Images of other colour modes (gray, palette, CMYK, 16-bit, alpha) become 8-bit RGB (`images.to_rgb`).

Real sets have defects (truncated files, polygons of < 3 points, degenerate boxes, ...):
`coco_records` skips what they make unusable and counts them per kind (`DEFECT_KINDS`, a
`DefectLog` summary with the first ids of each kind), or raises `CocoFormatError` at the first
one with a strict `DefectLog`.

Records are plain dicts of NumPy values, shared by the synthetic `shapes` data set, so one input
pipeline and one ground-truth builder serve both.
"""

import io
import json
import logging
import math
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn_jax.data.images import to_rgb

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


class CocoFormatError(ValueError):
    """Malformed COCO input; the message names the file and the image / annotation id.

    Attributes (None where not applicable): `kind` (a defect kind, see `DEFECT_KINDS`), `file`
    (the annotation json, or the image file for image defects), `image_id`, `annotation_id`,
    `field` (the json field at fault, e.g. 'bbox', 'segmentation', 'file_name').
    """

    def __init__(self, message: str, *, kind: Optional[str] = None, file: Optional[str] = None,
                 image_id: Any = None, annotation_id: Any = None, field: Optional[str] = None):
        super().__init__(message)
        self.kind, self.file, self.field = kind, file, field
        self.image_id, self.annotation_id = image_id, annotation_id


# Defect kinds. A tolerant build (the default) skips what a defect makes unusable and counts it
# (`DefectLog`); a strict one raises `CocoFormatError` at the first. Image defects skip the image
# with all its annotations and are listed by image id; annotation defects skip the annotation
# (except POLYGON_PART_DROPPED) and are listed by annotation id.

# A json image entry without an integer id / a file_name, or with a repeated id:
IMAGE_ENTRY_MALFORMED = "image_entry_malformed"
IMAGE_MISSING = "image_missing"  # the file cannot be read (missing, unreadable)
IMAGE_CORRUPT = "image_corrupt"  # the file cannot be decoded (truncated, not an image)
IMAGE_MODE_UNSUPPORTED = "image_mode_unsupported"  # decoded, but no conversion of its mode to RGB
IMAGE_SIZE_MISMATCH = "image_size_mismatch"  # the file's size is not the json's height/width
ANNOTATION_MALFORMED = "annotation_malformed"  # not an object, or a non-numeric id / area
ANNOTATION_UNKNOWN_IMAGE = "annotation_unknown_image"  # image_id not among the json's images
ANNOTATION_UNKNOWN_CATEGORY = "annotation_unknown_category"  # category_id not among the categories
BBOX_MALFORMED = "bbox_malformed"  # missing, or not a list of 4 numbers
BBOX_NOT_FINITE = "bbox_not_finite"  # NaN / infinite coordinates
BBOX_NEGATIVE_SIZE = "bbox_negative_size"  # width or height < 0
BBOX_ZERO_SIZE = "bbox_zero_size"  # width or height == 0
SEGMENTATION_MALFORMED = "segmentation_malformed"  # missing, or neither a polygon list nor an RLE
SEGMENTATION_EMPTY = "segmentation_empty"  # an empty polygon list
# As detectron2's load_coco_json: parts of < 3 points (< 6 values) are dropped, an annotation left
# without parts is skipped (and counted).
POLYGON_UNUSABLE = "polygon_unusable"  # no polygon part of >= 3 finite (x, y) points
POLYGON_PART_DROPPED = "polygon_part_dropped"  # such parts dropped, the others kept
RLE_MALFORMED = "rle_malformed"  # no counts / size, size != the image's, counts not decodable

IMAGE_DEFECTS = (IMAGE_ENTRY_MALFORMED, IMAGE_MISSING, IMAGE_CORRUPT, IMAGE_MODE_UNSUPPORTED,
                 IMAGE_SIZE_MISMATCH)
ANNOTATION_DEFECTS = (ANNOTATION_MALFORMED, ANNOTATION_UNKNOWN_IMAGE, ANNOTATION_UNKNOWN_CATEGORY,
                      BBOX_MALFORMED, BBOX_NOT_FINITE, BBOX_NEGATIVE_SIZE, BBOX_ZERO_SIZE,
                      SEGMENTATION_MALFORMED, SEGMENTATION_EMPTY, POLYGON_UNUSABLE,
                      POLYGON_PART_DROPPED, RLE_MALFORMED)
DEFECT_KINDS = IMAGE_DEFECTS + ANNOTATION_DEFECTS


class _Defect(Exception):
    """Internal: a defect found by a validator, before it is named and logged."""

    def __init__(self, kind: str, field: str, detail: str):
        super().__init__(detail)
        self.kind, self.field, self.detail = kind, field, detail


class DefectLog:
    """Defects of one annotation file: counts per kind and the first `max_ids` ids of each.

    `strict`: `report` raises `CocoFormatError` instead of counting. `summary()` is JSON-able:
    `{'images', 'images_kept', 'annotations', 'annotations_kept',
      'kinds': {kind: {'count', 'ids'}}}` (kinds that occurred, in `DEFECT_KINDS` order;
    `annotations_kept` also excludes the annotations of skipped images).
    """

    def __init__(self, strict: bool = False, max_ids: int = 5):
        self.strict, self.max_ids = strict, max_ids
        self.counts: dict[str, int] = {}
        self.ids: dict[str, list] = {}
        self.images = self.images_kept = self.annotations = self.annotations_kept = 0

    def report(self, kind: str, field: str, detail: str, *, file: str, where: str,
               image_id: Any = None, annotation_id: Any = None) -> None:
        """Count one defect (strict: raise `CocoFormatError` with `where: field: kind: detail`)."""
        if kind not in DEFECT_KINDS:
            raise ValueError(f"unknown defect kind {kind!r}")
        if self.strict:
            raise CocoFormatError(f"{where}: field {field!r}: {kind}: {detail}", kind=kind,
                                  file=file, image_id=image_id, annotation_id=annotation_id,
                                  field=field)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        ids = self.ids.setdefault(kind, [])
        if len(ids) < self.max_ids:
            ids.append(_json_id(image_id if kind in IMAGE_DEFECTS else annotation_id))

    def summary(self) -> dict:
        return {"images": self.images, "images_kept": self.images_kept,
                "annotations": self.annotations, "annotations_kept": self.annotations_kept,
                "kinds": {k: {"count": self.counts[k], "ids": list(self.ids[k])}
                          for k in DEFECT_KINDS if k in self.counts}}


def format_defect_summary(name: str, summary: Mapping) -> str:
    """A few lines of text for `DefectLog.summary()` (what the builder logs per split)."""
    lines = [f"{name}: kept {summary['images_kept']}/{summary['images']} images, "
             f"{summary['annotations_kept']}/{summary['annotations']} annotations; "
             + ("defects:" if summary["kinds"] else "no defects")]
    for kind, entry in summary["kinds"].items():
        what = "image" if kind in IMAGE_DEFECTS else "annotation"
        more = ", ..." if entry["count"] > len(entry["ids"]) else ""
        lines.append(f"  {kind}: {entry['count']} (first {what} ids: "
                     f"{', '.join(str(i) for i in entry['ids'])}{more})")
    return "\n".join(lines)


def _json_id(value: Any) -> Any:
    """An id as stored in the summary (JSON metadata): ints and strings as is, else its repr."""
    if value is None or isinstance(value, str) or (isinstance(value, int)
                                                   and not isinstance(value, bool)):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return repr(value)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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


def _polygon_usable(poly: Any) -> bool:
    return (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
            and all(_is_number(v) and math.isfinite(v) for v in poly))


def _rle_string_runs(counts: bytes) -> list[int]:
    """The run lengths of a compressed RLE string (pycocotools' `rleFrString`, in Python).

    pycocotools parses any string without checks (and decoding runs that overflow the image
    writes past its buffer), hence this check first. Raises ValueError for a character outside
    the alphabet or a truncated last value.
    """
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("truncated RLE string")
            c = counts[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {chr(counts[p])!r} outside the RLE alphabet")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _rle_counts(segmentation: dict, height: int, width: int) -> bytes:
    """A COCO RLE dict (uncompressed list or compressed string counts) -> compressed counts."""
    if "counts" not in segmentation or "size" not in segmentation:
        raise _Defect(RLE_MALFORMED, "segmentation",
                      f"RLE without 'counts' / 'size' (keys {sorted(map(str, segmentation))})")
    size = segmentation["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(_is_number(v) and float(v).is_integer() for v in size)
            or [int(v) for v in size] != [height, width]):
        raise _Defect(RLE_MALFORMED, "segmentation",
                      f"RLE size {size!r} != image size {[height, width]}")
    counts = segmentation["counts"]
    if isinstance(counts, list):  # uncompressed (crowd) RLE
        if not all(_is_number(c) and float(c).is_integer() and c >= 0 for c in counts):
            raise _Defect(RLE_MALFORMED, "segmentation",
                          "uncompressed RLE counts are not non-negative integers")
        if sum(int(c) for c in counts) != height * width:
            raise _Defect(RLE_MALFORMED, "segmentation",
                          f"uncompressed RLE counts sum to {sum(int(c) for c in counts)}, "
                          f"not height * width = {height * width}")
        rle = mask_utils.frPyObjects({"size": [height, width],
                                      "counts": [int(c) for c in counts]}, height, width)
        return rle["counts"]
    if isinstance(counts, (str, bytes)):
        try:
            data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
            runs = _rle_string_runs(data)
        except (UnicodeEncodeError, ValueError) as e:
            raise _Defect(RLE_MALFORMED, "segmentation", f"undecodable RLE counts: {e}") from e
        if any(r < 0 for r in runs) or sum(runs) != height * width:
            raise _Defect(RLE_MALFORMED, "segmentation",
                          f"undecodable RLE counts: runs sum to {sum(runs)} (negative: "
                          f"{any(r < 0 for r in runs)}), not height * width = {height * width}")
        return data
    raise _Defect(RLE_MALFORMED, "segmentation", f"RLE counts of type {type(counts).__name__}")


def _segmentation_rle(segmentation: Any, height: int, width: int) -> tuple[bytes, int]:
    """`(compressed RLE counts, number of polygon parts dropped)`; raises `_Defect`."""
    if isinstance(segmentation, list):
        if not segmentation:
            raise _Defect(SEGMENTATION_EMPTY, "segmentation", "empty polygon list")
        parts = [p for p in segmentation if _polygon_usable(p)]
        if not parts:
            lengths = [len(p) if isinstance(p, list) else type(p).__name__ for p in segmentation]
            raise _Defect(POLYGON_UNUSABLE, "segmentation",
                          f"no polygon of >= 3 finite (x, y) points (coordinates per part: "
                          f"{lengths})")
        # (frPyObjects would read a first part of exactly 4 values as a box: parts have >= 6.)
        rle = mask_utils.merge(mask_utils.frPyObjects(
            [[float(v) for v in p] for p in parts], height, width))
        return rle["counts"], len(segmentation) - len(parts)
    if isinstance(segmentation, dict):
        return _rle_counts(segmentation, height, width), 0
    raise _Defect(SEGMENTATION_MALFORMED, "segmentation",
                  f"segmentation of type {type(segmentation).__name__} (expected polygons or RLE)")


def _xyxy(bbox: Any) -> list[float]:
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(_is_number(v) for v in bbox)):
        raise _Defect(BBOX_MALFORMED, "bbox", f"malformed bbox {bbox!r}: expected [x, y, w, h]")
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise _Defect(BBOX_NOT_FINITE, "bbox", f"malformed bbox {bbox!r}: not finite")
    if w < 0 or h < 0:
        raise _Defect(BBOX_NEGATIVE_SIZE, "bbox",
                      f"malformed bbox {bbox!r}: negative width/height")
    if w == 0 or h == 0:
        raise _Defect(BBOX_ZERO_SIZE, "bbox", f"malformed bbox {bbox!r}: zero width/height")
    return [x, y, x + w, y + h]


def segmentation_to_rle(segmentation: Any, height: int, width: int, where: str) -> bytes:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE counts.

    Strict: raises CocoFormatError naming `where` for any defect, a dropped polygon part
    included (`coco_records` skips or counts them instead).
    """
    try:
        counts, dropped = _segmentation_rle(segmentation, height, width)
    except _Defect as d:
        raise CocoFormatError(f"{where}: malformed segmentation ({d.kind}): {d.detail}",
                              kind=d.kind, field=d.field) from None
    if dropped:
        raise CocoFormatError(f"{where}: malformed segmentation ({POLYGON_PART_DROPPED}): "
                              f"{dropped} polygon part(s) of < 3 finite points",
                              kind=POLYGON_PART_DROPPED, field="segmentation")
    return counts


def xywh_to_xyxy(bbox: Any, where: str) -> list[float]:
    """COCO `[x, y, w, h]` -> `[x1, y1, x2, y2]`; raises CocoFormatError for a malformed box
    (not 4 finite numbers, a negative or zero width/height: `coco_records` skips those)."""
    try:
        return _xyxy(bbox)
    except _Defect as d:
        raise CocoFormatError(f"{where}: {d.detail}", kind=d.kind, field=d.field) from None


def _png_bit_depth(data: bytes) -> int:
    """The bit depth in a PNG's IHDR (PIL reads 48-bit RGB PNGs as mode 'RGB')."""
    return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else 8


def _read_rgb_image(path: str) -> tuple[bytes, int, int]:
    """Encoded bytes of an 8-bit RGB image and `(height, width)`; raises `_Defect`.

    8-bit RGB JPEG / PNG files (PNG without transparency) are kept as they are; anything else is
    decoded, converted (`images.to_rgb`) and re-encoded as a PNG, so that every decoder on read (PIL, or
    OpenCV's IMREAD_UNCHANGED in TFDS) gets (H, W, 3) uint8. 48-bit RGB PNGs: PIL keeps the high
    byte of each value (v >> 8, at most 1 below round(v / 257)).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _Defect(IMAGE_MISSING, "file_name", f"cannot read image file {path}: {e}") from e
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes fully: truncated files fail here
    except Exception as e:  # PIL raises assorted errors on corrupt files
        raise _Defect(IMAGE_CORRUPT, "file_name", f"corrupt image file {path}: {e}") from e
    with image:
        width, height = image.size
        keep = image.mode == "RGB" and (
            image.format == "JPEG" or (image.format == "PNG" and _png_bit_depth(data) == 8
                                       and "transparency" not in image.info))
        if not keep:
            try:
                rgb = to_rgb(image)
            except Exception as e:
                raise _Defect(IMAGE_MODE_UNSUPPORTED, "file_name",
                              f"image file {path}: no RGB conversion of mode {image.mode}: "
                              f"{e}") from e
            out = io.BytesIO()
            rgb.save(out, format="PNG")
            data = out.getvalue()
    return data, height, width


def read_rgb_image(path: str, where: str) -> tuple[bytes, int, int]:
    """The encoded bytes of an 8-bit RGB image (other modes converted, see `images.to_rgb`, and
    re-encoded as PNG) and its `(height, width)`. Raises CocoFormatError naming the file if it
    is missing or corrupt."""
    try:
        return _read_rgb_image(path)
    except _Defect as d:
        raise CocoFormatError(f"{where}: {d.detail}", kind=d.kind, file=path,
                              field=d.field) from None


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
        elif not (_is_number(raw_id) and float(raw_id).is_integer()):
            problem = "id", f"image entry without an integer id: {image!r}"
        elif not isinstance(image.get("file_name"), str) or not image["file_name"]:
            problem = "file_name", f"image entry without a file_name: {image!r}"
        elif int(raw_id) in images:
            problem = "id", f"repeated image id (the first entry is kept): {image!r}"
        else:
            for key in ("height", "width"):
                if key in image and not (_is_number(image[key])
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
        bad = [k for k in ("id", "area") if k in ann and not _is_number(ann[k])]
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
            encoded, height, width = _read_rgb_image(path)
            if ("height" in info and int(info["height"]) != height) or (
                    "width" in info and int(info["width"]) != width):
                raise _Defect(IMAGE_SIZE_MISMATCH, "height/width",
                              f"file {path} is {height}x{width}, the json says "
                              f"{info.get('height')}x{info.get('width')}")
        except _Defect as d:
            log.report(d.kind, d.field, d.detail, file=path, where=where, image_id=image_id)
            continue
        kept, boxes, rles = [], [], []
        for ann in anns:
            ann_where = f"{annotation_file}: annotation id {ann.get('id')} (image id {image_id})"
            try:
                box = _xyxy(ann.get("bbox"))
                if "segmentation" not in ann:
                    raise _Defect(SEGMENTATION_MALFORMED, "segmentation", "no segmentation")
                rle, dropped = _segmentation_rle(ann["segmentation"], height, width)
            except _Defect as d:
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
