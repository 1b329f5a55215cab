"""Ops benchmark: maskrcnn_jax (jitted, after compilation) vs torchvision's compiled kernels.

Run:  python bench/ops.py [--repeats 5] [--nms-boxes 1000 5000] [--rois 1000] [--no-backward]
                          [--threads N]

torchvision runs its own compiled C++/CUDA ops (`torch.ops.torchvision.nms`, `roi_align` via
`MultiScaleRoIAlign`), on the same kind of device as JAX (CUDA when JAX runs on a GPU and torch
has CUDA, else the CPU). Prints, for NMS on 1,000 and 5,000 clustered boxes (IoU 0.7;
maskrcnn_jax with max_output = all boxes, returning every kept box as torchvision does: equal
work; and with max_output = 1,000, the RPN's post-NMS top-n, where it may stop early:
torchvision's nms has no such limit) and for multilevel RoIAlign of 1,000 RoIs over 4 FPN levels
(256 channels; 7x7 and 14x14 outputs; an 800x1344 canvas), forward and (RoIAlign) forward +
backward w.r.t. the feature maps: the maskrcnn_jax time, torchvision's time, JAX's compile time
and the speed ratio `maskrcnn_jax / torchvision` (torchvision time / JAX time = our speed /
theirs; > 1: maskrcnn_jax is faster). Both frameworks get the same CPU threads (--threads,
default every core this process may use; see bench/timing.py).
"""

import argparse
import os
import sys

from timing import THREADS_HELP, pin_threads  # noqa: E402  (bench/timing.py; before jax/torch)

THREADS = pin_threads()

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from maskrcnn_jax.testing import import_torchvision  # noqa: E402

torchvision = import_torchvision()
from timing import header, median_seconds, seconds, torch_device, torch_sync  # noqa: E402
from torchvision.ops import MultiScaleRoIAlign  # noqa: E402

from maskrcnn_jax.ops.nms import SELF_SUPPRESSION, default_settings, nms_padded  # noqa: E402
from maskrcnn_jax.ops.roi_align import multilevel_roi_align  # noqa: E402

DEVICE = torch_device(jax, torch)


def _torch_timed(fn):
    """`fn` followed by a CUDA sync where torch runs on the GPU, so the wall time covers it."""
    def run():
        out = fn()
        torch_sync(torch, DEVICE)
        return out
    return run


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
    tb, ts = torch.from_numpy(boxes).to(DEVICE), torch.from_numpy(scores).to(DEVICE)
    t_tv = median_seconds(_torch_timed(lambda: torchvision.ops.nms(tb, ts, 0.7)), repeats)
    kept = len(torchvision.ops.nms(tb, ts, 0.7))
    jb, js, jv = jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(valid)
    rows = []
    # max_output=n returns every kept box, as torchvision (equal work); 1000 is the RPN's
    # post-NMS top-n, where maskrcnn_jax may stop early (torchvision's nms has no such limit).
    default_pass = default_settings()[0]
    other = [p for p in SELF_SUPPRESSION if p != default_pass][0]
    variants = [(m, None) for m in sorted({n, min(n, 1000)}, reverse=True)]
    variants.append((min(n, 1000), other))  # the other backend's in-tile pass, for comparison
    for max_output, self_suppression in variants:
        settings = {} if self_suppression is None else dict(
            zip(("self_suppression", "tile_size", "block_size"),
                default_settings("cpu" if other == "sequential" else "gpu")))
        fn = jax.jit(lambda b, s, v, m=max_output, kw=settings: nms_padded(
            b, s, v, 0.7, max_output=m, **kw))
        compile_s = seconds(lambda: jax.block_until_ready(fn(jb, js, jv)))
        count = int(fn(jb, js, jv)[1])
        if count != min(kept, max_output):
            raise AssertionError(f"nms_padded kept {count} boxes, torchvision {kept}")
        t_jax = median_seconds(lambda: jax.block_until_ready(fn(jb, js, jv)), repeats)
        what = "all kept, equal work" if max_output == n else "RPN cap"
        what += f", {settings.get('self_suppression', default_pass)} in-tile pass" + (
            "" if self_suppression is None else f" (not this backend's default), tile "
            f"{settings['tile_size']}")
        rows.append((f"NMS {n:,} boxes, IoU 0.7, torchvision keeps {kept:,}; jax max_output "
                     f"{max_output:,} ({what})", t_jax, t_tv, compile_s))
    return rows


def bench_roi_align(num_rois, output_size, repeats, rng, backward):
    canvas = (800, 1344)
    channels = 256
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    shapes = [(int(canvas[0] * s), int(canvas[1] * s)) for s in scales]
    feats = [rng.standard_normal((h, w, channels)).astype(np.float32) for h, w in shapes]
    xy = rng.uniform(0, [canvas[1] - 20, canvas[0] - 20], (num_rois, 2))
    wh = np.exp(rng.uniform(np.log(8), np.log(600), (num_rois, 2)))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [canvas[1], canvas[0]])], 1).astype(np.float32)
    cotangent = rng.standard_normal((num_rois, *output_size, channels)).astype(np.float32)
    label = f"RoIAlign {num_rois:,} RoIs, 4 levels, {channels} ch, {output_size[0]}x{output_size[1]}"

    def forward(f, b):
        return multilevel_roi_align(f, b, output_size, scales, sampling_ratio=2)

    fn = jax.jit(forward)
    jf, jb, jg = [jnp.asarray(f) for f in feats], jnp.asarray(boxes), jnp.asarray(cotangent)
    compile_s = seconds(lambda: jax.block_until_ready(fn(jf, jb)))
    t_jax = median_seconds(lambda: jax.block_until_ready(fn(jf, jb)), repeats)

    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, sampling_ratio=2)
    tfeats = {str(i): torch.from_numpy(f.transpose(2, 0, 1)[None].copy()).to(DEVICE)
              for i, f in enumerate(feats)}
    tboxes = [torch.from_numpy(boxes).to(DEVICE)]
    with torch.no_grad():
        t_tv = median_seconds(_torch_timed(lambda: pooler(tfeats, tboxes, [canvas])), repeats)
    rows = [(label + " forward", t_jax, t_tv, compile_s)]
    if not backward:
        return rows

    # Forward + backward w.r.t. the feature maps (as in training), with a fixed cotangent.
    grad_fn = jax.jit(jax.grad(lambda f, b, g: jnp.vdot(forward(f, b), g)))
    compile_s = seconds(lambda: jax.block_until_ready(grad_fn(jf, jb, jg)))
    t_jax = median_seconds(lambda: jax.block_until_ready(grad_fn(jf, jb, jg)), repeats)
    tgrad = torch.from_numpy(cotangent.transpose(0, 3, 1, 2).copy()).to(DEVICE)
    leaves = {k: v.clone().requires_grad_(True) for k, v in tfeats.items()}

    def torch_fwd_bwd():
        for v in leaves.values():
            v.grad = None
        pooler(leaves, tboxes, [canvas]).backward(tgrad)

    t_tv = median_seconds(_torch_timed(torch_fwd_bwd), repeats)
    rows.append((label + " forward+backward", t_jax, t_tv, compile_s))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nms-boxes", nargs="+", type=int, default=[1000, 5000])
    parser.add_argument("--rois", type=int, default=1000, help="RoIs per RoIAlign call")
    parser.add_argument("--no-backward", action="store_true", help="skip RoIAlign's backward")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    args = parser.parse_args()
    print("Ops benchmark")
    header(THREADS, torch, torchvision, jax, DEVICE)
    rng = np.random.default_rng(0)
    rows = []
    for n in args.nms_boxes:
        rows += bench_nms(n, args.repeats, rng)
    for size in ((7, 7), (14, 14)):
        rows += bench_roi_align(args.rois, size, args.repeats, rng, not args.no_backward)
    print(f"\nmedian of {args.repeats} calls (after one warm-up)\n")
    print("| op | maskrcnn_jax ms | torchvision ms | maskrcnn_jax / torchvision speed | jax compile s |")
    print("|---|---:|---:|---:|---:|")
    for label, t_jax, t_tv, compile_s in rows:
        print(f"| {label} | {t_jax * 1e3:,.2f} | {t_tv * 1e3:,.2f} | {t_tv / t_jax:.2f} | {compile_s:.1f} |")


if __name__ == "__main__":
    main()
