"""Batch norm + large-scale jitter trains: the main job's architecture from scratch
(`configs/shapes_bn_lsj.py`: trainable batch norm in the backbone, LSJ into 160 x 160) against
the main job itself (`configs/shapes.py`: FrozenBatchNorm, the resize jitter), the same 1,600
steps of 4 images each, both evaluated on the 200 validation images. The batch-norm recipe
reaches at least the main job's mask AP: the target, not met yet (neither by torchvision's loop
of the same recipe: configs/shapes_bn_lsj.py). Figures in BENCHMARKS.md."""

import pytest

import train
from configs import shapes, shapes_bn_lsj

# About 45 minutes on 2 cores: outside the CI suite, run with
# `pytest -m manual -s tests/training/test_shapes_bn_lsj.py`.
pytestmark = [pytest.mark.slow, pytest.mark.manual]


def test_batch_norm_and_lsj_reach_the_main_jobs_mask_ap(tmp_path, capsys):
    results = {}
    for name, module in (("FrozenBatchNorm main job", shapes),
                         ("BatchNorm + LSJ", shapes_bn_lsj)):
        config = module.get_config()
        config.data.data_dir = str(tmp_path / "tfds")
        results[name] = train.train_and_evaluate(config, str(tmp_path / module.__name__))
    with capsys.disabled():
        print("\nshapes, 1600 steps: mask AP / box AP: " + ", ".join(
            f"{k} {r['eval/segm/AP']:.3f} / {r['eval/bbox/AP']:.3f}" for k, r in results.items()))
    frozen, bn = results["FrozenBatchNorm main job"], results["BatchNorm + LSJ"]
    assert frozen["eval/segm/AP"] > 0.3  # the main job trained: the comparison means something
    assert bn["eval/segm/AP"] >= frozen["eval/segm/AP"]
