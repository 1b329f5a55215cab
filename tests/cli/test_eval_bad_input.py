"""eval.py with bad input: results are written whole and only after an evaluation of at least
one image; a COCO folder is never evaluated with another folder's data; usage errors and
unusable checkpoints are one line on stderr."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import eval as eval_cli
from maskrcnn_jax.data import builders
from tests.cli.conftest import assert_one_line_error, run_tool

CATEGORIES = [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]


def write_coco_val(root, num_images, seed=0):
    """A COCO folder with `num_images` validation images (one box each), for the tiny
    3-class model (labels 1, 2)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "val"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images, annotations = [], []
    for k in range(num_images):
        name = f"{k}.png"
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
            os.path.join(root, "val", name))
        images.append({"id": k + 1, "file_name": name, "height": 40, "width": 50})
        annotations.append({"id": k + 1, "image_id": k + 1, "category_id": 1 + k % 2,
                            "iscrowd": 0, "area": 100.0, "bbox": [5.0, 5.0, 10.0, 10.0],
                            "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]})
    with open(os.path.join(root, "annotations", "instances_val.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return str(root)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Two COCO folders (3 and 5 images) and one data_dir, as everyone shares
    ~/tensorflow_datasets."""
    root = tmp_path_factory.mktemp("coco")
    return {"a": write_coco_val(root / "a", 3), "b": write_coco_val(root / "b", 5, seed=1),
            "data_dir": str(root / "tfds")}


def _eval(checkpoint, coco, folder, *extra):
    return eval_cli.main([f"--checkpoint={checkpoint}", "--data=coco_instances",
                          f"--data_dir={coco['data_dir']}", f"--manual_dir={coco[folder]}",
                          "--split=validation", "--progress=false", "--batch_size=1", *extra])


def _one_line_exit(argv, code, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        eval_cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == code and len(err.splitlines()) == 1, (info.value.code, err)
    return err


def test_another_coco_folder_is_not_read_from_the_first_ones_data(tiny_checkpoint, coco,
                                                                   tmp_path):
    """Finding 4: after building from folder a (3 images), --manual_dir=b (5 images) with the
    same --data_dir evaluated a's 3 images, silently."""
    for folder, expected in (("a", 3), ("b", 5), ("a", 3)):
        out = tmp_path / folder
        assert _eval(tiny_checkpoint, coco, folder, f"--workdir={out}") == 0
        assert json.load(open(out / "metrics.json"))["num_images"] == expected, folder


def test_changed_annotations_build_a_new_data_set(coco, tmp_path):
    """Finding 4, the same folder edited: a data set is keyed by its annotation files too."""
    root = write_coco_val(tmp_path / "edited", 2)
    data_dir = str(tmp_path / "tfds")
    assert len(builders.load("coco_instances", data_dir, "validation", manual_dir=root)) == 2
    write_coco_val(root, 4, seed=3)  # rewritten: another size and modification time
    assert len(builders.load("coco_instances", data_dir, "validation", manual_dir=root)) == 4
    assert sorted(builders.built_coco_sets(data_dir).values()) == [os.path.realpath(root)] * 2
    # Without manual_dir, several data sets built from the folder are an error naming it.
    with pytest.raises(ValueError, match="several folders"):
        builders.load("coco_instances", data_dir, "validation")


def test_max_images_zero_keeps_the_previous_results(tiny_checkpoint, coco, tmp_path, capsys):
    """Finding 3: --max_images=0 exited 0 with every AP at -1 and replaced a good
    metrics.json and detections.json."""
    out = tmp_path / "eval"
    assert _eval(tiny_checkpoint, coco, "a", f"--workdir={out}") == 0
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "detections.json")}
    for bad in ("--max_images=0", "--max_images=-1"):  # -1: `__len__() should return >= 0`
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            _eval(tiny_checkpoint, coco, "a", f"--workdir={out}", bad)
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and len(err.splitlines()) == 1 and "max_images" in err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(out)) == ["detections.json", "metrics.json"]


def test_unknown_split_is_one_line_naming_the_splits(tiny_checkpoint, coco, capsys, tmp_path):
    err = _one_line_exit([f"--checkpoint={tiny_checkpoint}", "--data=coco_instances",
                          f"--data_dir={coco['data_dir']}", f"--manual_dir={coco['a']}",
                          "--split=tset", f"--workdir={tmp_path / 'out'}"], 2, capsys)
    assert "split 'tset'" in err and "['validation']" in err
    err = _one_line_exit([f"--checkpoint={tiny_checkpoint}", "--data_config=bogus",
                          f"--data_dir={tmp_path / 'tfds'}", f"--workdir={tmp_path / 'out'}"], 2,
                         capsys)
    assert "no builder config 'bogus'" in err
    assert not (tmp_path / "out").exists()


def test_unusable_checkpoints_are_one_line_naming_the_file(tiny_checkpoint, tmp_path, capsys):
    """Finding 8: an empty checkpoint folder, an invalid config.json (a JSONDecodeError that
    did not name the file) and num_classes not matching the weights were tracebacks."""
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _one_line_exit([f"--checkpoint={empty}"], 1, capsys)
    assert str(empty) in err and "not a checkpoint" in err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "config.json").write_text('{"num_classes": 3,')
    err = _one_line_exit([f"--checkpoint={broken}"], 1, capsys)
    assert str(broken / "config.json") in err and "not valid JSON" in err
    values = json.load(open(os.path.join(tiny_checkpoint, "config.json")))
    (broken / "config.json").write_text(json.dumps(dict(values, num_classes=5)))
    err = _one_line_exit([f"--checkpoint={broken}"], 1, capsys)
    assert "num_classes=5" in err and str(broken) in err
    assert sorted(os.listdir(broken)) == ["config.json", "variables"]  # nothing written


def test_a_failure_is_one_line_on_stderr_with_no_noise(tmp_path):
    """As a user runs it: the process's whole stderr is the one line."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_tool("eval.py", f"--checkpoint={empty}"), 1, "eval.py",
                          str(empty))


def test_json_outputs_are_written_whole_or_not_at_all(tmp_path):
    """Deliverable 1: a write that fails half-way leaves the previous file, and no temporary."""
    from maskrcnn_jax import files

    path = tmp_path / "metrics.json"
    files.write_json(path, {"bbox/AP": 0.5})
    with pytest.raises(TypeError):
        files.write_json(path, {"bbox/AP": 0.25, "bad": object()})  # fails while writing
    assert json.load(open(path)) == {"bbox/AP": 0.5}
    assert os.listdir(tmp_path) == ["metrics.json"]
