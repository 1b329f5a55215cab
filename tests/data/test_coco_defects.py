"""Defects in a COCO folder: skipped and counted by default, raised with `strict`; colour modes.

A folder with good images and annotations plus one of each defect kind is built with the TFDS
builder; the references are written out by hand: the ids that must survive, the summary per
kind, and the RGB pixels of each colour mode (16-bit gray: round(v / 257); palette: the palette
entry; RGBA: alpha dropped; CMYK: PIL's round((255 - c) * (255 - k) / 255) of the decoded
CMYK values).
"""

import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn_jax.data import builders, coco_defects, coco_rle, images

CATEGORIES = [{"id": 3, "name": "car"}, {"id": 7, "name": "train"}]
SQUARE = [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]]  # a usable polygon inside every image
GOOD_BOX = [2.0, 2.0, 10.0, 10.0]
H, W = 20, 24  # every image's size


def _save(path, image, fmt):
    out = io.BytesIO()
    image.save(out, format=fmt)
    with open(path, "wb") as f:
        f.write(out.getvalue())
    return out.getvalue()


def _mode_images(rng):
    """`{image_id: (file_name, PIL image, format, expected RGB array or None)}` of odd modes
    (None: computed from the file after saving, for the lossy CMYK JPEG)."""
    gray = rng.integers(0, 256, (H, W), dtype=np.uint8)
    v16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    v16[0, :8] = [0, 128, 129, 255, 256, 32896, 65407, 65535]  # rounding edges (128 -> 0, 129 -> 1)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (H, W), dtype=np.uint8)
    p_image = Image.frombytes("P", (W, H), index.tobytes())
    p_image.putpalette(palette.flatten().tolist())
    p_image.info["transparency"] = int(index[0, 0])  # that colour transparent: colour kept
    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    la = rng.integers(0, 256, (H, W, 2), dtype=np.uint8)
    bits = rng.random((H, W)) < 0.5
    cmyk = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    rep = lambda g: np.repeat(g[..., None], 3, -1)  # noqa: E731
    return {
        20: ("gray.png", Image.fromarray(gray, "L"), "PNG", rep(gray)),
        21: ("cmyk.jpg", Image.fromarray(cmyk, "CMYK"), "JPEG", None),
        22: ("palette.png", p_image, "PNG", palette[index]),
        23: ("rgba.png", Image.fromarray(rgba, "RGBA"), "PNG", rgba[..., :3]),
        24: ("gray16.png", Image.fromarray(v16), "PNG",
             rep(np.round(v16 / 257).astype(np.uint8))),
        25: ("la.png", Image.fromarray(la, "LA"), "PNG", rep(la[..., 0])),
        26: ("bits.png", Image.fromarray(bits).convert("1"), "PNG",
             rep(np.where(bits, 255, 0).astype(np.uint8))),
    }


def _ann(ann_id, image_id, bbox=GOOD_BOX, segmentation=SQUARE, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": 3, "iscrowd": 0, "area": 100.0,
            "bbox": bbox, "segmentation": segmentation, **extra}


def write_defect_folder(root):
    """Good images / annotations and one (or more) of each defect kind.

    Returns `(expected image ids -> RGB arrays, expected kept annotation ids per image,
    expected train summary)`.
    """
    rng = np.random.default_rng(0)
    for d in ("annotations", "train", "val"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    train_dir = os.path.join(root, "train")
    good = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    _save(os.path.join(train_dir, "good.png"), Image.fromarray(good), "PNG")
    jpeg = _save(os.path.join(train_dir, "trunc.jpg"),
                 Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)), "JPEG")
    with open(os.path.join(train_dir, "trunc.jpg"), "wb") as f:
        f.write(jpeg[: len(jpeg) // 2])  # truncated JPEG
    with open(os.path.join(train_dir, "junk.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not a png")
    _save(os.path.join(train_dir, "small.png"), Image.fromarray(good[:10]), "PNG")  # json: 20 high
    expected_pixels = {1: good}
    modes = _mode_images(rng)
    for image_id, (file, image, fmt, pixels) in modes.items():
        _save(os.path.join(train_dir, file), image, fmt)
        if pixels is None:  # CMYK: PIL's conversion of the decoded (lossy) CMYK values
            with Image.open(os.path.join(train_dir, file)) as decoded:
                assert decoded.mode == "CMYK"
                c = np.asarray(decoded).astype(np.float64)
            pixels = np.round((255 - c[..., :3]) * (255 - c[..., 3:]) / 255).astype(np.uint8)
        expected_pixels[image_id] = pixels

    good_rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((5, 5), np.uint8),
                                                          ((3, H - 8), (4, W - 9)))))
    two_point = [[1.0, 1.0, 8.0, 8.0]]  # a polygon of 2 points
    annotations = [
        _ann(101, 1),  # good polygon
        _ann(102, 1, segmentation=two_point),  # polygon_unusable: skipped
        _ann(103, 1, segmentation=SQUARE + two_point),  # polygon_part_dropped: kept
        _ann(104, 1, segmentation=[]),  # segmentation_empty
        _ann(105, 1, segmentation={"size": [H, W], "counts": "!!not rle"}),  # rle_malformed
        _ann(106, 1, segmentation={"size": [H + 1, W], "counts": good_rle["counts"].decode()}),
        _ann(107, 1, segmentation={"counts": good_rle["counts"].decode()}),  # no size
        _ann(108, 1, segmentation={"size": [H, W], "counts": "0"}),  # runs don't sum to H*W
        _ann(109, 1, segmentation={"size": [H, W], "counts": good_rle["counts"].decode()},
             iscrowd=1),  # good compressed RLE
        _ann(110, 1, bbox=[1.0, 1.0, -3.0, 4.0]),  # bbox_negative_size
        _ann(111, 1, bbox=[1.0, 1.0, float("nan"), 4.0]),  # bbox_not_finite
        _ann(112, 1, bbox=[1.0, 1.0, 4.0]),  # bbox_malformed
        _ann(113, 1, segmentation="polygon?"),  # segmentation_malformed
        *[_ann(120 + i, 1, bbox=[1.0, 1.0, 0.0 if i % 2 else 5.0, 5.0 if i % 2 else 0.0])
          for i in range(7)],  # bbox_zero_size x 7: the summary lists the first 5
        _ann(130, 2),  # of the truncated image: skipped with it
        _ann(131, 3), _ann(132, 3),  # of the missing image
        _ann(133, 4),  # of the corrupt image
        _ann(134, 5),  # of the image whose size disagrees with the json
        _ann(140, 999),  # annotation_unknown_image
        {**_ann(141, 1), "category_id": 1234},  # annotation_unknown_category
        *[_ann(200 + i, i) for i in modes],  # one good annotation per colour mode image
    ]
    images = [{"id": 1, "file_name": "good.png"}, {"id": 2, "file_name": "trunc.jpg"},
              {"id": 3, "file_name": "missing.jpg"}, {"id": 4, "file_name": "junk.png"},
              {"id": 5, "file_name": "small.png"}, {"id": 6},  # image_entry_malformed
              *[{"id": i, "file_name": f} for i, (f, *_) in modes.items()]]
    for image in images:
        image.update(height=H, width=W)
    with open(os.path.join(root, "annotations", "instances_train.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    # val: one good image, one truncated one
    _save(os.path.join(root, "val", "v.png"), Image.fromarray(good), "PNG")
    with open(os.path.join(root, "val", "t.jpg"), "wb") as f:
        f.write(jpeg[:200])
    val = {"images": [{"id": 7, "file_name": "v.png", "height": H, "width": W},
                      {"id": 8, "file_name": "t.jpg", "height": H, "width": W}],
           "annotations": [_ann(1, 7), _ann(2, 8)], "categories": CATEGORIES}
    with open(os.path.join(root, "annotations", "instances_val.json"), "w") as f:
        json.dump(val, f)

    kept = {1: [101, 103, 109], **{i: [200 + i] for i in modes}}
    summary = {
        "images": len(images), "images_kept": len(kept),
        "annotations": len(annotations), "annotations_kept": sum(map(len, kept.values())),
        "kinds": {
            coco_defects.IMAGE_ENTRY_MALFORMED: {"count": 1, "ids": [6]},
            coco_defects.IMAGE_MISSING: {"count": 1, "ids": [3]},
            coco_defects.IMAGE_CORRUPT: {"count": 2, "ids": [2, 4]},
            coco_defects.IMAGE_SIZE_MISMATCH: {"count": 1, "ids": [5]},
            coco_defects.ANNOTATION_UNKNOWN_IMAGE: {"count": 1, "ids": [140]},
            coco_defects.ANNOTATION_UNKNOWN_CATEGORY: {"count": 1, "ids": [141]},
            coco_defects.BBOX_MALFORMED: {"count": 1, "ids": [112]},
            coco_defects.BBOX_NOT_FINITE: {"count": 1, "ids": [111]},
            coco_defects.BBOX_NEGATIVE_SIZE: {"count": 1, "ids": [110]},
            coco_defects.BBOX_ZERO_SIZE: {"count": 7, "ids": [120, 121, 122, 123, 124]},
            coco_defects.SEGMENTATION_MALFORMED: {"count": 1, "ids": [113]},
            coco_defects.SEGMENTATION_EMPTY: {"count": 1, "ids": [104]},
            coco_defects.POLYGON_UNUSABLE: {"count": 1, "ids": [102]},
            coco_defects.POLYGON_PART_DROPPED: {"count": 1, "ids": [103]},
            coco_defects.RLE_MALFORMED: {"count": 4, "ids": [105, 106, 107, 108]},
        },
    }
    return expected_pixels, kept, summary


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco_defects"))
    pixels, kept, summary = write_defect_folder(root)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    source = builders.load("coco_instances", data_dir, "train", manual_dir=root)
    return root, data_dir, source, pixels, kept, summary


def test_only_the_good_images_and_annotations_are_built(built):
    root, _, source, pixels, kept, _ = built
    records = {int(source[i]["image_id"]): source[i] for i in range(len(source))}
    assert sorted(records) == sorted(kept)
    for image_id, record in records.items():
        assert record["annotation_ids"].tolist() == kept[image_id], image_id
        assert not record["no_annotations"]
        masks = coco_rle.decode_masks(record["mask_rles"], H, W)
        assert masks.shape == (len(kept[image_id]), H, W) and all(m.any() for m in masks)
    # the annotation whose 2-point part was dropped: the mask of its usable square alone
    r1 = records[1]
    i103 = r1["annotation_ids"].tolist().index(103)
    square = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(SQUARE, H, W)))
    np.testing.assert_array_equal(coco_rle.decode_masks(r1["mask_rles"], H, W)[i103], square)
    np.testing.assert_array_equal(r1["boxes"][i103], [2, 2, 12, 12])


@pytest.mark.parametrize("image_id,mode", [(1, "RGB"), (20, "L"), (21, "CMYK"), (22, "P"),
                                           (23, "RGBA"), (24, "I;16"), (25, "LA"), (26, "1")])
def test_colour_modes_become_8bit_rgb(built, image_id, mode):
    root, _, source, pixels, _, _ = built
    records = {int(source[i]["image_id"]): source[i] for i in range(len(source))}
    record = records[image_id]
    with Image.open(os.path.join(root, "train", record["file_name"].decode())) as original:
        assert original.mode == mode
    assert record["image"].dtype == np.uint8 and record["image"].shape == (H, W, 3)
    np.testing.assert_array_equal(record["image"], pixels[image_id])


def test_16bit_gray_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128, 129, 255, 256, 1000], [32896, 40000, 65407, 65408, 65535, 7]],
                      np.uint16)
    for fmt, image in (("PNG", Image.fromarray(values)),  # I;16
                       ("TIFF", Image.fromarray(values.astype(np.int32)))):  # I
        path = str(tmp_path / f"g.{fmt.lower()}")
        _save(path, image, fmt)
        data, h, w = images.read_rgb_image(path, "here")
        decoded = np.asarray(Image.open(io.BytesIO(data)))
        assert (h, w) == values.shape and decoded.shape == (*values.shape, 3)
        np.testing.assert_array_equal(decoded[..., 0], np.round(values / 257))
        np.testing.assert_array_equal(decoded[..., 1], decoded[..., 2])


def test_summary_per_kind_in_metadata_and_logs(built, caplog, tmp_path):
    root, data_dir, source, _, _, summary = built
    assert builders.defects(source)["train"] == summary
    assert builders.defects(source)["validation"] == {
        "images": 2, "images_kept": 1, "annotations": 2, "annotations_kept": 1,
        "kinds": {coco_defects.IMAGE_CORRUPT: {"count": 1, "ids": [8]}}}
    # survives a reload from disk in a new builder object (metadata.json beside the data)
    fresh = builders.builder("coco_instances", data_dir)
    assert fresh.is_prepared()
    assert fresh.info.metadata["defects"]["train"] == summary
    with open(os.path.join(fresh.data_dir, "metadata.json")) as f:
        assert json.load(f)["defects"]["train"] == summary
    again = builders.load("coco_instances", data_dir, "validation")
    assert builders.defects(again)["train"] == summary
    assert set(summary["kinds"]) == set(coco_defects.DEFECT_KINDS) - {
        coco_defects.ANNOTATION_MALFORMED, coco_defects.IMAGE_MODE_UNSUPPORTED}
    text = coco_defects.format_defect_summary("coco_instances/train", summary)
    assert "bbox_zero_size: 7 (first annotation ids: 120, 121, 122, 123, 124, ...)" in text
    assert "image_corrupt: 2 (first image ids: 2, 4)" in text
    print(text)
    # the build logs it (a fresh build of the validation split alone, to capture the log)
    val_root = str(tmp_path / "val_only")
    os.makedirs(os.path.join(val_root, "annotations"))
    os.symlink(os.path.join(root, "val"), os.path.join(val_root, "val"))
    os.symlink(os.path.join(root, "annotations", "instances_val.json"),
               os.path.join(val_root, "annotations", "instances_val.json"))
    with caplog.at_level(logging.WARNING):
        builders.load("coco_instances", str(tmp_path / "tfds"), "validation",
                      manual_dir=val_root)
    assert any("coco_instances/validation" in r.getMessage()
               and "image_corrupt: 1 (first image ids: 8)" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


def _single_defect_folder(root, edit=None, truncate=False):
    """Image 1 ('a.png', annotations 11 and 12) and image 2 ('b.jpg', annotation 21), then
    `edit(json)`; `truncate`: b.jpg is cut in half."""
    os.makedirs(os.path.join(root, "annotations"))
    os.makedirs(os.path.join(root, "train"))
    rng = np.random.default_rng(1)
    _save(os.path.join(root, "train", "a.png"),
          Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)), "PNG")
    path = os.path.join(root, "train", "b.jpg")
    jpeg = _save(path, Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)), "JPEG")
    if truncate:
        with open(path, "wb") as f:
            f.write(jpeg[: len(jpeg) // 2])
    data = {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                       {"id": 2, "file_name": "b.jpg", "height": H, "width": W}],
            "annotations": [_ann(11, 1), _ann(12, 1), _ann(21, 2)], "categories": CATEGORIES}
    if edit:
        edit(data)
    json_path = os.path.join(root, "annotations", "instances_train.json")
    with open(json_path, "w") as f:
        json.dump(data, f)
    return json_path, path


@pytest.mark.parametrize("case,kind,field,id_kind", [
    ("truncated", coco_defects.IMAGE_CORRUPT, "file_name", "image"),
    ("missing", coco_defects.IMAGE_MISSING, "file_name", "image"),
    ("two_points", coco_defects.POLYGON_UNUSABLE, "segmentation", "annotation"),
    ("part_dropped", coco_defects.POLYGON_PART_DROPPED, "segmentation", "annotation"),
    ("empty", coco_defects.SEGMENTATION_EMPTY, "segmentation", "annotation"),
    ("rle", coco_defects.RLE_MALFORMED, "segmentation", "annotation"),
    ("zero_box", coco_defects.BBOX_ZERO_SIZE, "bbox", "annotation"),
    ("negative_box", coco_defects.BBOX_NEGATIVE_SIZE, "bbox", "annotation"),
    ("nan_box", coco_defects.BBOX_NOT_FINITE, "bbox", "annotation"),
])
def test_strict_raises_at_the_first_defect(tmp_path, case, kind, field, id_kind):
    edits = {
        "two_points": lambda d: d["annotations"][1].update(segmentation=[[1, 1, 5, 5]]),
        "part_dropped": lambda d: d["annotations"][1].update(segmentation=SQUARE + [[1, 1]]),
        "empty": lambda d: d["annotations"][1].update(segmentation=[]),
        "rle": lambda d: d["annotations"][1].update(segmentation={"size": [H, W],
                                                                  "counts": "\x7f"}),
        "zero_box": lambda d: d["annotations"][1].update(bbox=[1, 1, 0, 4]),
        "negative_box": lambda d: d["annotations"][1].update(bbox=[1, 1, 3, -4]),
        "nan_box": lambda d: d["annotations"][1].update(bbox=[1, float("nan"), 3, 4]),
        "missing": lambda d: d["images"][1].update(file_name="gone.jpg"),
    }
    root = str(tmp_path / "coco")
    json_path, image_path = _single_defect_folder(root, edits.get(case), case == "truncated")
    if case == "missing":
        image_path = os.path.join(root, "train", "gone.jpg")
    with pytest.raises(coco_defects.CocoFormatError) as info:
        builders.load("coco_instances", str(tmp_path / "tfds"), "train", manual_dir=root,
                      strict=True)
    e, message = info.value, str(info.value)
    assert (e.kind, e.field) == (kind, field)
    assert f"field {field!r}" in message and kind in message and json_path in message
    if id_kind == "image":
        assert (e.image_id, e.file) == (2, image_path)
        assert "image id 2" in message and image_path in message
    else:
        assert (e.annotation_id, e.image_id, e.file) == (12, 1, json_path)
        assert "annotation id 12 (image id 1)" in message
    assert not builders.builder("coco_instances", str(tmp_path / "tfds"),
                                manual_dir=root).is_prepared()
    # tolerant (the default): the same folder builds, without the defective part
    source = builders.load("coco_instances", str(tmp_path / "tfds"), "train", manual_dir=root)
    assert builders.defects(source)["train"]["kinds"] == {kind: {
        "count": 1, "ids": [2 if id_kind == "image" else 12]}}
    records = {int(source[i]["image_id"]): source[i]["annotation_ids"].tolist()
               for i in range(len(source))}
    if id_kind == "image":
        assert records == {1: [11, 12]}
    else:
        kept = [11, 12] if kind == coco_defects.POLYGON_PART_DROPPED else [11]
        assert records == {1: kept, 2: [21]}


def test_strict_load_of_a_tolerant_build_with_defects_raises(built):
    _, data_dir, _, _, _, _ = built
    with pytest.raises(coco_defects.CocoFormatError,
                       match=r"built earlier \(tolerant\) with defects"):
        builders.load("coco_instances", data_dir, "train", strict=True)
