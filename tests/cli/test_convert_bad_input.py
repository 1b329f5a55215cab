"""convert.py with bad input: it never replaces or shadows files it did not write (a non-empty
--out needs --overwrite, which replaces config.json and variables/ only; a train.py workdir is
always refused), and an unreadable .pth or a contradicting flag is one line on stderr."""

import json
import os

import pytest

import convert
from maskrcnn_jax import checkpoints
from tests.cli.conftest import assert_one_line_error, run_tool

# A small torchvision Mask R-CNN (ResNet-18, narrow heads): what convert.py reads.
SMALL = dict(backbone="resnet18", num_classes=4, fpn_channels=32, box_representation_size=64,
             mask_head_layers=[32, 16], mask_dim_reduced=24)


@pytest.fixture(scope="module")
def small_pth(tmp_path_factory):
    import torch

    from maskrcnn_jax.config import model_config
    from maskrcnn_jax.testing.torch_models import torchvision_maskrcnn

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pth") / "model.pth"
    torch.save(torchvision_maskrcnn(model_config(min_size=96, max_size=128, **SMALL))
               .state_dict(), path)
    return str(path)


def _tree(folder):
    """{relative path: bytes} of every file under `folder`."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def _fake_workdir(folder):
    """What train.py leaves in its workdir (the parts convert.py must not shadow)."""
    os.makedirs(os.path.join(folder, "checkpoints", "2", "state"))
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1, "loss": 2.0}\n')


def test_a_non_empty_out_is_refused_before_loading(tmp_path, capsys):
    """Finding 1: the folder's other files were deleted and its config.json replaced, exit 0."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "config.json").write_text('{"mine": true}')
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"not read: the folder is checked first")
    with pytest.raises(SystemExit) as info:
        convert.main([str(pth), f"--out={out}"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--overwrite" in err
    assert _tree(out) == {"notes.txt": b"keep me", "config.json": b'{"mine": true}'}


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_train_workdir_is_always_refused(tmp_path, capsys, overwrite):
    """Finding 1: a config.json written into a train.py workdir took the place of its training
    checkpoints for eval.py and predict.py."""
    workdir = str(tmp_path / "run")
    _fake_workdir(workdir)
    before = _tree(workdir)
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"not read")
    with pytest.raises(SystemExit) as info:
        convert.main([str(pth), f"--out={workdir}", *overwrite])
    assert info.value.code == 2
    assert "train.py workdir" in capsys.readouterr().err
    assert _tree(workdir) == before


def test_a_workdir_with_a_converted_config_is_not_read_silently(tmp_path, tiny_checkpoint):
    """A workdir polluted by an older convert.py: loading it names both instead of silently
    using the converted model."""
    import shutil

    workdir = str(tmp_path / "run")
    _fake_workdir(workdir)
    for name in ("config.json", "variables"):
        source = os.path.join(tiny_checkpoint, name)
        (shutil.copytree if os.path.isdir(source) else shutil.copy)(
            source, os.path.join(workdir, name))
    with pytest.raises(ValueError, match="holds both a train.py run"):  # a CheckpointError
        checkpoints.load_weights(workdir)


@pytest.mark.slow
def test_overwrite_replaces_only_what_convert_writes(small_pth, tmp_path, capsys):
    out = tmp_path / "converted"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "config.json").write_text('{"stale": true}')
    (out / "variables").mkdir()
    (out / "variables" / "stale").write_text("old")
    assert convert.main([small_pth, f"--out={out}", "--min_size=96", "--max_size=128",
                         "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / "variables" / "stale").exists()
    assert sorted(os.listdir(out)) == ["config.json", "notes.txt", "variables"]  # no temporaries
    config, _, _ = checkpoints.load_weights(out)
    assert config.backbone == "resnet18" and config.num_classes == 4
    assert json.loads((out / "config.json").read_text())["min_size"] == 96
    capsys.readouterr()


def test_unreadable_pth_is_one_line(tmp_path):
    """Finding 8: a truncated .pth was a traceback."""
    import torch

    path = tmp_path / "truncated.pth"
    torch.save({"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    path.write_bytes(path.read_bytes()[:300])
    result = run_tool("convert.py", str(path), f"--out={tmp_path / 'out'}")
    assert_one_line_error(result, 1, "convert.py", str(path), "cannot be read")
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_and_missing_pth(tmp_path, capsys):
    existing = tmp_path / "existing.txt"
    existing.write_text("mine")
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"x")
    for argv, fragment in (([str(pth), f"--out={existing}"], "is not a folder"),
                           ([str(tmp_path / "nope.pth"), f"--out={tmp_path / 'o'}"],
                            "no such file")):
        with pytest.raises(SystemExit) as info:
            convert.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, err
    assert existing.read_text() == "mine" and not (tmp_path / "o").exists()


def test_a_setting_of_the_wrong_kind_names_the_flag(tmp_path, capsys):
    """`--min_size=abc` failed inside the conversion with "'<' not supported between instances
    of 'int' and 'str'"."""
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"not read: the values are checked first")
    for flag, fragment in (("--min_size=abc", "--min_size=abc: expected a number"),
                           ("--image_mean=0.5", "--image_mean=0.5: expected a JSON list")):
        with pytest.raises(SystemExit) as info:
            convert.main([str(pth), f"--out={tmp_path / 'out'}", flag])
        assert info.value.code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
