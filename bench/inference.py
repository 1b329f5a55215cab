"""Inference benchmark: maskrcnn_jax vs torchvision maskrcnn_resnet50_fpn on identical weights.

Run:  python bench/inference.py [--sizes 800x1333 512x512] [--batches 1 8] [--dtypes float32 bfloat16]
                                [--repeats 3] [--no-torchvision] [--torch-roi-align separable|fallback]

Each size HxW is both the images' size and the models' input size (resize limits min_size =
min(H, W), max_size = max(H, W) on both sides; the canvas is HxW rounded up to 32).

For each image size, batch size and compute dtype: maskrcnn_jax compile time, latency per batch
(after compilation) and images/s, torchvision's latency and images/s measured in the same run,
and their ratio (torchvision time / maskrcnn_jax time: > 1 means maskrcnn_jax is faster), plus
peak memory (device memory stats where the backend has them, else process peak RSS).
The models have random weights (seed 0) made to detect (scaled logits), so that the
post-processing does real work. torchvision runs in float32 only (its bf16 autocast path differs).
Where torchvision's compiled ops are missing (CPU-only torch), its RoIAlign is the matrix-product
stand-in of `maskrcnn_jax.testing` by default (`--torch-roi-align fallback`: torchvision's own
much slower pure-PyTorch path); with the compiled ops (e.g. on a GPU) the option changes nothing.
"""

import argparse
import contextlib
import os
import resource
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import torch  # noqa: E402

from maskrcnn_jax.convert import from_torchvision  # noqa: E402
from maskrcnn_jax.predictor import Predictor  # noqa: E402
from maskrcnn_jax.testing import import_torchvision  # noqa: E402
from maskrcnn_jax.testing.torch_models import fast_roi_align  # noqa: E402
from timing import median_seconds, seconds  # noqa: E402  (bench/timing.py)


def _images(rng, size, n):
    h, w = size
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def _peak_memory():
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB device"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["800x1333", "512x512"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torchvision", action="store_true")
    parser.add_argument("--torch-roi-align", choices=("separable", "fallback"), default="separable",
                        help="where torchvision's compiled ops are missing (CPU torch builds): "
                             "'separable' (the matrix-product stand-in of maskrcnn_jax.testing, "
                             "closer to a C++ kernel's cost) or torchvision's own slow "
                             "pure-PyTorch fallback")
    args = parser.parse_args()
    torchvision = import_torchvision()
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.mul_(4.0)
        model.roi_heads.box_predictor.cls_score.weight.mul_(3.0)
    state = model.state_dict()
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {os.cpu_count()} CPU cores; "
          f"torchvision RoIAlign where compiled ops are missing: {args.torch_roi_align}")
    header = (f"{'size':>9} {'batch':>5} {'dtype':>8} {'compile s':>9} {'jax ms':>9} {'jax img/s':>9} "
              f"{'tv ms':>9} {'tv img/s':>9} {'tv/jax':>6}  peak memory")
    print(header)
    for size_text in args.sizes:
        size = tuple(int(v) for v in size_text.split("x"))
        canvas = tuple(int(np.ceil(s / 32) * 32) for s in size)
        # Both models run at this size: resize limits set to it (torchvision's defaults, 800 /
        # 1333, would upscale a 512x512 image to 800x800).
        model.transform.min_size, model.transform.max_size = (min(size),), max(size)
        for batch in args.batches:
            images = _images(rng, size, batch)
            tv_ms = None
            if not args.no_torchvision:
                tensors = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images]
                roi_align_ctx = (fast_roi_align() if args.torch_roi_align == "separable"
                                 else contextlib.nullcontext())
                with torch.no_grad(), roi_align_ctx:
                    tv_ms = 1e3 * median_seconds(lambda: model(tensors), args.repeats)
            for dtype in args.dtypes:
                config, variables = from_torchvision(
                    state, canvas_size=canvas, compute_dtype=dtype, min_size=min(size),
                    max_size=max(size))
                predictor = Predictor(config, variables, batch_size=batch)
                compile_s = seconds(lambda: predictor(images))
                jax_ms = 1e3 * median_seconds(lambda: predictor(images), args.repeats,
                                              warmup=False)
                tv = (f"{tv_ms:9.1f} {1e3 * batch / tv_ms:9.2f} {tv_ms / jax_ms:6.2f}" if tv_ms
                      else f"{'-':>9} {'-':>9} {'-':>6}")
                print(f"{size_text:>9} {batch:5d} {dtype:>8} {compile_s:9.1f} {jax_ms:9.1f} "
                      f"{1e3 * batch / jax_ms:9.2f} {tv}  {_peak_memory()}", flush=True)


if __name__ == "__main__":
    main()
