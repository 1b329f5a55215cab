"""Inference benchmark: maskrcnn_jax vs torchvision maskrcnn_resnet50_fpn (its compiled ops) on
identical weights and images.

Run:  python bench/inference.py [--sizes 800x1333 512x512 photos] [--batches 1 8] [--dtypes float32 bfloat16]
                                [--repeats 3] [--canvas buckets|square|fit] [--threads N] [--no-torchvision]

Each size HxW is both the images' size and the models' input size (resize limits min_size =
min(H, W), max_size = max(H, W) on both sides, so neither model rescales the images).
`photos` is a mix of one image of each common photo shape (`PHOTO_SHAPES`: 1:1, 4:3, 3:4, 3:2,
2:3, 16:9, 9:16 at ~1000 px) resized by both sides at torchvision's default 800 / 1333; its ms
column is the whole mix (`batch` images per call on both sides).
maskrcnn_jax's `Predictor` runs each image in the smallest of its config's canvas buckets that
holds it. `--canvas buckets` (the default: what a user of `from_torchvision` / `model_config`
without `canvas_size` gets) uses the default buckets derived from min_size / max_size (800x1344
for 800x1333 images); `--canvas square` one square canvas of the longest side (1344x1344 there:
~1.7x the pixels torchvision convolves); `--canvas fit` HxW rounded up to 32, torchvision's own
padded size for a batch of such images (equal work). Each row prints the canvas used, and the
header the default buckets' average padding on common photo shapes.

One markdown row per image size x batch x compute dtype: maskrcnn_jax's first call (compilation
+ run), its latency per batch (median of --repeats, after compilation) and images/s,
torchvision's latency and images/s measured in the same run (float32 only: its bf16 autocast
path differs; torch.no_grad, the same images as one list), the speed ratio
`maskrcnn_jax / torchvision` (our images/s / theirs; > 1: maskrcnn_jax faster), and peak memory
(device memory stats where the backend has them, else the process's peak RSS, both frameworks
together, so it only grows down the table). torch runs on the same kind of device as JAX (CUDA
when JAX runs on a GPU and torch has CUDA, else the CPU); both get the same CPU threads
(--threads, default every core this process may use; see bench/timing.py). The models have
random weights (seed 0) made to detect (scaled logits), so that the post-processing does real
work.
"""

import argparse
import os
import resource
import sys

from timing import THREADS_HELP, pin_threads  # noqa: E402  (bench/timing.py; before jax/torch)

THREADS = pin_threads()

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import torch  # noqa: E402
from timing import (  # noqa: E402
    detecting_torchvision_maskrcnn,
    header,
    median_seconds,
    seconds,
    torch_device,
    torch_sync,
)

from maskrcnn_jax.canvas import bucket_for  # noqa: E402
from maskrcnn_jax.config import model_config  # noqa: E402
from maskrcnn_jax.data.transform import padded_size, resized_size  # noqa: E402
from maskrcnn_jax.inference.predictor import Predictor  # noqa: E402
from maskrcnn_jax.testing import import_torchvision  # noqa: E402
from maskrcnn_jax.torchvision.convert import from_torchvision  # noqa: E402


def _images(rng, size, n):
    h, w = size
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def _peak_memory():
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB device"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


def _round32(value):
    return int(np.ceil(value / 32) * 32)


# Common photo shapes (height x width) for the padding figure of the default buckets.
PHOTO_SHAPES = {"1:1": (1000, 1000), "4:3": (768, 1024), "3:4": (1024, 768), "3:2": (683, 1024),
                "2:3": (1024, 683), "16:9": (576, 1024), "9:16": (1024, 576)}


def print_bucket_padding(min_size=800, max_size=1333):
    """Average fraction of canvas pixels that are padding (outside the resized image) for the
    default buckets and for one square canvas, over PHOTO_SHAPES."""
    config = model_config(min_size=min_size, max_size=max_size)
    square = (_round32(max(min_size, max_size)),) * 2
    rows = []
    for name, (h, w) in PHOTO_SHAPES.items():
        out_h, out_w = resized_size(h, w, min_size, max_size)
        pad = (_round32(out_h), _round32(out_w))
        canvas = bucket_for(pad, config.canvas_buckets)
        rows.append((name, canvas, 1 - out_h * out_w / (canvas[0] * canvas[1]),
                     1 - out_h * out_w / (square[0] * square[1])))
    shapes = ", ".join(f"{n} -> {c[0]}x{c[1]}" for n, c, _, _ in rows)
    print(f"default canvas buckets at min_size {min_size} / max_size {max_size}: "
          f"{' '.join(f'{h}x{w}' for h, w in config.canvas_buckets)}; {shapes}; padding "
          f"fraction averaged over {len(rows)} photo shapes: buckets "
          f"{np.mean([r[2] for r in rows]):.1%}, one {square[0]}x{square[1]} canvas "
          f"{np.mean([r[3] for r in rows]):.1%}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["800x1333", "512x512"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--canvas", choices=("buckets", "square", "fit"), default="buckets",
                        help="maskrcnn_jax's canvases: the config's default buckets (default), "
                             "one square of the longest side, or HxW rounded up to 32, "
                             "torchvision's padded size (fit: equal work)")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument("--no-torchvision", action="store_true")
    args = parser.parse_args()
    torchvision = import_torchvision()
    device = torch_device(jax, torch)
    print("Inference benchmark, R50-FPN")
    header(THREADS, torch, torchvision, jax, device)
    model, state = detecting_torchvision_maskrcnn(torch, torchvision)
    model.to(device)
    rng = np.random.default_rng(0)
    print(f"maskrcnn_jax canvas: --canvas {args.canvas} " + {
        "buckets": "(the product's default: canvas buckets from min_size / max_size, each "
                   "image in the smallest that holds it)",
        "square": "(one square canvas of the longest side rounded up to 32)",
        "fit": "(HxW rounded up to 32: torchvision's padded size, equal work)"}[args.canvas])
    print_bucket_padding()
    print(f"\nmedian of {args.repeats} calls; speed ratio = maskrcnn_jax images/s / torchvision "
          "images/s\n")
    print("| image | batch | dtype | jax canvas | first call s (compile + run) | jax ms/batch | "
          "jax img/s | torchvision ms/batch | torchvision img/s | maskrcnn_jax / torchvision speed "
          "| peak memory (process) |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|", flush=True)
    for size_text in args.sizes:
        photos = size_text == "photos"
        if photos:  # one image of each PHOTO_SHAPES, resized by both at torchvision's 800/1333
            if args.canvas != "buckets":
                raise SystemExit("--sizes photos compares the default canvas buckets only")
            size, canvas = (800, 1333), None
        else:
            size = tuple(int(v) for v in size_text.split("x"))
            canvas = {"fit": tuple(int(np.ceil(s / 32) * 32) for s in size),
                      "square": (_round32(max(size)),) * 2, "buckets": None}[args.canvas]
        # Both models run at this size: resize limits set to it (torchvision's defaults, 800 /
        # 1333, would upscale a 512x512 image to 800x800).
        model.transform.min_size, model.transform.max_size = (min(size),), max(size)
        for batch in args.batches:
            if photos:
                images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                          for h, w in PHOTO_SHAPES.values()]
            else:
                images = _images(rng, size, batch)
            tv_ms = None
            if not args.no_torchvision:
                tensors = [torch.from_numpy(im).permute(2, 0, 1).float().div(255).to(device)
                           for im in images]

                def run_torchvision():
                    for start in range(0, len(tensors), batch):  # `batch` images per call
                        model(tensors[start:start + batch])
                    torch_sync(torch, device)

                with torch.no_grad():
                    tv_ms = 1e3 * median_seconds(run_torchvision, args.repeats)
            for dtype in args.dtypes:
                config, variables = from_torchvision(
                    state, canvas_size=canvas, compute_dtype=dtype, min_size=min(size),
                    max_size=max(size))
                predictor = Predictor(config, variables, batch_size=batch)
                used = " ".join(sorted({"x".join(str(v) for v in bucket_for(
                    padded_size(image, predictor.config)[1], predictor.config.canvas_buckets))
                    for image in images}))
                compile_s = seconds(lambda: predictor(images))
                jax_ms = 1e3 * median_seconds(lambda: predictor(images), args.repeats,
                                              warmup=False)
                n = len(images)  # per call: `batch` images, or the photo mix
                tv = (f"{tv_ms:,.0f} | {1e3 * n / tv_ms:.2f} | {tv_ms / jax_ms:.2f}" if tv_ms
                      else "- | - | -")
                name = f"photos ({n} shapes)" if photos else size_text
                print(f"| {name} | {batch} | {dtype} | {used} | {compile_s:.1f} | "
                      f"{jax_ms:,.0f} | {1e3 * n / jax_ms:.2f} | {tv} | {_peak_memory()} |",
                      flush=True)


if __name__ == "__main__":
    main()
