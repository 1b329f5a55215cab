"""TFDS builders without TensorFlow: a tiny COCO folder written here, and synthetic shapes.

References: the original json decoded by pycocotools (`COCO.annToMask`), the image files decoded
by PIL, and the COCO xywh -> xyxy / sorted-category-id -> 1..K rules written out by hand.
"""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from maskrcnn_jax.data import builders, coco, coco_defects, coco_rle, shapes
from maskrcnn_jax.testing.coco_folder import CATEGORIES, LABEL_OF, write_coco_folder


@pytest.fixture(scope="module")
def coco_built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    train, arrays = write_coco_folder(root)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    source = builders.load("coco_instances", data_dir, "train", manual_dir=root)
    records = {int(source[i]["image_id"]): source[i] for i in range(len(source))}
    val = builders.load("coco_instances", data_dir, "validation", manual_dir=root)
    return root, train, arrays, source, records, val


def test_no_tensorflow_needed(coco_built):
    assert importlib.util.find_spec("tensorflow") is None
    assert "tensorflow" not in sys.modules


def test_coco_records_match_annotations(coco_built):
    root, train, arrays, source, records, val = coco_built
    gt = COCO(os.path.join(root, "annotations", "instances_train.json"))
    assert sorted(records) == [5, 11, 42] and len(val) == 1
    for image_id, record in records.items():
        array = arrays[image_id]
        h, w = array.shape[:2]
        assert record["image"].shape == (h, w, 3) and record["image"].dtype == np.uint8
        expected = np.asarray(Image.open(os.path.join(root, "train", record["file_name"].decode()))
                              .convert("RGB"))
        np.testing.assert_array_equal(record["image"], expected)
        if array.ndim == 2:  # grayscale -> RGB, the same value in every channel
            np.testing.assert_array_equal(record["image"], np.repeat(array[..., None], 3, -1))
        np.testing.assert_array_equal(record["original_size"], [h, w])
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))
        assert bool(record["no_annotations"]) == (not anns)
        np.testing.assert_array_equal(record["annotation_ids"], [a["id"] for a in anns])
        xyxy = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                 a["bbox"][1] + a["bbox"][3]] for a in anns]
        np.testing.assert_array_equal(record["boxes"], np.asarray(xyxy, np.float32).reshape(-1, 4))
        np.testing.assert_array_equal(record["labels"], [LABEL_OF[a["category_id"]] for a in anns])
        np.testing.assert_array_equal(record["category_ids"], [a["category_id"] for a in anns])
        np.testing.assert_array_equal(record["is_crowd"], [bool(a["iscrowd"]) for a in anns])
        np.testing.assert_array_equal(record["areas"], [a["area"] for a in anns])
        masks = coco_rle.decode_masks(record["mask_rles"], h, w)
        assert masks.shape == (len(anns), h, w)
        for mask, ann in zip(masks, anns):
            np.testing.assert_array_equal(mask, gt.annToMask(ann))
            assert mask.any()
    categories = builders.categories(source)
    assert categories == [{"id": 3, "name": "car", "label": 1}, {"id": 7, "name": "train", "label": 2},
                          {"id": 18, "name": "dog", "label": 3}]


def test_coco_ground_truth_from_records(coco_built):
    root, train, arrays, source, records, val = coco_built
    original = COCO(os.path.join(root, "annotations", "instances_train.json"))
    ours = builders.coco_ground_truth(source)
    assert sorted(ours.getImgIds()) == sorted(original.getImgIds())
    assert sorted(ours.getCatIds()) == [3, 7, 18]
    for image_id in original.getImgIds():
        theirs = original.loadAnns(original.getAnnIds(imgIds=[image_id]))
        mine = ours.loadAnns(ours.getAnnIds(imgIds=[image_id]))
        assert len(mine) == len(theirs)
        for a, b in zip(sorted(mine, key=lambda a: a["bbox"]), sorted(theirs, key=lambda a: a["bbox"])):
            assert (a["category_id"], a["iscrowd"], a["area"]) == (b["category_id"], b["iscrowd"], b["area"])
            np.testing.assert_allclose(a["bbox"], b["bbox"], rtol=0, atol=1e-5)
            np.testing.assert_array_equal(ours.annToMask(a), original.annToMask(b))
    by_labels = builders.coco_ground_truth(source, use_labels=True)
    assert sorted(by_labels.getCatIds()) == [1, 2, 3]
    assert sorted(a["category_id"] for a in by_labels.dataset["annotations"]) == [1, 1, 2, 3, 3]


def _rewrite(root, edit):
    path = os.path.join(root, "annotations", "instances_train.json")
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def _records(root, strict=False):
    (ann, images), = [v for k, v in coco.find_annotation_files(root).items() if k == "train"]
    cats = coco.merge_categories([CATEGORIES])
    return list(coco.coco_records(ann, images, cats, coco_defects.DefectLog(strict=strict)))


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated"])
def test_bad_image_files_are_named(tmp_path, case):
    """Strict: raised, naming the file; tolerant (the default): the image is skipped.
    (More defect kinds: test_coco_defects.py.)"""
    root = str(tmp_path)
    write_coco_folder(root)
    path = os.path.join(root, "train", "gray.png")
    if case == "missing":
        os.remove(path)
    else:
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(b"not an image at all" if case == "corrupt" else data[: len(data) // 2])
    with pytest.raises(coco_defects.CocoFormatError, match=r"image id 5 .*gray\.png"):
        _records(root, strict=True)
    assert [int(key) for key, _ in _records(root)] == [11, 42]


@pytest.mark.parametrize("edit,message,skipped", [
    (lambda d: d["annotations"][1].update(image_id=999),
     r"annotation id 102: field 'image_id': annotation_unknown_image: unknown image id 999", 102),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
     r"annotation id 101 .*'bbox': bbox_malformed: malformed bbox", 101),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]),
     r"annotation id 101 .*negative", 101),
    (lambda d: d["annotations"][3].update(segmentation=[[1, 2, 3, 4, 5]]),
     r"annotation id 104 .*'segmentation': polygon_unusable", 104),
    (lambda d: d["annotations"][2]["segmentation"].update(size=[41, 50]),
     r"annotation id 103 .*'segmentation': rle_malformed: RLE size", 103),
    (lambda d: d["annotations"][4].update(category_id=1234),
     r"annotation id 105: field 'category_id': annotation_unknown_category", 105),
])
def test_bad_annotations_are_named(tmp_path, edit, message, skipped):
    """Strict: raised, naming the json, the id and the field; tolerant: that annotation alone is
    skipped."""
    root = str(tmp_path)
    write_coco_folder(root)
    path = _rewrite(root, edit)
    with pytest.raises(coco_defects.CocoFormatError, match=message) as info:
        _records(root, strict=True)
    assert path in str(info.value)
    kept = sorted(int(i) for _, r in _records(root) for i in r["annotation_ids"])
    assert kept == sorted({101, 102, 103, 104, 105} - {skipped})


def test_builder_surfaces_the_error(tmp_path):
    root = str(tmp_path / "coco")
    write_coco_folder(root)
    _rewrite(root, lambda d: d["annotations"][1].update(image_id=999))
    with pytest.raises(coco_defects.CocoFormatError,
                       match="annotation id 102: .*unknown image id 999"):
        builders.load("coco_instances", str(tmp_path / "tfds"), "train", manual_dir=root,
                      strict=True)


# ----------------------------------------------------------------------------- shapes


@pytest.fixture(scope="module")
def shapes_built(tmp_path_factory):
    config = builders.shapes_config(num_train=16, num_validation=4, seed=3)
    a = builders.load("shapes", str(tmp_path_factory.mktemp("s1")), "train", config=config)
    b = builders.load("shapes", str(tmp_path_factory.mktemp("s2")), "train", config=config)
    return a, b


def test_shapes_builder_is_deterministic(shapes_built):
    a, b = shapes_built
    assert len(a) == len(b) == 16
    for i in range(len(a)):
        ra, rb = a[i], b[i]
        assert ra.keys() == rb.keys()
        for key in ra:
            if isinstance(ra[key], np.ndarray):
                np.testing.assert_array_equal(ra[key], rb[key])
            else:
                assert ra[key] == rb[key], key
    assert "tensorflow" not in sys.modules
    assert [c["name"] for c in builders.categories(a)] == list(shapes.CLASS_NAMES)


def test_shapes_generator_seeds():
    one = shapes.generate_image(0, "train", 3)
    again = shapes.generate_image(0, "train", 3)
    other = shapes.generate_image(1, "train", 3)
    assert one["image"] == again["image"] and one["mask_rles"] == again["mask_rles"]
    assert one["image"] != other["image"]
    assert shapes.generate_image(0, "validation", 3)["image"] != one["image"]


def test_shapes_masks_consistent_with_boxes(shapes_built):
    source, _ = shapes_built
    opts = shapes.ShapesOptions()
    counts = []
    for i in range(len(source)):
        r = source[i]
        h, w = r["original_size"]
        assert r["image"].shape == (h, w, 3)
        assert opts.min_side <= h <= opts.max_side and opts.min_side <= w <= opts.max_side
        masks = coco_rle.decode_masks(r["mask_rles"], h, w)
        counts.append(len(masks))
        assert masks.sum(0).max(initial=0) <= 1  # occlusion: a pixel belongs to one instance
        for mask, box, area, label in zip(masks, r["boxes"], r["areas"], r["labels"]):
            ys, xs = np.nonzero(mask)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            assert area == mask.sum() >= opts.min_visible_pixels
            assert 1 <= label <= len(shapes.CLASS_NAMES)
        assert not r["is_crowd"].any() and bool(r["no_annotations"]) == (len(masks) == 0)
    assert max(counts) >= 2  # overlapping shapes do occur


def test_shapes_drops_mostly_hidden_instances():
    """Same draws without the visibility filter: the kept masks are a subset of those, and some
    instances are dropped (the filter acts after all random draws, so images are identical)."""
    loose_opts = shapes.ShapesOptions(min_visible_fraction=0.0, min_visible_pixels=1)
    dropped = 0
    for index in range(30):
        loose = shapes.generate_image(5, "train", index, loose_opts)
        kept = shapes.generate_image(5, "train", index)
        assert kept["image"] == loose["image"]
        loose_rles = list(loose["mask_rles"])
        for rle, label in zip(kept["mask_rles"], kept["labels"]):
            assert rle in loose_rles and loose["labels"][loose_rles.index(rle)] == label
        dropped += len(loose_rles) - len(kept["mask_rles"])
    assert dropped > 0
