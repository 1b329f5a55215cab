"""One process of a multi-process test run (`maskrcnn_jax.testing.multiprocess.run_processes`).

    python tests/distributed/worker.py PLAN.json

PLAN: `{"out": DIR, "phases": [...]}`; each phase runs in every process, in order, and writes
`DIR/<phase name>.p<process index>.json`:
  * `{"name", "kind": "train", "workdir", "config": {flattened tiny-config overrides},
     "sigterm": [process, step]}`: `train.train_and_evaluate`; records its result, the loss of
     every step and the image ids this process fed to every step. With "sigterm", that process
     sends itself SIGTERM from a timer thread a few milliseconds after the given step, so the
     signal lands at an arbitrary point of the following step.
  * `{"name", "kind": "eval_cli", "args": [...]}`: `eval.main(args)`.
"""

import json
import os
import signal
import sys
import threading
import time

START = time.time()

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from maskrcnn_jax.testing import multiprocess  # noqa: E402

multiprocess.initialize_from_env()

import jax  # noqa: E402

import eval as eval_cli  # noqa: E402
import train  # noqa: E402
from configs import tiny  # noqa: E402
from maskrcnn_jax.training import train_lib  # noqa: E402


def run_train(phase):
    config = tiny.get_config()
    config.update_from_flattened_dict(phase["config"])
    losses, image_ids = {}, {}
    shard_batch = train_lib.shard_batch

    def recording_shard_batch(batch, mesh, **kwargs):
        # The step this batch feeds: one more than the steps recorded so far (plus the resume).
        image_ids[len(image_ids) + 1] = [int(i) for i in batch["image_ids"]]
        return shard_batch(batch, mesh, **kwargs)

    signal_process, signal_step = phase.get("sigterm") or (None, None)

    def hook(step, metrics):
        print(f"step {step} at {time.time() - START:.1f} s", flush=True)
        losses[step] = float(metrics["loss"])
        if step == signal_step and jax.process_index() == signal_process:
            threading.Timer(0.005, os.kill, (os.getpid(), signal.SIGTERM)).start()

    train_lib.shard_batch = recording_shard_batch
    try:
        result = train.train_and_evaluate(config, phase["workdir"], step_hook=hook)
    finally:
        train_lib.shard_batch = shard_batch
    first = min(losses) if losses else 1
    return {"result": result, "losses": losses,
            "image_ids": {first + k - 1: v for k, v in image_ids.items()}}


def main():
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    cache = plan.get("compilation_cache")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    print(f"initialised at {time.time() - START:.1f} s", flush=True)
    for phase in plan["phases"]:
        if phase["kind"] == "train":
            record = run_train(phase)
        elif phase["kind"] == "eval_cli":
            record = {"status": eval_cli.main(phase["args"])}
        else:
            raise ValueError(f"unknown phase kind {phase['kind']!r}")
        record.update(process_index=jax.process_index(), process_count=jax.process_count(),
                      devices=jax.device_count())
        print(f"phase {phase['name']} done at {time.time() - START:.1f} s", flush=True)
        path = os.path.join(plan["out"], f"{phase['name']}.p{jax.process_index()}.json")
        with open(path, "w") as f:
            json.dump(record, f)
    print("worker done", flush=True)


if __name__ == "__main__":
    main()
