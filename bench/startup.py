"""Cold vs warm start of the predict CLI with JAX's persistent compilation cache.

Run:  python bench/startup.py [--backbone resnet50] [--size 800x1333]

Writes a randomly initialised maskrcnn_jax checkpoint (no torch needed), then runs
`predict.py` on one image three times: with an empty cache folder (cold: every program
compiled and stored), again with that folder (warm: programs loaded), and with the cache off.
Prints each run's wall time (process start to exit, so imports and checkpoint loading count)
and its compile time, from JAX's own monitoring events in that process: tracing, lowering to
StableHLO, and the XLA compile (on a cache hit: loading the compiled program instead). The
target: a warm start's compile time under 10% of a cold start's wall time.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


# Runs predict.py in this interpreter after registering a listener of JAX's duration events;
# their totals go to the JSON file named by $STARTUP_TIMES at exit.
_TIMED_PREDICT = r"""
import atexit, json, os, runpy, sys
import jax.monitoring
totals = {}
def listen(event, duration, **kwargs):
    totals[event] = totals.get(event, 0.0) + duration
jax.monitoring.register_event_duration_secs_listener(listen)
def dump():
    with open(os.environ["STARTUP_TIMES"], "w") as f:
        json.dump(totals, f)
atexit.register(dump)
sys.argv = ["predict.py", *sys.argv[1:]]
runpy.run_path("predict.py", run_name="__main__")
"""
_EVENTS = {"trace": "/jax/core/compile/jaxpr_trace_duration",
           "lower": "/jax/core/compile/jaxpr_to_mlir_module_duration",
           "compile": "/jax/core/compile/backend_compile_duration"}


def _round32(value):
    return int(-(-value // 32) * 32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", default="800x1333", help="image HxW (and min/max size)")
    args = parser.parse_args()
    import jax

    from maskrcnn_jax import checkpoints
    from maskrcnn_jax.canvas import bucket_for
    from maskrcnn_jax.config import model_config
    from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen
    from maskrcnn_jax.training.train_lib import init_variables

    height, width = (int(v) for v in args.size.split("x"))
    config = model_config(backbone=args.backbone, min_size=min(height, width),
                          max_size=max(height, width))
    work = tempfile.mkdtemp(prefix="startup_bench_")
    variables = jax.device_get(init_variables(MaskRCNN(frozen(config)), jax.random.key(0)))
    checkpoints.save_converted(os.path.join(work, "ckpt"), config, variables)
    image = os.path.join(work, "image.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)).save(
        image)
    cache = os.path.join(work, "cache")
    canvas = bucket_for((_round32(height), _round32(width)), config.canvas_buckets)
    print(f"predict.py, {args.backbone}, one {height}x{width} image, canvas {canvas[0]}x"
          f"{canvas[1]}, jax {jax.__version__} on {jax.devices()[0].platform}")
    print("| run | wall s | trace s | lower s | XLA compile (or cache load) s | compile total s "
          "| compile total / cold wall |\n|---|---:|---:|---:|---:|---:|---:|")
    times = os.path.join(work, "times.json")
    cold_wall = None
    for name, flag in (("cold (empty cache)", cache), ("warm (cache filled)", cache),
                       ("cache off", "none")):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", _TIMED_PREDICT, image, f"--checkpoint={work}/ckpt",
                        f"--out={work}/out", f"--compilation_cache_dir={flag}"], cwd=REPO,
                       check=True, capture_output=True, env={**os.environ, "STARTUP_TIMES": times})
        wall = time.perf_counter() - start
        cold_wall = cold_wall or wall
        with open(times) as f:
            totals = json.load(f)
        parts = [totals.get(event, 0.0) for event in _EVENTS.values()]
        print(f"| {name} | {wall:.1f} | " + " | ".join(f"{v:.2f}" for v in parts)
              + f" | {sum(parts):.2f} | {sum(parts) / cold_wall:.1%} |", flush=True)


if __name__ == "__main__":
    main()
