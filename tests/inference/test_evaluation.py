"""COCO evaluation: `evaluate` on a converted torchvision model reports the AP that torchvision's own
outputs give through pycocotools; the COCO conversion helpers; the eval.py CLI.

Set-up: a seeded torchvision Mask R-CNN of a small architecture (ResNet-18, narrow heads:
`torch_models.torchvision_maskrcnn`; random weights, logits sharpened as in the parity test) runs
on synthetic shapes validation images. A random-weight model does not find the shapes (AP ~0
on their real annotations, which would make the comparison vacuous), so the ground truth is
derived from its detections and then perturbed so that the AP lands mid-range, where ranking,
box and mask differences all move it: of each image's detections some are dropped (false
positives), some moved by 60% of their size (a false positive and a miss), the rest kept with
boxes jittered by up to 25% of their size (IoUs spread over ~0.5-0.95, so AP50..AP95 differ)
and masks eroded or dilated by 0-1 px; each image also gets an object nothing detects. That
COCO folder is read by the `coco_instances` builder, so `evaluate` runs through the real data
pipeline, label -> category mapping included. The check on the real shapes ground truth needs a
trained model: `bench/eval_agreement.py`.
"""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import eval as eval_cli
from maskrcnn_jax.checkpoints import save_converted
from maskrcnn_jax.config import model_config
from maskrcnn_jax.data import builders, shapes
from maskrcnn_jax.inference import coco_results, evaluation
from maskrcnn_jax.testing.torch_models import (
    make_confident,
    randomize_frozen_bn_and_biases,
    torchvision_maskrcnn,
)
from maskrcnn_jax.torchvision.convert import from_torchvision

KWARGS = dict(backbone="resnet18", num_classes=5, min_size=128, max_size=160,
              box_score_thresh=0.05, box_detections_per_img=20, rpn_pre_nms_top_n_test=200,
              rpn_post_nms_top_n_test=100, fpn_channels=64, box_representation_size=128,
              mask_head_layers=(64, 64), mask_dim_reduced=64)
CANVAS = (160, 160)
NUM_IMAGES = 32
CATEGORY_IDS = (3, 7, 18, 25)  # labels 1..4 in sorted order
BATCH_SIZE = 8
# |eval.py AP - torchvision AP| allowed (in AP points, 0.2 of a percent): both sides see the
# same detections up to float32 rounding, so an AP moves only where rounding flips an IoU
# threshold or a score order.
AP_TOLERANCE = 0.002


def _decoded(record):
    """The record's image as TFDS decodes it (PIL)."""
    return np.array(Image.open(io.BytesIO(record["image"])).convert("RGB"))


@pytest.fixture(scope="module", autouse=True)
def torch_single_thread():
    """torch on one thread: on a shared 2-core CPU, two threads run these small models ~9x
    slower (spinning on small ops). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    model = make_confident(torchvision_maskrcnn(model_config(canvas_size=CANVAS, **KWARGS)))
    randomize_frozen_bn_and_biases(model, seed=1)
    return model


def _perturbed(mask, radius):
    """`mask` dilated (radius > 0) or eroded (< 0) by |radius| 4-neighbour steps."""
    mask = mask.astype(bool)
    for _ in range(abs(radius)):
        padded = np.pad(mask, 1, constant_values=radius < 0)
        neighbours = [padded[1:-1, :-2], padded[1:-1, 2:], padded[:-2, 1:-1], padded[2:, 1:-1]]
        mask = (np.logical_or.reduce([mask, *neighbours]) if radius > 0
                else np.logical_and.reduce([mask, *neighbours]))
    return mask


def _ground_truth(rng, image_id, out, h, w, next_id):
    """Annotations from torchvision's detections (see the module docstring)."""
    anns = []
    boxes, labels = out["boxes"].numpy(), out["labels"].numpy()
    masks = out["masks"][:, 0].numpy() > 0.5
    for i in range(len(boxes)):
        if rng.uniform() < 0.2:  # dropped: this detection becomes a false positive
            continue
        label = int(labels[i])
        size = np.tile(boxes[i, 2:] - boxes[i, :2], 2)
        box = boxes[i] + rng.uniform(-1, 1, 4) * rng.uniform(0, 0.25) * size
        if rng.uniform() < 0.1:  # moved away: a false positive and a missed object
            box = box + np.tile(rng.choice([-1, 1], 2) * 0.6, 2) * size
        box = np.clip(box, 0, [w, h, w, h])
        mask = _perturbed(masks[i], int(rng.integers(-1, 2))).astype(np.uint8)
        if mask.sum() == 0 or box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        anns.append({"id": next_id + len(anns), "image_id": image_id,
                     "category_id": CATEGORY_IDS[label - 1], "iscrowd": 0,
                     "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]),
                              float(box[3] - box[1])],
                     "area": float(mask.sum()),
                     "segmentation": _rle(mask)})
    # In the most detected category: pycocotools averages AP over categories, and a category
    # with ground truth but (nearly) no detections would pin its AP at ~0.
    common = int(np.bincount(labels, minlength=2).argmax()) if len(labels) else 1
    anns.append({"id": next_id + len(anns), "image_id": image_id,
                 "category_id": CATEGORY_IDS[common - 1],
                 "iscrowd": 0, "bbox": [1.0, 1.0, 10.0, 10.0], "area": 100.0,
                 "segmentation": [[1.0, 1.0, 11.0, 1.0, 11.0, 11.0, 1.0, 11.0]]})
    return anns


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


@pytest.fixture(scope="module")
def dataset(torch_model, tmp_path_factory):
    """A COCO folder of shapes images annotated from torchvision's detections, its built
    `coco_instances` validation source, and torchvision's outputs per image id."""
    root = tmp_path_factory.mktemp("coco")
    os.makedirs(root / "val")
    os.makedirs(root / "annotations")
    rng = np.random.default_rng(0)
    images, annotations, outputs = [], [], {}
    for index in range(NUM_IMAGES):
        image = _decoded(shapes.generate_image(3, "validation", index))
        image_id = 1000 + 7 * index
        file_name = f"{image_id}.png"  # lossless: the builder's decode gives the same pixels
        Image.fromarray(image).save(root / "val" / file_name)
        with torch.no_grad():
            out = torch_model([torch.from_numpy(image).permute(2, 0, 1).float() / 255.0])[0]
        outputs[image_id] = out
        h, w = image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        annotations += _ground_truth(rng, image_id, out, h, w, len(annotations) + 1)
    categories = [{"id": c, "name": f"class{c}"} for c in reversed(CATEGORY_IDS)]
    with open(root / "annotations" / "instances_val.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    source = builders.load("coco_instances", data_dir, "validation", manual_dir=str(root))
    return {"source": source, "outputs": outputs, "data_dir": data_dir, "manual_dir": str(root)}


@pytest.fixture(scope="module")
def reference(dataset):
    """torchvision's detections through `detections_to_coco` and pycocotools."""
    source = dataset["source"]
    mapping = coco_results.label_to_category_map(builders.categories(source))
    results = []
    for image_id, out in dataset["outputs"].items():
        results += coco_results.detections_to_coco(
            image_id, out["boxes"].numpy(), out["scores"].numpy(), out["labels"].numpy(),
            out["masks"].numpy(), mapping)
    gt = builders.coco_ground_truth(source)
    metrics = {}
    for iou_type in coco_results.IOU_TYPES:
        stats = coco_results.coco_evaluate(gt, results, iou_type, verbose=False)
        metrics.update({f"{iou_type}/{k}": v for k, v in stats.items()})
    return metrics, results


@pytest.fixture(scope="module")
def converted(torch_model):
    return from_torchvision(torch_model.state_dict(), canvas_size=CANVAS, **KWARGS)


@pytest.fixture(scope="module")
def evaluated(converted, dataset, tmp_path_factory):
    config, variables = converted
    workdir = str(tmp_path_factory.mktemp("eval"))
    metrics = evaluation.evaluate(config, variables, dataset["source"], batch_size=BATCH_SIZE,
                                  workdir=workdir, progress=False)
    return metrics, workdir


def test_ap_matches_torchvision(reference, evaluated):
    ref, results = reference
    ours, _ = evaluated
    assert len(results) > 10 * NUM_IMAGES
    # Not vacuous: mid-range AP (neither ~0 nor saturated), and the strict IoU thresholds
    # matter (AP over .5:.95 well below AP50).
    for iou_type in ("bbox", "segm"):
        assert 0.2 <= ref[f"{iou_type}/AP"] <= 0.8, ref  # measured: bbox 0.364, segm 0.262
        assert ref[f"{iou_type}/AP50"] - ref[f"{iou_type}/AP"] >= 0.1, ref
    assert set(ours) == {f"{t}/{n}" for t in ("bbox", "segm") for n in coco_results.STAT_NAMES}
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "AR1", "AR100"):
            key = f"{iou_type}/{name}"
            assert abs(ours[key] - ref[key]) <= AP_TOLERANCE, (key, ours[key], ref[key])


def test_canvas_buckets_compile_once_each_and_keep_torchvisions_ap(converted, dataset,
                                                                   reference):
    """Without a canvas_size, evaluation runs each image in the smallest canvas bucket that
    holds it: one compiled function per bucket used, none when run again on other images,
    and the AP is still torchvision's (which ran every image alone)."""
    from maskrcnn_jax import runtime
    from maskrcnn_jax.data import record_buckets
    from maskrcnn_jax.inference.runner import compiled_detector

    config, variables = converted
    bucketed = model_config(**{**config.to_dict(), "canvas_size": None, "canvas_buckets": None})
    assert bucketed.canvas_buckets == ((128, 128), (128, 160), (160, 128))
    _, sizes = builders.image_ids_and_sizes(dataset["source"])
    used = record_buckets.bucket_positions(sizes, bucketed)
    assert {c: len(p) for c, p in used.items()} == {(128, 128): 2, (128, 160): 17,
                                                    (160, 128): 13}
    ours = evaluation.evaluate(bucketed, variables, dataset["source"], batch_size=BATCH_SIZE,
                               progress=False)
    forward = compiled_detector(bucketed, runtime.data_mesh())
    assert forward._cache_size() == 3
    evaluation.evaluate(bucketed, variables, dataset["source"], batch_size=BATCH_SIZE,
                        progress=False, max_images=5)
    assert forward._cache_size() == 3  # other images, the same buckets: nothing compiled
    ref, _ = reference
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "AR1", "AR100"):
            key = f"{iou_type}/{name}"
            assert abs(ours[key] - ref[key]) <= AP_TOLERANCE, (key, ours[key], ref[key])


def test_an_image_that_fits_no_bucket_is_named():
    from maskrcnn_jax.data import record_buckets

    config = model_config(min_size=128, max_size=160, canvas_buckets=[(128, 128)])
    with pytest.raises(ValueError, match=r"record 1: size 100x130 resizes to 123x160 .*none of"):
        record_buckets.bucket_positions(np.asarray([[100, 100], [100, 130]]), config)


def test_detections_file(reference, evaluated, dataset):
    _, ref_results = reference
    metrics, workdir = evaluated
    with open(os.path.join(workdir, "detections.json")) as f:
        detections = json.load(f)
    with open(os.path.join(workdir, "metrics.json")) as f:
        saved = json.load(f)
    assert {k: saved[k] for k in metrics} == metrics
    assert saved["num_images"] == NUM_IMAGES and saved["num_detections"] == len(detections)
    assert abs(len(detections) - len(ref_results)) <= 0.02 * len(ref_results)
    assert {d["image_id"] for d in detections} <= set(dataset["outputs"])
    assert {d["category_id"] for d in detections} <= set(CATEGORY_IDS)
    # Same top detection per image as torchvision (category, box within 0.1 px, score).
    top = {}
    for d in detections:
        if d["image_id"] not in top or d["score"] > top[d["image_id"]]["score"]:
            top[d["image_id"]] = d
    for image_id, out in dataset["outputs"].items():
        if len(out["scores"]) == 0:
            continue
        x1, y1, x2, y2 = out["boxes"][0].tolist()
        np.testing.assert_allclose(top[image_id]["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=0.1)
        np.testing.assert_allclose(top[image_id]["score"], float(out["scores"][0]), atol=1e-4)
        assert top[image_id]["category_id"] == CATEGORY_IDS[int(out["labels"][0]) - 1]


def test_detections_to_coco_round_trip():
    rng = np.random.default_rng(1)
    n, h, w = 5, 37, 53
    probs = rng.uniform(0, 1, (n, 1, h, w)).astype(np.float32)
    probs[0] = 0.5  # exactly at the threshold: not in the mask (torchvision: masks > 0.5)
    boxes = np.array([[1.5, 2.0, 10.25, 20.0]] * n, np.float32) + np.arange(n, dtype=np.float32)[:, None]
    scores = rng.uniform(0, 1, n).astype(np.float32)
    labels = np.array([1, 2, 3, 4, 2])
    mapping = {1: 3, 2: 7, 3: 18, 4: 25}
    results = coco_results.detections_to_coco(42, boxes, scores, labels, probs, mapping)
    assert len(results) == n
    json.dumps(results)  # JSON-ready
    for i, r in enumerate(results):
        assert r["image_id"] == 42
        assert r["category_id"] == mapping[int(labels[i])]
        np.testing.assert_array_equal(r["bbox"], [boxes[i, 0], boxes[i, 1],
                                                  boxes[i, 2] - boxes[i, 0], boxes[i, 3] - boxes[i, 1]])
        assert r["score"] == float(scores[i])
        assert r["segmentation"]["size"] == [h, w]
        decoded = mask_utils.decode({"size": [h, w], "counts": r["segmentation"]["counts"].encode()})
        np.testing.assert_array_equal(decoded, (probs[i, 0] > 0.5).astype(np.uint8))
    assert results[0]["segmentation"]["counts"] == mask_utils.encode(
        np.zeros((h, w), np.uint8, order="F"))["counts"].decode()
    # (N, H, W) masks and no masks at all.
    same = coco_results.detections_to_coco(42, boxes, scores, labels, probs[:, 0], mapping)
    assert same == results
    boxes_only = coco_results.detections_to_coco(42, boxes, scores, labels, None, mapping)
    assert all("segmentation" not in r for r in boxes_only)


def test_pasted_mask_rles_equal_encoding_the_pasted_masks():
    """Evaluation's RLEs from each box's extent are pycocotools' encoding of the full pasted
    masks (torchvision's `paste_masks_in_image`, tested in test_transform) thresholded at 0.5:
    boxes inside, across and outside the borders, masks all 1 (runs joining across columns),
    random, and empty."""
    from maskrcnn_jax.data.transform import paste_masks

    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(60):
        height, width = (int(v) for v in rng.integers(5, 60, 2))
        n = int(rng.integers(0, 8))
        x0, y0 = rng.uniform(-10, width, n), rng.uniform(-10, height, n)
        boxes = np.stack([x0, y0, x0 + rng.uniform(0, width + 10, n),
                          y0 + rng.uniform(0, height + 10, n)], 1).astype(np.float32)
        probs = rng.random((n, 6, 6)).astype(np.float32)
        if trial % 3 == 0:
            probs = np.ones_like(probs)
        expected = coco_results.encode_masks(paste_masks(probs, boxes, (height, width)) > 0.5)
        got = coco_results.pasted_mask_rles(probs, boxes, (height, width))
        assert [(list(r["size"]), r["counts"]) for r in got] == \
            [(list(r["size"]), r["counts"]) for r in expected], trial
        checked += sum(mask_utils.area(r) > 0 for r in expected)
    assert checked > 50  # most masks are not empty: the comparison is not vacuous


def test_label_mapping(dataset):
    mapping = coco_results.label_to_category_map(builders.categories(dataset["source"]))
    assert mapping == {1: 3, 2: 7, 3: 18, 4: 25}
    with pytest.raises(KeyError, match="label 5"):
        coco_results.detections_to_coco(1, np.zeros((1, 4)), [0.5], [5], None, mapping)


def test_empty_detections(dataset):
    assert coco_results.detections_to_coco(1, np.zeros((0, 4)), [], [], np.zeros((0, 1, 8, 8)),
                                         {1: 1}) == []
    gt = builders.coco_ground_truth(dataset["source"])
    for iou_type in coco_results.IOU_TYPES:
        stats = coco_results.coco_evaluate(gt, [], iou_type, verbose=False)
        assert stats["AP"] == 0.0 and stats["AP50"] == 0.0 and stats["AR100"] == 0.0
        assert stats["APl"] in (0.0, -1.0)


def test_faster_coco_eval_equals_pycocotools(dataset, reference):
    """The optional C++ COCOeval gives pycocotools' 24 stats on the same results, to float64
    summation order (measured: 1e-16)."""
    expected, results = reference
    gt = builders.coco_ground_truth(dataset["source"])
    fast = {}
    for iou_type in coco_results.IOU_TYPES:
        stats = coco_results.coco_evaluate(gt, results, iou_type, verbose=False,
                                         backend="faster_coco_eval")
        fast.update({f"{iou_type}/{k}": v for k, v in stats.items()})
    assert sorted(fast) == sorted(expected) and len(fast) == 24
    assert fast == pytest.approx(expected, abs=1e-12, rel=0)
    # Not vacuous: equal stats on other results would differ (the check can fail).
    worse = coco_results.coco_evaluate(gt, results[::2], "segm", verbose=False,
                                     backend="faster_coco_eval")
    assert worse["AP"] != expected["segm/AP"]
    with pytest.raises(ValueError, match="backend 'cocoapi'"):
        coco_results.coco_evaluate(gt, results, "bbox", backend="cocoapi")


def test_segm_uses_mask_areas(dataset):
    """A detection equal to a ground-truth object counts in that object's area range by mask."""
    gt = builders.coco_ground_truth(dataset["source"])
    ann = next(a for a in gt.dataset["annotations"] if isinstance(a["segmentation"], dict)
               and a["area"] < 32 ** 2 < a["bbox"][2] * a["bbox"][3])
    result = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 0.9,
              "bbox": ann["bbox"], "segmentation": ann["segmentation"]}
    stats = coco_results.coco_evaluate(gt, [result], "segm", image_ids=[ann["image_id"]],
                                     verbose=False)
    assert stats["ARs"] > 0


def test_cli_on_converted_checkpoint(converted, dataset, evaluated, tmp_path, capsys):
    config, variables = converted
    checkpoint = str(tmp_path / "ckpt")
    save_converted(checkpoint, config, variables)
    out = str(tmp_path / "out")
    assert eval_cli.main(["--checkpoint", checkpoint, "--data", "coco_instances",
                     "--data_dir", dataset["data_dir"], "--manual_dir", dataset["manual_dir"],
                     "--split", "validation", "--workdir", out,
                     "--batch_size", str(BATCH_SIZE), "--coco_eval", "faster_coco_eval"]) == 0
    printed = capsys.readouterr().out
    assert "IoU metric: bbox" in printed and "IoU metric: segm" in printed
    assert printed.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 2
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    expected, _ = evaluated  # pycocotools' stats of the same detections
    assert {k: saved[k] for k in expected} == pytest.approx(expected, abs=1e-12, rel=0)
    assert os.path.exists(os.path.join(out, "detections.json"))


def test_cli_missing_checkpoint_creates_nothing(tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(SystemExit, match=f"--checkpoint {missing}: no such directory"):
        eval_cli.main(["--checkpoint", str(missing), "--workdir", str(tmp_path / "out")])
    assert not missing.exists() and not (tmp_path / "out").exists()
