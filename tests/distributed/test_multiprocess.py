"""Two JAX processes x 2 CPU devices on localhost (jax.distributed, gloo) against one process x 4.

Three runs of `tests/distributed/worker.py` (tiny model, 16 training / 5 validation shapes
images, global batch 8, 6 steps, checkpoints every 2), each bounded in time
(`run_processes`: a failed or hung process fails the test with every log tail):
  1. one process x 4 devices: run B (6 steps, then the evaluation inside train.py);
  2. two processes x 2 devices: run A, with SIGTERM sent to process 1 only after step 2, then
     rerun to step 6 and evaluated inside train.py; run D resuming B's step-4 checkpoint;
     eval.py on A's checkpoint;
  3. one process x 4 devices: run C resuming A's step-2 checkpoint; eval.py on A's checkpoint.

Same global batch on the same 4 devices (the input pipeline's global sequence does not depend on
the process count), so each device computes the same forward and backward in both topologies;
only the cross-device gradient all-reduce differs (XLA's in-process reduction vs gloo's), i.e.
float32 summation order. Measured: losses equal at steps 1-2, 7.5e-7 apart (relative) at step 3;
parameters 2.7e-5 apart (relative L2) at step 4 and 5.4e-4 at step 6, while two steps move them
by 1.2e-2: the rounding difference of each update (~4e-4 of the update itself, as 8 devices vs 1
in tests/training/test_train.py) is amplified ~20x per 2 steps by the training dynamics at this
learning rate, so bit-equality across topologies is not expected and the bounds below are ~7-10x
the measured values (a missing or doubled all-reduce would be O(1) of the update).
"""

import json
import os
import shutil
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

import train
from configs import tiny
from maskrcnn_jax.checkpoints import local_restore_target
from maskrcnn_jax.testing.multiprocess import run_processes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6
SHAPES = {"num_train": 16, "num_validation": 5, "seed": 0}
TIMEOUT_S = 600  # per run; measured ~1-2 min on 2 shared cores
# Relative L2 parameter difference allowed between the 2x2 and 1x4 runs (module docstring):
# after 4 steps (measured 2.7e-5), after 6 (5.4e-4); and a resumed run (2 steps in the other
# topology from the same state) against its reference.
PARAMS_RTOL = {4: 2e-4, 6: 5e-3}
RESUMED_RTOL = 2e-4
LOSS_RTOL = 1e-5  # the steps before the rounding differences have grown (steps 1-3)

pytestmark = pytest.mark.slow


def _config(data_dir, **overrides):
    # Every detection kept (score threshold 0): a 6-step model's scores are low, and the
    # evaluation comparison needs detections to compare.
    return {"data.data_dir": data_dir, "data.shapes": SHAPES, "num_train_steps": STEPS,
            "data.eval_batch_size": 1, "model.box_score_thresh": 0.0, **overrides}


def _launch(tmp, name, num_processes, devices, phases):
    out = os.path.join(tmp, name)
    os.makedirs(out)
    plan = {"out": out, "compilation_cache": os.path.join(tmp, "jax_cache"), "phases": phases}
    plan_path = os.path.join(out, "plan.json")
    with open(plan_path, "w") as f:
        json.dump(plan, f)
    run_processes([sys.executable, os.path.join(REPO, "tests", "distributed", "worker.py"),
                   plan_path], num_processes, devices, TIMEOUT_S, out, cwd=REPO)
    records = {}
    for phase in phases:
        records[phase["name"]] = []
        for p in range(num_processes):
            with open(os.path.join(out, f"{phase['name']}.p{p}.json")) as f:
                records[phase["name"]].append(json.load(f))
    return records


def _copy_until(src, dst, step):
    """A copy of workdir `src` whose checkpoints stop at `step` (a run interrupted there)."""
    shutil.copytree(os.path.join(src, "checkpoints"), os.path.join(dst, "checkpoints"))
    for name in os.listdir(os.path.join(dst, "checkpoints")):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(dst, "checkpoints", name))


def _state(workdir, step):
    directory = os.path.join(workdir, "checkpoints")
    with ocp.CheckpointManager(directory) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(local_restore_target(directory, step)),
            data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data)


def _params_rel_l2(a, b):
    import jax

    la, lb = jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])
    assert len(la) == len(lb) > 0
    diff = np.sqrt(sum(np.sum((np.asarray(x, np.float64) - y) ** 2) for x, y in zip(la, lb)))
    norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in la))
    return diff / norm


def _keyed(d):
    return {int(k): v for k, v in d.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("multiprocess"))
    data_dir = os.path.join(tmp, "tfds")
    config = tiny.get_config()
    config.data.data_dir = data_dir
    config.data.shapes = SHAPES
    for split in ("train", "validation"):
        train.load_source(config.data, split)  # built once, here
    w = {k: os.path.join(tmp, k) for k in ("A", "B", "C", "D", "evalA2", "evalA1")}
    one = _launch(tmp, "one_process", 1, 4, [
        {"name": "B", "kind": "train", "workdir": w["B"], "config": _config(
            data_dir, final_eval=True)}])
    _copy_until(w["B"], w["D"], 4)
    eval_args = lambda out: ["--checkpoint", w["A"], "--workdir", out, "--batch_size", "1",  # noqa: E731
                             "--data_dir", data_dir, "--progress=false"]
    two = _launch(tmp, "two_processes", 2, 2, [
        {"name": "A_sigterm", "kind": "train", "workdir": w["A"], "config": _config(data_dir),
         "sigterm": [1, 2]},
        {"name": "A", "kind": "train", "workdir": w["A"], "config": _config(
            data_dir, final_eval=True)},
        {"name": "D", "kind": "train", "workdir": w["D"], "config": _config(data_dir)},
        {"name": "evalA", "kind": "eval_cli", "args": eval_args(w["evalA2"])}])
    _copy_until(w["A"], w["C"], 4)
    one_again = _launch(tmp, "one_process_again", 1, 4, [
        {"name": "C", "kind": "train", "workdir": w["C"], "config": _config(data_dir)},
        {"name": "evalA", "kind": "eval_cli", "args": eval_args(w["evalA1"])}])
    return {"one": one, "two": two, "one_again": one_again, "workdirs": w}


def test_topologies(runs):
    for name, records in [("B", runs["one"]["B"]), ("A", runs["two"]["A"]),
                          ("D", runs["two"]["D"]), ("C", runs["one_again"]["C"])]:
        assert [(r["process_count"], r["devices"]) for r in records] == (
            [(1, 4)] if len(records) == 1 else [(2, 4), (2, 4)]), name
    assert [r["process_index"] for r in runs["two"]["A"]] == [0, 1]


def _merged(first, second):
    """Per process: the losses / image ids of an interrupted run and its rerun, by step."""
    return [{key: {**_keyed(a[key]), **_keyed(b[key])} for key in ("losses", "image_ids")}
            for a, b in zip(first, second)]


def test_two_processes_train_as_one(runs):
    a = _merged(runs["two"]["A_sigterm"], runs["two"]["A"])
    b = runs["one"]["B"][0]
    assert a[0]["losses"] == a[1]["losses"]  # replicated metrics
    assert sorted(a[0]["losses"]) == sorted(_keyed(b["losses"])) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([a[0]["losses"][s] for s in (1, 2, 3)],
                               [_keyed(b["losses"])[s] for s in (1, 2, 3)], rtol=LOSS_RTOL)
    # Each process fed its half of the one-process global batch, at every step.
    ids = [r["image_ids"] for r in a]
    for step, global_ids in _keyed(b["image_ids"]).items():
        assert ids[0][step] + ids[1][step] == global_ids, step
    # One epoch = 2 steps of 8: every image once, none read by both processes.
    for epoch in range(STEPS // 2):
        steps = (2 * epoch + 1, 2 * epoch + 2)
        seen = [sum((ids[p][s] for s in steps), []) for p in range(2)]
        assert not set(seen[0]) & set(seen[1]), (epoch, seen)
        assert len(seen[0] + seen[1]) == len(set(seen[0] + seen[1])) == SHAPES["num_train"]
    for step, rtol in PARAMS_RTOL.items():
        state_a, data_a = _state(runs["workdirs"]["A"], step)
        state_b, data_b = _state(runs["workdirs"]["B"], step)
        assert data_a == data_b == {"records_consumed": step * 8}
        assert _params_rel_l2(state_a, state_b) <= rtol, step
    # Not vacuous: two steps move the parameters far more than the bounds.
    moved = _params_rel_l2(_state(runs["workdirs"]["B"], 4)[0], _state(runs["workdirs"]["B"], 6)[0])
    assert moved > 2 * PARAMS_RTOL[6], moved


def test_distributed_eval_equals_one_process(runs):
    """The evaluation inside train.py and eval.py, 2 processes vs 1: the same metrics on every
    process, the same detections file (5 images: shards of 3 and 2 + padding)."""
    a, b = runs["two"]["A"], runs["one"]["B"][0]
    metrics = [{k: v for k, v in r["result"].items() if k.startswith("eval/")} for r in a]
    assert len(metrics[0]) == 24 and metrics[0] == metrics[1]
    assert len({k: v for k, v in b["result"].items() if k.startswith("eval/")}) == 24
    w = runs["workdirs"]
    files = {}
    for name in ("evalA2", "evalA1"):
        with open(os.path.join(w[name], "detections.json")) as f:
            detections = json.load(f)
        with open(os.path.join(w[name], "metrics.json")) as f:
            files[name] = (detections, json.load(f))
    (det2, met2), (det1, met1) = files["evalA2"], files["evalA1"]
    assert met2["num_images"] == met1["num_images"] == SHAPES["num_validation"]
    assert len(det1) > 20 and len({d["image_id"] for d in det1}) == 5  # not vacuous
    assert det2 == det1 and met2 == met1
    # The train.py evaluation of A (2 processes) wrote the same file as eval.py on its checkpoint.
    with open(os.path.join(w["A"], "metrics.json")) as f:
        assert json.load(f) == met1
    # Every process got process 0's float64 metrics, bit for bit.
    assert {f"eval/{k}": v for k, v in met1.items() if "/" in k} == metrics[0]


def test_checkpoints_restore_across_process_counts(runs):
    """A 2-process checkpoint continues in 1 process (C) and a 1-process one in 2 (D), with the
    same data position: the same batches and losses as the uninterrupted run."""
    w = runs["workdirs"]
    a = _merged(runs["two"]["A_sigterm"], runs["two"]["A"])
    b = [{key: _keyed(r[key]) for key in ("losses", "image_ids")} for r in runs["one"]["B"]]
    for name, records, reference in [("C", runs["one_again"]["C"], a),
                                     ("D", runs["two"]["D"], b)]:
        after = [5, 6]
        for r in records:
            losses = _keyed(r["losses"])
            assert sorted(losses) == after, name  # resumed from the copied step-4 checkpoint
            # Step 5 starts from the restored state: the same loss up to the loss's reduction.
            np.testing.assert_allclose(losses[5], reference[0]["losses"][5], rtol=LOSS_RTOL,
                                       err_msg=name)
        fed = [_keyed(r["image_ids"]) for r in records]
        for s in after:
            assert sum((f[s] for f in fed), []) == sum((e["image_ids"][s] for e in reference),
                                                        []), name
    assert _params_rel_l2(_state(w["C"], STEPS)[0], _state(w["A"], STEPS)[0]) <= RESUMED_RTOL
    assert _params_rel_l2(_state(w["D"], STEPS)[0], _state(w["B"], STEPS)[0]) <= RESUMED_RTOL


def test_sigterm_to_one_process_stops_all_at_the_same_step(runs):
    e, rerun = runs["two"]["A_sigterm"], runs["two"]["A"]
    stopped = [r["result"].get("preempted") for r in e]
    assert stopped[0] == stopped[1] and stopped[0] is not None, stopped
    step = stopped[0]
    assert 3 <= step < STEPS, step  # signalled after step 2: one of the next steps stops it
    for r in e:
        assert sorted(_keyed(r["losses"])) == list(range(1, step + 1))
    w = runs["workdirs"]
    with ocp.CheckpointManager(os.path.join(w["A"], "checkpoints")) as manager:
        assert manager.all_steps() == sorted({2, step, 4, 6})[-3:]
    for r in rerun:  # the rerun resumed from that step
        assert sorted(_keyed(r["losses"])) == list(range(step + 1, STEPS + 1))
        assert "preempted" not in r["result"]
    # The saved data position (the interrupted-and-resumed run against the uninterrupted
    # one-process run is checked above, parameters included; the exact same-topology resume in
    # tests/training/test_train.py).
    state, data = _state(w["A"], step)
    assert int(state["step"]) == step and data == {"records_consumed": step * 8}
