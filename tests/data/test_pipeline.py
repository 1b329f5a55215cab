"""grain pipeline: batches vs torchvision's transform + a float64 loop of the RoIAlign kernel.

References: torchvision's `GeneralizedRCNNTransform` (normalize, resize image / masks / boxes),
the flip of torchvision's reference `RandomHorizontalFlip`, torch's `nearest` interpolation, and a
float64 loop of the C++ RoIAlign kernel (aligned=False, adaptive grid, spatial scale 1) for the
mask crops (torchvision's pure-PyTorch roi_align fallback is far too slow for 112 x 112 crops).
The crops alone, against torchvision's `project_masks_on_boxes` too: test_mask_crops.py.
"""

import logging

import grain
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from maskrcnn_jax.config import model_config
from maskrcnn_jax.data import builders, coco_rle, pipeline
from maskrcnn_jax.data.transform import resized_size
from maskrcnn_jax.testing.coco_folder import write_coco_folder
from maskrcnn_jax.testing.references import numpy_roi_align

CONFIG = model_config(num_classes=4, min_size=64, max_size=96, canvas_size=(96, 96))  # one canvas
S = 14  # small crops keep the float64 loop reference fast


def roi_align_loop(mask, box, size):
    """float64 loop of torchvision's C++ RoIAlign (aligned=False, sampling_ratio=-1, scale 1) of
    one single-channel map (the ops tests' NumPy reference)."""
    out = numpy_roi_align(np.asarray(mask)[..., None], np.asarray([box], np.float32), (size, size),
                          1.0, -1, False)
    return out[0, :, :, 0]


@pytest.fixture(scope="module")
def coco_source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    write_coco_folder(root)
    return builders.load("coco_instances", str(tmp_path_factory.mktemp("tfds")), "train",
                         manual_dir=root)


def _torchvision_reference(record, min_size, flip):
    """torchvision: reference-script flip, then GeneralizedRCNNTransform (eval: min_size)."""
    image = torch.from_numpy(np.asarray(record["image"])).permute(2, 0, 1).float() / 255.0
    h0, w0 = image.shape[1:]
    target_boxes = np.clip(record["boxes"], 0, [w0, h0, w0, h0]).astype(np.float32)
    keep = ~record["is_crowd"]
    boxes = torch.from_numpy(target_boxes[keep]).reshape(-1, 4)
    masks = torch.from_numpy(coco_rle.decode_masks(record["mask_rles"], h0, w0)[keep])
    if flip:
        image, masks = image.flip(-1), masks.flip(-1)
        boxes[:, [0, 2]] = w0 - boxes[:, [2, 0]]
    transform = GeneralizedRCNNTransform(min_size, CONFIG.max_size, list(CONFIG.image_mean),
                                         list(CONFIG.image_std)).eval()
    with torch.no_grad():
        images, targets = transform([image], [{"boxes": boxes, "masks": masks}])
    h, w = images.image_sizes[0]
    crops = np.asarray([roi_align_loop(m.numpy().astype(np.float64), b, S)
                        for m, b in zip(targets[0]["masks"], targets[0]["boxes"].numpy())]
                       ).reshape(-1, S, S)
    return images.tensors[0].permute(1, 2, 0).numpy(), (h, w), targets[0]["boxes"].numpy(), crops


def _check_against_reference(batch, b, record, min_size, flip, max_instances):
    image, (h, w), boxes, crops = _torchvision_reference(record, min_size, flip)
    assert tuple(batch["image_sizes"][b]) == (h, w)
    assert tuple(batch["padded_sizes"][b]) == image.shape[:2]
    np.testing.assert_array_equal(batch["original_sizes"][b], record["original_size"])
    np.testing.assert_allclose(batch["images"][b, :h, :w], image[:h, :w], rtol=0, atol=2e-6)
    assert not batch["images"][b, h:].any() and not batch["images"][b, :, w:].any()
    n = len(boxes)
    valid = batch["valid"][b]
    assert valid[:n].all() and not valid[n:].any()
    np.testing.assert_array_equal(batch["boxes"][b, :n], boxes)
    np.testing.assert_array_equal(batch["labels"][b, :n], record["labels"][~record["is_crowd"]])
    np.testing.assert_allclose(batch["masks"][b, :n], crops, rtol=0, atol=1e-6)
    n_crowd = int(record["is_crowd"].sum())
    assert batch["is_crowd"][b, n:n + n_crowd].all() and not batch["is_crowd"][b, :n].any()
    rest = slice(n + n_crowd, max_instances)
    for key in ("boxes", "labels", "masks", "is_crowd"):
        assert not batch[key][b, rest].any(), key
    assert bool(batch["flipped"][b]) == flip
    assert bool(batch["no_annotations"][b]) == bool(record["no_annotations"])


def test_eval_batches_match_torchvision(coco_source):
    records = [coco_source[i] for i in range(len(coco_source))]
    loader = pipeline.make_dataset(coco_source, CONFIG, batch_size=2, train=False,
                                   max_instances=5, mask_crop_size=S)
    batches = list(loader)
    assert len(batches) == 2  # 3 images: the last batch padded
    expected_types = {"images": np.float32, "image_sizes": np.int32, "padded_sizes": np.int32,
                      "original_sizes": np.int32, "image_ids": np.int64, "boxes": np.float32,
                      "labels": np.int32, "valid": np.bool_, "masks": np.float32}
    shapes = {"images": (2, 96, 96, 3), "boxes": (2, 5, 4), "labels": (2, 5), "valid": (2, 5),
              "masks": (2, 5, S, S), "image_sizes": (2, 2), "image_ids": (2,)}
    for batch in batches:
        assert set(batch) == set(pipeline.BATCH_FIELDS)
        for key, dtype in expected_types.items():
            assert batch[key].dtype == dtype, key
        for key, shape in shapes.items():
            assert batch[key].shape == shape, key
    np.testing.assert_array_equal(batches[1]["batch_valid"], [True, False])
    assert not batches[1]["images"][1].any() and not batches[1]["valid"][1].any()
    ids = [int(i) for i in np.concatenate([b["image_ids"] for b in batches])[:3]]
    assert ids == [int(r["image_id"]) for r in records]  # eval: in order
    for k, record in enumerate(records):
        _check_against_reference(batches[k // 2], k % 2, record, CONFIG.min_size, False, 5)


def test_train_flip_matches_torchvision(coco_source):
    records = {int(coco_source[i]["image_id"]): coco_source[i] for i in range(len(coco_source))}
    loader = pipeline.make_dataset(coco_source, CONFIG, batch_size=3, train=True, seed=0,
                                   max_instances=4, mask_crop_size=S, flip_probability=1.0,
                                   min_sizes=(48,))
    batch = next(iter(loader))
    assert sorted(batch["image_ids"].tolist()) == sorted(records)
    for b, image_id in enumerate(batch["image_ids"]):
        _check_against_reference(batch, b, records[int(image_id)], 48, True, 4)


def test_scale_jitter_draws_each_size(coco_source):
    sizes = (40, 56, 64)
    loader = pipeline.make_dataset(coco_source, CONFIG, batch_size=3, train=True, seed=3,
                                   mask_crop_size=S, min_sizes=sizes, max_instances=4)
    it = iter(loader)
    seen = set()
    for _ in range(8):
        batch = next(it)
        for (h0, w0), hw in zip(batch["original_sizes"], batch["image_sizes"]):
            options = [resized_size(int(h0), int(w0), m, CONFIG.max_size) for m in sizes]
            assert tuple(hw) in options
            seen.add(options.index(tuple(hw)))
    assert seen == {0, 1, 2}


def _rect_record(areas_hw, crowd_index=None):
    """A 60x80 image whose instances are rectangles of the given (h, w) sizes."""
    masks, boxes = [], []
    for k, (h, w) in enumerate(areas_hw):
        m = np.zeros((60, 80), np.uint8, order="F")
        m[k:k + h, k:k + w] = 1
        masks.append(mask_utils.encode(m)["counts"])
        boxes.append([k, k, k + w, k + h])
    n = len(areas_hw)
    crowd = np.zeros(n, bool)
    if crowd_index is not None:
        crowd[crowd_index] = True
    return {"image": np.full((60, 80, 3), 128, np.uint8), "image_id": 9,
            "original_size": np.asarray([60, 80], np.int32), "boxes": np.asarray(boxes, np.float32),
            "labels": np.arange(1, n + 1, dtype=np.int32), "is_crowd": crowd,
            "areas": np.asarray([h * w for h, w in areas_hw], np.float32), "mask_rles": masks,
            "no_annotations": False}


def test_max_instances_keeps_largest_and_logs(caplog):
    record = _rect_record([(10, 10), (30, 30), (5, 8), (20, 25), (40, 40), (12, 9)], crowd_index=4)
    with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
        out = pipeline.prepare_example(record, CONFIG, min_size=60, flip=False, max_instances=3,
                                       mask_crop_size=S)
    # Targets (non-crowd) by area: 900 (label 2), 500 (label 4), 108 (label 6), 100, 40.
    np.testing.assert_array_equal(out["labels"], [2, 4, 6])
    np.testing.assert_array_equal(out["valid"], [True, True, True])
    assert out["num_dropped"] == 2 and not out["is_crowd"].any()
    assert "dropped 2" in caplog.text and "image id 9" in caplog.text
    # With room left, the crowd instance follows the targets, not valid.
    roomy = pipeline.prepare_example(record, CONFIG, min_size=60, flip=False, max_instances=7,
                                     mask_crop_size=S)
    np.testing.assert_array_equal(roomy["labels"], [1, 2, 3, 4, 6, 5, 0])
    np.testing.assert_array_equal(roomy["valid"], [1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(roomy["is_crowd"], [0, 0, 0, 0, 0, 1, 0])
    assert roomy["num_dropped"] == 0


def test_flip_mirrors_boxes_and_masks():
    record = _rect_record([(20, 30), (31, 17)])
    record["boxes"][1] = [3.5, 1.0, 20.0, 32.0]  # fractional, wider than the mask
    a = pipeline.prepare_example(record, CONFIG, min_size=60, flip=False, max_instances=2,
                                 mask_crop_size=S)
    b = pipeline.prepare_example(record, CONFIG, min_size=60, flip=True, max_instances=2,
                                 mask_crop_size=S)
    w = a["image_sizes"][1]
    np.testing.assert_allclose(b["boxes"][:, [0, 2]], w - a["boxes"][:, [2, 0]], atol=1e-4)
    np.testing.assert_array_equal(b["boxes"][:, [1, 3]], a["boxes"][:, [1, 3]])
    # RoIAlign with aligned=False reads pixel i at coordinate i (not i + 0.5), so a mirrored
    # box samples the mirrored mask one pixel off: equal up to the edges (the exact flip
    # arithmetic is checked against torchvision above); box 1 is not mirror symmetric.
    mirrored = np.abs(b["masks"][1] - a["masks"][1][:, ::-1]).mean()
    assert mirrored < 0.1 and mirrored < 0.3 * np.abs(b["masks"][1] - a["masks"][1]).mean()
    assert a["masks"][1].std() > 0.1  # a mask that is not mirror symmetric in its box


@pytest.fixture(scope="module")
def shapes_source(tmp_path_factory):
    config = builders.shapes_config(num_train=20, num_validation=4, seed=1)
    return builders.load("shapes", str(tmp_path_factory.mktemp("shapes")), "train", config=config)


def _loader(source, seed, **kwargs):
    args = dict(batch_size=2, train=True, seed=seed, max_instances=6, mask_crop_size=S,
                min_sizes=(48, 64))
    args.update(kwargs)
    return pipeline.make_dataset(source, CONFIG, **args)


def _assert_batches_equal(xs, ys):
    for x, y in zip(xs, ys, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_iterator_state_restores_and_seed_determines(shapes_source):
    it = iter(_loader(shapes_source, seed=5))
    first = [next(it) for _ in range(12)]  # past one epoch (10 batches)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = iter(_loader(shapes_source, seed=5))
    resumed.set_state(state)
    _assert_batches_equal([next(resumed) for _ in range(4)], expected)
    again = iter(_loader(shapes_source, seed=5))
    _assert_batches_equal([next(again) for _ in range(12)], first)
    other = iter(_loader(shapes_source, seed=6))
    other_ids = np.concatenate([next(other)["image_ids"] for _ in range(5)])
    assert not np.array_equal(other_ids, np.concatenate([b["image_ids"] for b in first[:5]]))
    epoch = np.concatenate([b["image_ids"] for b in first[:10]])
    assert sorted(epoch.tolist()) == sorted(int(shapes_source[i]["image_id"]) for i in range(20))
    assert {bool(f) for b in first for f in b["flipped"]} == {False, True}


def test_sharding_splits_the_records(shapes_source):
    ids = []
    for index in range(2):
        shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=False)
        loader = pipeline.make_dataset(shapes_source, CONFIG, batch_size=4, train=False,
                                       mask_crop_size=S, max_instances=6, shard_options=shard)
        ids.append([int(i) for b in loader for i, v in zip(b["image_ids"], b["batch_valid"]) if v])
    assert len(ids[0]) == len(ids[1]) == 10 and not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(int(shapes_source[i]["image_id"]) for i in range(20))


def test_masks_lie_on_their_boxes(shapes_source):
    """Shapes masks are tight to their boxes: every crop has mass near each of its borders."""
    batch = next(iter(_loader(shapes_source, seed=0, mask_crop_size=28)))
    crops = batch["masks"][batch["valid"]]
    assert len(crops) > 0
    for crop in crops:
        assert crop[:2].max() > 0.2 and crop[-2:].max() > 0.2
        assert crop[:, :2].max() > 0.2 and crop[:, -2:].max() > 0.2
        assert crop.mean() > 0.2
