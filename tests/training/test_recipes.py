"""The recipe configs run: each for 2 steps in a tiny variant (tiny backbone and heads, the
16-image shapes set, a 64 px canvas, LSJ into a 64 px square), as `train.train_and_evaluate`;
and the v2 LSJ recipe (synchronised batch norm) on 4 devices and on 2 processes x 2 devices
(`python train.py` subprocesses) equals 1 device (this process) for the same global batch."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train
from configs import coco_r50_fpn_v2_lsj, finetune, tpu_pod_v2_lsj
from maskrcnn_jax import checkpoints
from maskrcnn_jax.checkpoints import local_restore_target
from maskrcnn_jax.config import model_config
from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen
from maskrcnn_jax.testing.multiprocess import REPO, readme_command, run_processes
from maskrcnn_jax.training import train_lib

pytestmark = pytest.mark.slow

# The tiny variant of any recipe: `--config.KEY=VALUE` overrides (documented flags only).
TINY = {
    "model.backbone": "tiny", "model.fpn_channels": 16, "model.box_representation_size": 32,
    "model.mask_head_layers": (16, 16), "model.mask_dim_reduced": 16, "model.num_classes": 5,
    "model.min_size": 64, "model.max_size": 64, "model.canvas_buckets": ((64, 64),),
    "model.rpn_pre_nms_top_n_train": 100, "model.rpn_post_nms_top_n_train": 50,
    "model.rpn_pre_nms_top_n_test": 100, "model.rpn_post_nms_top_n_test": 50,
    "model.rpn_batch_size_per_image": 64, "model.box_batch_size_per_image": 32,
    "model.mask_rois_per_image": 4, "model.compute_dtype": "float32",
    "data.name": "shapes", "data.shapes.num_train": 16, "data.shapes.num_validation": 4,
    "data.shapes.seed": 0,
    "data.batch_size": 8, "data.min_sizes": (64,), "data.lsj_size": 64,
    "data.mask_crop_size": 14, "data.max_instances": 8, "data.worker_count": 0,
    "optimizer.warmup_steps": 1, "optimizer.milestones": (),
    "num_train_steps": 2, "log_every_steps": 1, "checkpoint_every_steps": 1,
    "eval_every_steps": 0, "final_eval": False, "distributed": False,
}


def tiny(config, data_dir):
    config.update_from_flattened_dict({**TINY, "data.data_dir": data_dir})
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    train.load_source(tiny(coco_r50_fpn_v2_lsj.get_config(), path).data, "train")
    return path


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if '"train"' in line]


def _flags(data_dir, workdir):
    overrides = {**TINY, "data.data_dir": data_dir}
    return ["--config=configs/coco_r50_fpn_v2_lsj.py", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in overrides.items()]]


def _params(state):
    return {c: [np.asarray(x, np.float64) for x in jax.tree.leaves(state[c])]
            for c in ("params", "batch_stats")}


def _rel_l2(a, b):
    return (np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b)))
            / np.sqrt(sum(np.sum(x ** 2) for x in a)))


def test_v2_recipe_on_four_devices_and_two_processes_equals_one(data_dir, tmp_path):
    """2 steps of the v2 LSJ recipe, global batch 8, on 1 device, on 4 simulated devices and on
    2 processes x 2 devices (the README's multi-process flags, gloo): the batch norms'
    statistics are over the global batch in all three, so the parameters and statistics agree
    to float32 summation order, far below what one step changes (per-device statistics would
    differ by the order of an update)."""
    states = {}
    for topology in ("1", "4", "2x2"):
        workdir = str(tmp_path / f"run{topology}")
        if topology == "1":  # in this process: train.py's loop on the recipe's tiny variant
            train.train_and_evaluate(tiny(coco_r50_fpn_v2_lsj.get_config(), data_dir), workdir)
            _check_trained(workdir)
        elif topology == "2x2":
            # The README's launch with this recipe instead of configs/tiny.py.
            argv = [*readme_command("train.py", replace={
                "/tmp/two": workdir, "/tmp/tfds": data_dir,
                "configs/tiny.py": "configs/coco_r50_fpn_v2_lsj.py"}),
                *_flags(data_dir, workdir)[2:]]
            logs = run_processes(argv, 2, 2, 900, str(tmp_path))
            assert all("process 1 of 2" in log or "process 0 of 2" in log for log in logs)
        else:
            env = dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={topology}")
            out = subprocess.run([sys.executable, "train.py", *_flags(data_dir, workdir)],
                                 cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            assert out.returncode == 0, out.stderr[-3000:]
            assert f"CpuDevice(id={int(topology) - 1})" in out.stderr
        directory = os.path.join(workdir, "checkpoints")
        with ocp.CheckpointManager(directory) as manager:
            states[topology] = {step: _params(manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(local_restore_target(directory, step)))).state)
                for step in (1, 2)}
    for collection in ("params", "batch_stats"):
        moved = _rel_l2(states["1"][2][collection], states["1"][1][collection])
        for topology in ("4", "2x2"):
            diff = _rel_l2(states["1"][2][collection], states[topology][2][collection])
            print(f"{collection}: 1 device vs {topology} {diff:.2e} (step 2 moved them "
                  f"{moved:.2e})")
            assert diff <= 1e-2 * moved, (collection, topology)


def test_tpu_pod_recipe_trains(data_dir, tmp_path):
    """configs/tpu_pod_v2_lsj.py in its tiny variant, in this process (in the tiny variant the
    same model, optimizer and batch as the 1-device run above: its compiled step)."""
    config = tiny(tpu_pod_v2_lsj.get_config(), data_dir)
    assert config.data.augmentation == "lsj" and config.model.batch_norm == "train"
    train.train_and_evaluate(config, str(tmp_path))
    _check_trained(str(tmp_path))


def _check_trained(workdir):
    """2 finite losses logged, and the FPN's batch norm updated twice."""
    losses = _losses(workdir)
    assert len(losses) == 2 and all(np.isfinite(losses))
    _, variables, _ = checkpoints.load_weights(workdir)
    stats = variables["batch_stats"]["fpn"]["inner_bn_0"]
    assert int(stats["num_batches_tracked"]) == 2
    assert np.abs(np.asarray(stats["running_mean"])).max() > 0


def test_finetune_v2_trains_its_batch_norms(data_dir, tmp_path):
    """configs/finetune.py:v2 from a v2 checkpoint of 3 classes to the shapes set's 5: the
    class layers start afresh, the batch norms train (statistics updated in every stage)."""
    config = tiny(finetune.get_config("v2"), data_dir)
    source = model_config(**{**config.model.to_dict(), "num_classes": 3})
    variables = train_lib.init_variables(MaskRCNN(frozen(source)), jax.random.PRNGKey(3))
    checkpoints.save_converted(str(tmp_path / "v2"), source, jax.device_get(variables))
    config.init_from = str(tmp_path / "v2")
    train.train_and_evaluate(config, str(tmp_path / "run"))
    _, trained, _ = checkpoints.load_weights(str(tmp_path / "run"))
    layer1 = trained["batch_stats"]["backbone"]["layer1_0"]["bn1"]
    assert int(layer1["num_batches_tracked"]) == 2  # a frozen stage's norm still updates
    before = variables["params"]["backbone"]["layer1_0"]["bn1"]["weight"]
    np.testing.assert_array_equal(trained["params"]["backbone"]["layer1_0"]["bn1"]["weight"],
                                  before)  # frozen stage: no update of its affine map
    assert not np.array_equal(trained["params"]["fpn"]["inner_bn_0"]["weight"],
                              variables["params"]["fpn"]["inner_bn_0"]["weight"])
