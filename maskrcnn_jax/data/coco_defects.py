"""Defects of COCO-format input: their kinds, the error a strict build raises, the tolerant log.

Real sets have defects (truncated files, polygons of < 3 points, degenerate boxes, ...). The
validators (`coco_rle.parse_segmentation`, `images.encoded_rgb_image`, the checks of
`coco.coco_records`) raise `Defect` with its kind (`DEFECT_KINDS`) and the json field at fault;
`coco_records` then skips what the defect makes unusable and counts it in a `DefectLog` (a
summary with the first ids of each kind, `format_defect_summary`), or, with a strict log,
raises `CocoFormatError` naming the file, the image / annotation id and the field.
"""

from typing import Any, Mapping, Optional

from maskrcnn_jax.errors import InputError


class CocoFormatError(InputError):
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


class Defect(Exception):
    """A defect found by a validator, before it is named and logged: `kind` (`DEFECT_KINDS`),
    `field` (the json field at fault), `detail` (what is wrong). The COCO readers catch it and
    report it to a `DefectLog`, or raise it as a `CocoFormatError`."""

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


def is_json_number(v: Any) -> bool:
    """A json number: an int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)
