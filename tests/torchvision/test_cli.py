"""The conversion CLI, checkpoint round trip, the parity report and the bf16 option, on the
converted torchvision model of test_maskrcnn_parity (shared fixtures)."""

import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import convert
from maskrcnn_jax import checkpoints
from maskrcnn_jax.inference.predictor import Predictor
from maskrcnn_jax.testing.parity_model import CANVAS, KWARGS


def _cli_args(kwargs):
    args = []
    for key, value in kwargs.items():
        args.append(f"--{key}={json.dumps(value)}")
    return args


def _convert(model, tmp_path, *flags):
    """Save `model`'s state dict as a .pth and run convert.py on it; returns the output dir."""
    path, out = tmp_path / "model.pth", tmp_path / "converted"
    torch.save(model.state_dict(), path)
    assert convert.main([str(path), "--out", str(out), f"--canvas_size={json.dumps(list(CANVAS))}",
                         *_cli_args(KWARGS), *flags]) == 0
    return out


@pytest.mark.slow
def test_convert_cli_round_trip(models, tmp_path, capsys):
    model, predictor, images = models
    out = _convert(model, tmp_path)
    assert "resnet50, 5 classes" in capsys.readouterr().out
    config, variables, _ = checkpoints.load_weights(out)
    assert config.to_dict() == predictor.config.to_dict()
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    expected = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(predictor.variables)))
    assert len(leaves) == len(expected)
    for key, value in leaves:
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[key]))
    # The reloaded model detects exactly as the original.
    a = Predictor(config, variables)(images[:1])[0]
    b = predictor(images[:1])[0]
    np.testing.assert_array_equal(a["boxes"], b["boxes"])


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["models", "models_v2"])
def test_compare_report(request, fixture, tmp_path, capsys):
    model, _, images = request.getfixturevalue(fixture)
    image_path = tmp_path / "image.png"
    Image.fromarray(images[0]).save(image_path)
    _convert(model, tmp_path, "--compare", str(image_path))
    report = capsys.readouterr().out
    rows = {}
    for stage in ("backbone C5", "FPN P6", "RPN logits P2", "box head class logits", "detections scores"):
        line = next(line for line in report.splitlines() if line.startswith(stage))
        rows[stage] = float(line[len(stage):].split()[1])  # max rel diff
    assert all(value <= 1e-4 for value in rows.values()), rows


@pytest.mark.slow
def test_bfloat16_compute(models):
    """bf16 compute, float32 parameters: features within bf16 rounding of float32, and the whole
    Predictor runs to finite, well-formed outputs. (Detections themselves are not compared: this
    random-weight model amplifies bf16 rounding into different proposals.)"""
    from maskrcnn_jax.data.transform import preprocess

    _, predictor, images = models
    # A copy: `as_configdict()` is the frozen config's own ConfigDict, and changing it would
    # change the shared fixture's config (and its hash) for every later test.
    config = predictor.config.as_configdict().copy_and_resolve_references()
    config.compute_dtype = "bfloat16"
    bf16 = Predictor(config, predictor.variables)
    batch = preprocess(images[:1], predictor.config)
    args = (batch.images, batch.padded_sizes)
    features = jax.jit(lambda v, *a: bf16.model.apply(v, *a, method="features"))(bf16.variables, *args)
    reference = jax.jit(lambda v, *a: predictor.model.apply(v, *a, method="features"))(predictor.variables, *args)
    for ours, theirs in zip(features, reference):
        assert ours.dtype == jax.numpy.bfloat16
        err = float(jax.numpy.abs(ours.astype(np.float32) - theirs).max() / jax.numpy.abs(theirs).max())
        assert err < 5e-2, err
    out = bf16(images[:1])[0]
    assert all(np.isfinite(v).all() for v in out.values())
    assert out["masks"].shape[1:] == (1, *images[0].shape[:2]) and out["masks"].dtype == np.float32
    assert jax.tree_util.tree_all(jax.tree.map(  # float leaves float32 (counters stay ints)
        lambda x: x.dtype == np.float32 or not np.issubdtype(x.dtype, np.floating),
        bf16.variables))


@pytest.mark.slow
def test_convert_cli_frozen_bn_eps(tmp_path, capsys):
    """`--frozen-bn-eps` (0.0 for torchvision's COCO_V1 checkpoint) reaches the saved config;
    without it the config keeps torchvision's 1e-5."""
    from maskrcnn_jax.config import model_config
    from maskrcnn_jax.testing.torch_models import torchvision_maskrcnn

    small = dict(backbone="resnet18", num_classes=4, min_size=96, max_size=128,
                 fpn_channels=32, box_representation_size=64, mask_head_layers=[32, 16],
                 mask_dim_reduced=24)
    torch.manual_seed(0)
    path = tmp_path / "model.pth"
    torch.save(torchvision_maskrcnn(model_config(**small)).state_dict(), path)
    for flag, expected in ((["--frozen_bn_eps=0.0"], 0.0), ([], 1e-5)):
        out = tmp_path / f"converted{len(flag)}"
        assert convert.main([str(path), "--out", str(out), *_cli_args(small), *flag]) == 0
        config, _, _ = checkpoints.load_weights(out)
        assert config.frozen_bn_eps == expected
    capsys.readouterr()
    try:
        convert.main(["--help"])
    except SystemExit:
        pass
    assert "overwrite_eps(model, 0.0)" in " ".join(capsys.readouterr().out.split())


def test_convert_cli_reads_the_architecture_from_the_state_dict(tmp_path, capsys):
    """Narrower heads, another depth and class count, no width flags: the written config is the
    state dict's (not torchvision's default widths, which would fail later in predict), and a flag
    that contradicts the state dict is an error naming both values."""

    from maskrcnn_jax.config import model_config
    from maskrcnn_jax.testing.torch_models import torchvision_maskrcnn

    small = dict(backbone="resnet18", num_classes=4, fpn_channels=32, box_representation_size=64,
                 mask_head_layers=[32, 16], mask_dim_reduced=24)
    torch.manual_seed(0)
    path = tmp_path / "model.pth"
    torch.save(torchvision_maskrcnn(model_config(min_size=96, max_size=128, **small))
               .state_dict(), path)
    out = tmp_path / "converted"
    assert convert.main([str(path), "--out", str(out), "--min_size=96", "--max_size=128"]) == 0
    assert "resnet18, 4 classes" in capsys.readouterr().out
    config, variables, _ = checkpoints.load_weights(out)
    for key, value in small.items():
        assert (list(config[key]) if key == "mask_head_layers" else config[key]) == value, key
    Predictor(config, variables)  # builds: config and weights agree
    # One line on stderr, exit status 2 (finding 8 of issue 25: the message was a traceback).
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"num_classes=91 given, but the state dict has 4") as e:
        convert.main([str(path), "--out", str(tmp_path / "bad"), "--num_classes=91"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
