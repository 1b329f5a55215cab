"""The fine-tuning workflow end to end (`configs/finetune_shapes.py`), as a COCO user runs it.

1. Train on two of the four shapes classes (circle, square).
2. Save that model as a torchvision state dict (`to_torchvision`; torchvision's own
   `MaskRCNN` of that architecture loads it strictly) and start from the `.pth` file, which
   `--config.init_from` converts back (`from_torchvision`): the path of torchvision's COCO
   weights.
3. Fine-tune on all four classes (5 outputs instead of 3: the class-dependent layers start
   afresh, the rest from step 1, stem and layer1 frozen) and, for comparison, train the same
   schedule from scratch. After the same short schedule the fine-tuned model's mask AP on the
   four-class validation split is higher: the detector it starts from already finds shapes.
"""

import json
import os

import pytest
import torch

import train
from configs import finetune_shapes
from maskrcnn_jax import checkpoints
from maskrcnn_jax.testing.torch_models import torchvision_maskrcnn
from maskrcnn_jax.torchvision.convert import to_torchvision

# About 20 minutes on 2 cores: outside the CI suite, run with
# `pytest -m manual tests/training/test_finetune_shapes.py`.
pytestmark = [pytest.mark.slow, pytest.mark.manual]


def _config(stage, data_dir, **overrides):
    config = finetune_shapes.get_config(stage)
    config.data.data_dir = data_dir
    config.update_from_flattened_dict(overrides)
    return config


def test_finetuned_beats_scratch(tmp_path, capsys):
    data_dir = str(tmp_path / "tfds")
    train.train_and_evaluate(_config("pretrain", data_dir, final_eval=False),
                             str(tmp_path / "pre"))
    config, variables, _ = checkpoints.load_weights(str(tmp_path / "pre"))
    assert config.num_classes == finetune_shapes.PRETRAIN_CLASSES + 1
    state_dict = to_torchvision(config, variables)
    torchvision_maskrcnn(config).load_state_dict(state_dict, strict=True)
    pth = str(tmp_path / "pretrained.pth")
    torch.save(state_dict, pth)

    finetuned = train.train_and_evaluate(_config("finetune", data_dir, init_from=pth),
                                         str(tmp_path / "finetune"))
    scratch = train.train_and_evaluate(_config("scratch", data_dir), str(tmp_path / "scratch"))
    ap = {name: (r["eval/segm/AP"], r["eval/bbox/AP"])
          for name, r in (("fine-tuned", finetuned), ("from scratch", scratch))}
    with capsys.disabled():
        print("\nshapes, 4 classes, same schedule: mask AP / box AP: "
              + ", ".join(f"{k} {m:.3f} / {b:.3f}" for k, (m, b) in ap.items()))
    assert os.path.isdir(tmp_path / "finetune" / "checkpoints")
    check_transfer(ap, first_loss(tmp_path / "finetune"), first_loss(tmp_path / "scratch"))


def first_loss(workdir) -> float:
    """The first logged training loss of a run (the mean over its first 25 steps)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return next(r["loss"] for r in rows if r.get("split") == "train")


def check_transfer(ap, finetuned_loss, scratch_loss):
    """The fine-tuned run starts from a detector (its loss over the first 25 steps is well
    below the from-scratch run's) and ends ahead in both mask and box AP.

    At 200 steps the APs vary a lot between runs of code that moves the random initialisation
    by float rounding (2026-12-03: fine-tuned mask / box AP 0.086 / 0.113 vs 0.003 / 0.007
    from scratch; a later run 0.015 / 0.025 vs 0.000 / 0.001); the early loss (2.72 vs 3.75 in
    the later run) is the steadier sign of transfer.
    """
    assert finetuned_loss <= 0.85 * scratch_loss, (finetuned_loss, scratch_loss)
    for k, name in enumerate(("mask", "box")):
        assert ap["fine-tuned"][k] >= 0.01, (name, ap)  # it detects shapes at all
        assert ap["fine-tuned"][k] >= ap["from scratch"][k] + 0.01, (name, ap)
