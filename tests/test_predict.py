"""The predict CLI writes a picture and COCO-format detections per image."""

import json

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn_jax import convert, predict
from tests.test_export import _tiny


def test_predict_cli_writes_png_and_coco_json(tmp_path, capsys):
    config, variables = _tiny()
    convert.save(tmp_path / "ckpt", config, variables)
    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(60, 80), (90, 70)]):
        path = tmp_path / f"image{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    out = tmp_path / "out"
    assert predict.main([*paths, "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out),
                         "--score-threshold", "0.0"]) == 0
    for i, shape in enumerate([(60, 80), (90, 70)]):
        picture = np.asarray(Image.open(out / f"image{i}.png"))
        assert picture.shape == (*shape, 3)
        results = json.load(open(out / f"image{i}.json"))
        assert len(results) > 0 and all(r["image_id"] == i for r in results)
        for r in results:
            x, y, w, h = r["bbox"]
            assert w >= 0 and h >= 0 and 0 <= r["score"] <= 1 and r["category_id"] in (1, 2)
            assert mask_utils.decode(r["segmentation"]).shape == shape
    assert "image1.jpg: " in capsys.readouterr().out


def test_draw_detections_marks_masks_and_boxes():
    image = np.full((40, 50, 3), 100, np.uint8)
    masks = np.zeros((1, 1, 40, 50), np.float32)
    masks[0, 0, 10:20, 10:30] = 1.0
    detections = {"boxes": np.array([[5.0, 5.0, 35.0, 25.0]], np.float32), "scores": np.array([0.9], np.float32),
                  "labels": np.array([1]), "masks": masks}
    picture = predict.draw_detections(image, detections, ["bg", "thing"], 0.5)
    assert (picture[15, 20] != 100).any(), "mask pixels are tinted"
    assert (picture[38, 48] == 100).all(), "pixels outside every detection are untouched"
    low = dict(detections, scores=np.array([0.1], np.float32))
    np.testing.assert_array_equal(predict.draw_detections(image, low, None, 0.5), image)
