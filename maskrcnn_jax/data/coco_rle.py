"""COCO segmentations as compressed RLE: validation, conversion and decoding.

A COCO annotation's segmentation is a list of polygons or an RLE (uncompressed counts for crowd
annotations, or a compressed string), at the image's size. Every record stores it as compressed
RLE counts (pycocotools' string format, bytes) of the original image size, so that every
consumer decodes one format (`decode_masks`). Malformed ones raise `coco_defects.Defect`
(`parse_segmentation`, which `coco.coco_records` counts or raises) or `CocoFormatError`
(`segmentation_to_rle`).
"""

import math
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from maskrcnn_jax.data.coco_defects import (
    POLYGON_PART_DROPPED,
    POLYGON_UNUSABLE,
    RLE_MALFORMED,
    SEGMENTATION_EMPTY,
    SEGMENTATION_MALFORMED,
    CocoFormatError,
    Defect,
    is_json_number,
)


def _polygon_usable(poly: Any) -> bool:
    return (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
            and all(is_json_number(v) and math.isfinite(v) for v in poly))


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
        raise Defect(RLE_MALFORMED, "segmentation",
                     f"RLE without 'counts' / 'size' (keys {sorted(map(str, segmentation))})")
    size = segmentation["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(is_json_number(v) and float(v).is_integer() for v in size)
            or [int(v) for v in size] != [height, width]):
        raise Defect(RLE_MALFORMED, "segmentation",
                     f"RLE size {size!r} != image size {[height, width]}")
    counts = segmentation["counts"]
    if isinstance(counts, list):  # uncompressed (crowd) RLE
        if not all(is_json_number(c) and float(c).is_integer() and c >= 0 for c in counts):
            raise Defect(RLE_MALFORMED, "segmentation",
                         "uncompressed RLE counts are not non-negative integers")
        if sum(int(c) for c in counts) != height * width:
            raise Defect(RLE_MALFORMED, "segmentation",
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
            raise Defect(RLE_MALFORMED, "segmentation", f"undecodable RLE counts: {e}") from e
        if any(r < 0 for r in runs) or sum(runs) != height * width:
            raise Defect(RLE_MALFORMED, "segmentation",
                         f"undecodable RLE counts: runs sum to {sum(runs)} (negative: "
                         f"{any(r < 0 for r in runs)}), not height * width = {height * width}")
        return data
    raise Defect(RLE_MALFORMED, "segmentation", f"RLE counts of type {type(counts).__name__}")


def parse_segmentation(segmentation: Any, height: int, width: int) -> tuple[bytes, int]:
    """A COCO segmentation of a `height x width` image -> `(compressed RLE counts (bytes),
    number of polygon parts of < 3 finite points dropped)`; raises `Defect` for a malformed one
    (which `coco.coco_records` counts, or raises with a strict log)."""
    if isinstance(segmentation, list):
        if not segmentation:
            raise Defect(SEGMENTATION_EMPTY, "segmentation", "empty polygon list")
        parts = [p for p in segmentation if _polygon_usable(p)]
        if not parts:
            lengths = [len(p) if isinstance(p, list) else type(p).__name__ for p in segmentation]
            raise Defect(POLYGON_UNUSABLE, "segmentation",
                         f"no polygon of >= 3 finite (x, y) points (coordinates per part: "
                         f"{lengths})")
        # (frPyObjects would read a first part of exactly 4 values as a box: parts have >= 6.)
        rle = mask_utils.merge(mask_utils.frPyObjects(
            [[float(v) for v in p] for p in parts], height, width))
        return rle["counts"], len(segmentation) - len(parts)
    if isinstance(segmentation, dict):
        return _rle_counts(segmentation, height, width), 0
    raise Defect(SEGMENTATION_MALFORMED, "segmentation",
                 f"segmentation of type {type(segmentation).__name__} (expected polygons or RLE)")


def segmentation_to_rle(segmentation: Any, height: int, width: int, where: str) -> bytes:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE counts.

    Strict: raises CocoFormatError naming `where` for any defect, a dropped polygon part
    included (`coco_records` skips or counts them instead).
    """
    try:
        counts, dropped = parse_segmentation(segmentation, height, width)
    except Defect as d:
        raise CocoFormatError(f"{where}: malformed segmentation ({d.kind}): {d.detail}",
                              kind=d.kind, field=d.field) from None
    if dropped:
        raise CocoFormatError(f"{where}: malformed segmentation ({POLYGON_PART_DROPPED}): "
                              f"{dropped} polygon part(s) of < 3 finite points",
                              kind=POLYGON_PART_DROPPED, field="segmentation")
    return counts


def decode_masks(rles: Sequence, height: int, width: int) -> np.ndarray:
    """Compressed RLE counts (bytes or str) -> `(N, height, width)` uint8 0/1 masks."""
    if len(rles) == 0:
        return np.zeros((0, height, width), np.uint8)
    objs = [{"size": [int(height), int(width)],
             "counts": r.encode() if isinstance(r, str) else bytes(r)} for r in rles]
    return np.ascontiguousarray(np.transpose(mask_utils.decode(objs), (2, 0, 1)))
