"""Ops benchmark: maskrcnn_jax (jitted, after compilation) vs torchvision, measured in one run.

Run:  python bench/ops.py            (add --repeats N for more timing repetitions)

Prints, for NMS on 1,000 and 5,000 boxes and for multilevel RoIAlign of 1,000 RoIs over 4 FPN
levels (256 channels; 7x7 and 14x14 outputs; an 800x1344 canvas), the JAX time, the torchvision
time and their ratio (torchvision / JAX: > 1 means maskrcnn_jax is faster). On a machine without
torchvision's compiled ops (this project's CPU CI), torchvision runs the pure-torch NMS kernel and
pure-PyTorch RoIAlign provided by tests/torchvision_cpu.py; the header says which.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from maskrcnn_jax.testing import import_torchvision  # noqa: E402

torchvision = import_torchvision()
TORCHVISION_KIND = ("pure-torch fallback (maskrcnn_jax/testing/torchvision_cpu.py)"
                    if "maskrcnn_jax.testing.torchvision_cpu" in sys.modules else "compiled ops")
from torchvision.ops import MultiScaleRoIAlign  # noqa: E402

from maskrcnn_jax.ops.nms import nms_padded  # noqa: E402
from maskrcnn_jax.ops.roi_align import multilevel_roi_align  # noqa: E402
from timing import median_seconds, seconds  # noqa: E402  (bench/timing.py)


def _random_boxes(rng, n, size=800.0):
    """Clustered boxes so that NMS has real work: (n, 4) float32 xyxy in a size x size image."""
    centers = rng.uniform(0, size, (max(n // 20, 1), 2))
    c = centers[rng.integers(0, len(centers), n)] + rng.normal(0, 15, (n, 2))
    wh = rng.uniform(10, 120, (n, 2))
    return np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)


def bench_nms(n, repeats, rng):
    boxes = _random_boxes(rng, n)
    scores = rng.random(n).astype(np.float32)
    valid = np.ones(n, bool)
    fn = jax.jit(lambda b, s, v: nms_padded(b, s, v, 0.7, max_output=1000))
    jb, js, jv = jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(valid)
    compile_s = seconds(lambda: jax.block_until_ready(fn(jb, js, jv)))
    t_jax = median_seconds(lambda: jax.block_until_ready(fn(jb, js, jv)), repeats)
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
    t_tv = median_seconds(lambda: torchvision.ops.nms(tb, ts, 0.7), repeats)
    return f"NMS {n} boxes (iou 0.7)", t_jax, t_tv, compile_s


def bench_roi_align(num_rois, output_size, repeats, rng):
    canvas = (800, 1344)
    channels = 256
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    shapes = [(int(canvas[0] * s), int(canvas[1] * s)) for s in scales]
    feats = [rng.standard_normal((h, w, channels)).astype(np.float32) for h, w in shapes]
    xy = rng.uniform(0, [canvas[1] - 20, canvas[0] - 20], (num_rois, 2))
    wh = np.exp(rng.uniform(np.log(8), np.log(600), (num_rois, 2)))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [canvas[1], canvas[0]])], 1).astype(np.float32)

    fn = jax.jit(lambda f, b: multilevel_roi_align(f, b, output_size, scales, sampling_ratio=2))
    jf, jb = [jnp.asarray(f) for f in feats], jnp.asarray(boxes)
    compile_s = seconds(lambda: jax.block_until_ready(fn(jf, jb)))
    t_jax = median_seconds(lambda: jax.block_until_ready(fn(jf, jb)), repeats)

    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, sampling_ratio=2)
    tfeats = {str(i): torch.from_numpy(f.transpose(2, 0, 1)[None].copy()) for i, f in enumerate(feats)}
    tboxes = [torch.from_numpy(boxes)]
    with torch.no_grad():
        t_tv = median_seconds(lambda: pooler(tfeats, tboxes, [canvas]), repeats)
    label = f"RoIAlign {num_rois} RoIs, 4 levels, {channels} ch, {output_size[0]}x{output_size[1]}"
    return label, t_jax, t_tv, compile_s


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__}, "
          f"torchvision {torchvision.__version__} ({TORCHVISION_KIND}); {os.cpu_count()} CPU cores")
    rows = [
        bench_nms(1000, args.repeats, rng),
        bench_nms(5000, args.repeats, rng),
        bench_roi_align(1000, (7, 7), args.repeats, rng),
        bench_roi_align(1000, (14, 14), args.repeats, rng),
    ]
    print(f"{'op':<48} {'jax ms':>9} {'torchvision ms':>15} {'tv/jax':>7} {'jax compile s':>14}")
    for label, t_jax, t_tv, compile_s in rows:
        print(f"{label:<48} {t_jax * 1e3:9.2f} {t_tv * 1e3:15.2f} {t_tv / t_jax:7.2f} {compile_s:14.2f}")


if __name__ == "__main__":
    main()
