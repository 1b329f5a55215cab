"""predict.py: a picture and COCO-format detections per image; never overwrites an input or
another output; unreadable images skipped and reported; 16-bit images scaled; clear usage
errors that create nothing."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import predict
from maskrcnn_jax import checkpoints
from maskrcnn_jax.inference.draw import draw_detections
from maskrcnn_jax.testing.tiny import tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    config, variables = tiny_model()
    checkpoints.save_converted(directory, config, variables)
    return str(directory)


def _write(path, shape, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_predict_cli_writes_png_and_coco_json(checkpoint, tmp_path, capsys):
    paths = [_write(tmp_path / "in" / f"image{i}.jpg", shape, i)
             for i, shape in enumerate([(60, 80), (90, 70)])]
    out = tmp_path / "out"
    assert predict.main([*paths, "--checkpoint", checkpoint, "--out", str(out),
                         "--score_threshold=0.0"]) == 0
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


@pytest.mark.slow
def test_colliding_names_get_numbered_outputs(checkpoint, tmp_path):
    """a/img.jpg and b/img.png must not both write out/img.png (the first result lost)."""
    paths = [_write(tmp_path / "a" / "img.jpg", (40, 50), 0),
             _write(tmp_path / "b" / "img.png", (70, 30), 1),
             _write(tmp_path / "c" / "img_1.png", (30, 30), 2)]
    out = tmp_path / "out"
    assert predict.main([*paths, "--checkpoint", checkpoint, "--out", str(out)]) == 0
    shapes = {name: np.asarray(Image.open(out / f"{name}.png")).shape[:2]
              for name in ("img", "img_1", "img_1_1")}
    assert shapes == {"img": (40, 50), "img_1": (70, 30), "img_1_1": (30, 30)}
    assert json.load(open(out / "img_1.json")) is not None


def test_refuses_an_output_folder_holding_an_input(checkpoint, tmp_path):
    path = _write(tmp_path / "photos" / "cat.png", (40, 40))
    before = open(path, "rb").read()
    with pytest.raises(SystemExit, match="holds the input"):
        predict.main([path, "--checkpoint", checkpoint, "--out", str(tmp_path / "photos")])
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path / "photos") == ["cat.png"]


@pytest.mark.slow
def test_unreadable_images_are_skipped_and_fail_the_run(checkpoint, tmp_path, capsys):
    good = _write(tmp_path / "in" / "good.png", (40, 40))
    truncated = tmp_path / "in" / "truncated.jpg"
    _write(truncated, (64, 64))
    truncated.write_bytes(truncated.read_bytes()[:200])
    text = tmp_path / "in" / "notes.png"
    text.write_text("not an image")
    out = tmp_path / "out"
    status = predict.main([str(truncated), good, str(text), "--checkpoint", checkpoint,
                           "--out", str(out)])
    assert status == 1
    assert sorted(os.listdir(out)) == ["good.json", "good.png"]
    err = capsys.readouterr().err
    assert f"{truncated}: cannot read image" in err and f"{text}: cannot read image" in err
    assert "2 of 3 images skipped" in err


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit grayscale PNG (values up to 65535) reads as round(v / 257) gray, not the
    near-white that PIL's convert('RGB') clips it to."""
    from maskrcnn_jax.data.images import read_rgb

    values = np.array([[0, 257, 32896], [65535, 1000, 128]], np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = read_rgb(path)
    assert image.dtype == np.uint8 and image.shape == (2, 3, 3)
    np.testing.assert_array_equal(image[..., 0], np.round(values / 257).astype(np.uint8))
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_missing_checkpoint_is_an_error_that_creates_nothing(tmp_path):
    path = _write(tmp_path / "in" / "x.png", (20, 20))
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(SystemExit, match=f"--checkpoint {missing}: no such directory"):
        predict.main([path, "--checkpoint", str(missing), "--out", str(tmp_path / "out")])
    assert not missing.exists() and not (tmp_path / "out").exists()
    # The library loader refuses it too, instead of letting Orbax create the folder.
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        checkpoints.load_weights(str(missing))
    assert not missing.exists()


def test_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "never overwrite an input" in " ".join(out.split()) and "--score_threshold" in out
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["x.png", "--score_treshold=0.3"])
    assert exit_info.value.code == 2
    assert "score_treshold" in capsys.readouterr().err


def test_draw_detections_marks_masks_and_boxes():
    image = np.full((40, 50, 3), 100, np.uint8)
    masks = np.zeros((1, 1, 40, 50), np.float32)
    masks[0, 0, 10:20, 10:30] = 1.0
    detections = {"boxes": np.array([[5.0, 5.0, 35.0, 25.0]], np.float32),
                  "scores": np.array([0.9], np.float32), "labels": np.array([1]), "masks": masks}
    picture = draw_detections(image, detections, ["bg", "thing"], 0.5)
    assert (picture[15, 20] != 100).any(), "mask pixels are tinted"
    assert (picture[38, 48] == 100).all(), "pixels outside every detection are untouched"
    low = dict(detections, scores=np.array([0.1], np.float32))
    np.testing.assert_array_equal(draw_detections(image, low, None, 0.5), image)


@pytest.mark.slow
def test_persistent_compilation_cache(checkpoint, tmp_path):
    """predict.py stores its compiled programs in --compilation_cache_dir (a later run loads
    them instead of compiling); 'none' writes nothing."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    image = _write(tmp_path / "in" / "a.png", (40, 40))
    cache = tmp_path / "cache"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    for cache_flag, out in ((f"--compilation_cache_dir={cache}", "out1"),
                            ("--compilation_cache_dir=none", "out2")):
        subprocess.run([sys.executable, "predict.py", image, f"--checkpoint={checkpoint}",
                        f"--out={tmp_path / out}", cache_flag], cwd=repo, env=env, check=True,
                       timeout=300, capture_output=True)
    assert cache.is_dir() and len(os.listdir(cache)) > 0
    assert not (tmp_path / "xdg").exists()  # 'none': not even the default folder
