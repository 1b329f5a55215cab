"""Helpers shared by the benchmarks (imported from the scripts' own directory): wall-clock timing,
the thread count both frameworks get, the header line of versions and threads.

`pin_threads()` must run before jax and torch are imported (each script calls it first): it
restricts the process to N CPU cores (`os.sched_setaffinity`), so that XLA's CPU thread pool
(sized from the schedulable cores) and torch's intra-op threads (`torch.set_num_threads(N)`,
set in `header`) both run N threads on the same N cores.
"""

import os
import sys
import time


def seconds(fn):
    """Wall time in seconds of one call `fn()` (e.g. a first call: compilation + run)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn, repeats, warmup=True):
    """Median wall time in seconds of `fn()` over `repeats` calls, after one untimed warm-up
    call unless `warmup` is False (the caller already made and timed the first call)."""
    import numpy as np  # here, not at import: pin_threads runs before any threaded library loads

    if warmup:
        fn()
    return float(np.median([seconds(fn) for _ in range(repeats)]))


def _available_cores():
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


THREADS_HELP = ("CPU threads of both frameworks (default: every core this process may use): the "
                "process is pinned to that many cores before jax and torch load, and torch gets "
                "torch.set_num_threads(N)")


def pin_threads(argv=None):
    """Read `--threads N` from argv (the scripts' argparse declares it too, for --help) and pin
    the process to the first N available cores. Returns N. Call before importing jax / torch."""
    argv = sys.argv[1:] if argv is None else argv
    cores = _available_cores()
    threads = len(cores)
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            threads = int(argv[i + 1])
        elif arg.startswith("--threads="):
            threads = int(arg.split("=", 1)[1])
    if not 1 <= threads <= len(cores):
        raise SystemExit(f"--threads {threads}: this process may use {len(cores)} cores")
    if threads < len(cores) and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores[:threads])
    return threads


def header(threads, torch, torchvision, jax, torch_device="cpu"):
    """Set torch's threads to `threads`, print versions, devices and thread counts."""
    torch.set_num_threads(threads)
    print(f"maskrcnn_jax vs torchvision with its compiled C++/CUDA kernels (torchvision.ops nms, "
          f"roi_align); jax {jax.__version__} on {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}); torch {torch.__version__} on {torch_device}, "
          f"torchvision {torchvision.__version__}")
    print(f"CPU threads: {threads} for both (process pinned to {len(_available_cores())} of "
          f"{os.cpu_count()} cores; XLA's CPU pool uses them all; torch.set_num_threads"
          f"({torch.get_num_threads()}))")
    print("ratios: maskrcnn_jax / torchvision speed = torchvision time / maskrcnn_jax time "
          "(> 1: maskrcnn_jax is faster)", flush=True)


def torch_device(jax, torch):
    """Where torch runs: CUDA when JAX runs on a GPU and torch has CUDA, else the CPU (so both
    sides always use the same kind of device)."""
    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_sync(torch, device):
    """Wait for torch's queued GPU work (no-op on the CPU), so the wall time covers it."""
    if device == "cuda":
        torch.cuda.synchronize()


def detecting_torchvision_maskrcnn(torch, torchvision):
    """torchvision's `maskrcnn_resnet50_fpn` in eval mode with random weights (seed 0) made to
    detect (RPN and class logits scaled: ~100 detections per image, so the post-processing does
    real work), and a copy of its state dict (to convert). Returns `(model, state_dict)`."""
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None).eval()
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.mul_(4.0)
        model.roi_heads.box_predictor.cls_score.weight.mul_(3.0)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}
