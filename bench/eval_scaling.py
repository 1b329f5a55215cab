"""Evaluation speed-up with the number of devices: `evaluate` on a mesh of the first 1, 2, 4, ...
devices of this process, the same images, images/s and the speed-up over 1 device.

Run:  python bench/eval_scaling.py [--backbone resnet50] [--min_size 512 --max_size 512]
                                   [--images 64] [--batch_size 2]

A randomly initialised model (seed 0, no torch needed) evaluates the first `--images` images of
the synthetic shapes validation split (built under a temporary folder, not timed), after one
untimed run per mesh that compiles its canvases. `--batch_size` is images per device, so the
work per device is the same in every row (weak scaling of the batch, as eval.py shards it).

Meaningful on real accelerators (several GPUs or TPU cores of one host): simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`) share the same cores, so on a CPU the
rows only show the sharding's overhead.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from maskrcnn_jax.config import model_config  # noqa: E402
from maskrcnn_jax.data import builders  # noqa: E402
from maskrcnn_jax.inference import evaluation  # noqa: E402
from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen  # noqa: E402
from maskrcnn_jax.training.train_lib import init_variables  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--min_size", type=int, default=512)
    parser.add_argument("--max_size", type=int, default=512)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=2, help="images per device")
    args = parser.parse_args()
    devices = jax.local_devices()
    work = tempfile.mkdtemp(prefix="eval_scaling_")
    source = builders.load("shapes", work, "validation", config=builders.shapes_config(
        num_train=1, num_validation=args.images, seed=0))
    config = model_config(backbone=args.backbone, num_classes=len(builders.categories(source)) + 1,
                          min_size=args.min_size, max_size=args.max_size, box_score_thresh=0.0)
    variables = jax.device_get(init_variables(MaskRCNN(frozen(config)), jax.random.key(0)))
    print(f"evaluate, {args.backbone}, {args.images} shapes images at {args.min_size}/"
          f"{args.max_size}, {args.batch_size} per device; jax {jax.__version__}, "
          f"{len(devices)} {devices[0].device_kind} devices ({jax.default_backend()})")
    print("| devices | images per call | wall s | images/s | speed-up over 1 device |")
    print("|---:|---:|---:|---:|---:|", flush=True)
    counts = [n for n in (1, 2, 4, 8, 16, 32) if n <= len(devices)]
    base = None
    for n in counts:
        mesh = Mesh(np.asarray(devices[:n]), ("data",))

        def run():
            return evaluation.evaluate(config, variables, source, batch_size=args.batch_size,
                                       progress=False, mesh=mesh)

        run()  # compiles this mesh's canvases
        start = time.perf_counter()
        run()
        rate = args.images / (time.perf_counter() - start)
        base = base or rate
        print(f"| {n} | {n * args.batch_size} | {args.images / rate:.1f} | {rate:.2f} | "
              f"{rate / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
