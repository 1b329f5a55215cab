"""predict.py with bad input: inputs reached through symlinks or hard links are never
overwritten, an --out that is a file is refused before the model loads, an image with an
extreme aspect ratio or too many pixels is named by its path and reason, EXIF orientation is
applied (and can be turned off), and large images cost no full-image float array per
detection."""

import json
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import predict
from maskrcnn_jax import checkpoints
from maskrcnn_jax.inference.coco_results import detections_to_coco
from maskrcnn_jax.inference.predictor import Predictor
from tests.cli.conftest import assert_one_line_error, run_tool


def _write(path, shape, seed=0, **save_kwargs):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path, **save_kwargs)
    return str(path)


def _usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        predict.main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, (info.value.code, err)
    return err


def test_an_input_symlinked_into_out_is_not_overwritten(tiny_checkpoint, tmp_path, capsys):
    """Finding 2: the check compared unresolved folders, so out/a.png (the target of the input
    in/a.png) was overwritten by a.png's own output."""
    target = _write(tmp_path / "out" / "a.png", (40, 40))
    os.makedirs(tmp_path / "in")
    os.symlink(target, tmp_path / "in" / "a.png")
    before = open(target, "rb").read()
    err = _usage_error([str(tmp_path / "in" / "a.png"), f"--checkpoint={tiny_checkpoint}",
                        f"--out={tmp_path / 'out'}"], capsys)
    assert "a.png" in err
    assert open(target, "rb").read() == before
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png"]


def test_an_input_hard_linked_to_an_output_is_not_overwritten(tiny_checkpoint, tmp_path, capsys):
    """Finding 2, hard links: out/b.png is the same file as the input in/b.png."""
    source = _write(tmp_path / "in" / "b.png", (40, 40))
    os.makedirs(tmp_path / "out")
    os.link(source, tmp_path / "out" / "b.png")
    before = open(source, "rb").read()
    err = _usage_error([source, f"--checkpoint={tiny_checkpoint}", f"--out={tmp_path / 'out'}"],
                       capsys)
    assert "is the input" in err and source in err
    assert open(source, "rb").read() == before
    assert os.listdir(tmp_path / "out") == ["b.png"]


def test_out_naming_a_file_is_refused_before_loading(tiny_checkpoint, tmp_path):
    """Finding 8: FileExistsError after the model loaded (a traceback)."""
    image = _write(tmp_path / "in" / "c.png", (30, 30))
    existing = tmp_path / "results.txt"
    existing.write_text("mine")
    result = run_tool("predict.py", image, f"--checkpoint={tiny_checkpoint}", f"--out={existing}")
    assert_one_line_error(result, 2, "predict.py", str(existing), "not a folder")
    assert existing.read_text() == "mine"


def test_unusable_images_are_named_by_path_and_reason(tiny_checkpoint, tmp_path, capsys):
    """Finding 8: a 3x5000 image was reported as 'image 0' that 'could not be read'. Also the
    pixel limit (deliverable 4), with a small --max_pixels instead of a huge image."""
    thin = _write(tmp_path / "in" / "thin.png", (3, 5000))
    big = _write(tmp_path / "in" / "big.png", (100, 200), seed=1)
    good = _write(tmp_path / "in" / "good.png", (40, 40), seed=2)
    out = tmp_path / "out"
    status = predict.main([thin, big, good, f"--checkpoint={tiny_checkpoint}", f"--out={out}",
                           "--max_pixels=16000"])
    assert status == 1
    err = capsys.readouterr().err
    assert f"skipped {thin}: size 3x5000 resizes to" in err and "image 0" not in err
    assert f"skipped {big}: too large: 200x100 = 20,000 pixels, above the limit of 16,000" in err
    assert "2 of 3 images skipped" in err
    assert sorted(os.listdir(out)) == ["good.json", "good.png"]


def test_exif_orientation_is_applied_unless_turned_off(tiny_checkpoint, tmp_path):
    """Finding 6: a photo stored sideways (EXIF orientation 6: rotate 90 degrees clockwise to
    view) was detected on its stored pixels and drawn sideways."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = _write(tmp_path / "in" / "phone.jpg", (40, 64), exif=exif.tobytes())  # stored 40x64
    for flag, shape in (([], (64, 40)), (["--exif_transpose=false"], (40, 64))):
        out = tmp_path / f"out{len(flag)}"
        assert predict.main([photo, f"--checkpoint={tiny_checkpoint}", f"--out={out}",
                             "--score_threshold=0.0", *flag]) == 0
        assert np.asarray(Image.open(out / "phone.png")).shape == (*shape, 3)
        results = json.load(open(out / "phone.json"))
        assert results and all(mask_utils.decode(r["segmentation"]).shape == shape
                               for r in results)
    # What predict detects on is the upright image, as a viewer shows it.
    with Image.open(photo) as stored:
        upright = np.asarray(stored.transpose(Image.Transpose.ROTATE_270))
    from maskrcnn_jax.data.images import read_rgb

    np.testing.assert_array_equal(read_rgb(photo, exif_transpose=True), upright)


def test_predict_outputs_equal_the_pasted_masks_and_stay_bounded(tiny_checkpoint, tmp_path):
    """Finding 7: predict pasted a full-image float32 mask per detection (N x H x W x 4 bytes;
    a 12000x9000 photo was killed at 15 GB). The outputs are those of the pasted masks, and
    predicting a 1500x2000 image with 10 detections stays far below the 10 x 12 MB that full
    masks alone would take (measured with tracemalloc, which sees NumPy's allocations)."""
    path = _write(tmp_path / "in" / "large.png", (1500, 2000))
    out = tmp_path / "out"
    predict.main([path, f"--checkpoint={tiny_checkpoint}", f"--out={out}"])  # compile, warm
    tracemalloc.start()
    try:
        assert predict.main([path, f"--checkpoint={tiny_checkpoint}", f"--out={out}",
                             "--score_threshold=0.0"]) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    results = json.load(open(out / "large.json"))
    assert len(results) == 10  # the tiny model keeps box_detections_per_img=10
    image_bytes = 1500 * 2000 * 3
    print(f"peak {peak / image_bytes:.2f} x the decoded image")
    assert peak < 8 * image_bytes, peak / image_bytes  # full masks: 10 x 4 x 1500 x 2000 alone
    # The same results as pasting every mask into the whole image (torchvision's format).
    config, variables, _ = checkpoints.load_weights(tiny_checkpoint)
    image = np.asarray(Image.open(path).convert("RGB"))
    pasted = Predictor(config, variables)([image])[0]
    expected = detections_to_coco(0, pasted["boxes"], pasted["scores"], pasted["labels"],
                                  pasted["masks"], {1: 1, 2: 2})
    assert results == json.loads(json.dumps(expected))
