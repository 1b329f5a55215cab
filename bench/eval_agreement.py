"""Does eval.py's AP equal what torchvision's own outputs give? A trained checkpoint on real GT.

    python bench/eval_agreement.py --checkpoint WORKDIR [--max_images N] [--batch_size 8] [--threads N]

WORKDIR is a maskrcnn_jax checkpoint (a train.py workdir, e.g. of `configs/shapes.py`, or a
converted checkpoint) with a torchvision architecture (ResNet-18..101, FrozenBatchNorm). Its
weights are converted to torchvision (`convert.to_torchvision`) and loaded into the matching
torchvision `MaskRCNN` (`testing.torch_models.torchvision_maskrcnn`: same widths, resize
min/max size, thresholds). torchvision runs on each image of the evaluation split (the training
config's, default shapes validation), one at a time, and its outputs are scored with pycocotools
against the split's real ground truth; `maskrcnn_jax.inference.evaluation.evaluate` (what eval.py runs)
scores the same images. torchvision runs with its compiled C++ kernels (nms, roi_align), on the
CPU, as JAX here (JAX_PLATFORMS defaults to cpu), both with the same CPU threads (--threads,
default every core this process may use; see bench/timing.py). Prints the versions and thread
counts, both sets of bbox/segm AP figures, their differences, and the wall time of each side
(torchvision one image at a time, maskrcnn_jax in batches with compilation: not a speed
benchmark, see bench/inference.py for that). A trained
model (AP ~0.5) makes this the meaningful comparison: AP there depends on every score, box and
mask, not on a few confident detections.
"""

import argparse
import importlib.util
import os
import sys
import time

from timing import THREADS_HELP, header, pin_threads  # noqa: E402  (bench/timing.py; before jax/torch)

THREADS = pin_threads()

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

os.environ.setdefault("JAX_PLATFORMS", "cpu")

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "AR100")


def _eval_cli():
    """eval.py (a script, not a package module): its `load_source` picks the split as eval.py."""
    spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(REPO, "eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="train.py workdir or converted checkpoint")
    parser.add_argument("--data", choices=["shapes", "coco_instances"], default=None)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--split", default=None)
    parser.add_argument("--manual_dir", default=None)
    parser.add_argument("--data_config", default=None)
    parser.add_argument("--max_images", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    args = parser.parse_args(argv)

    import jax
    import torch

    from maskrcnn_jax.checkpoints import load_weights
    from maskrcnn_jax.data import builders
    from maskrcnn_jax.inference.evaluation import evaluate
    from maskrcnn_jax.testing import import_torchvision
    from maskrcnn_jax.testing.torch_models import (
        torchvision_coco_metrics,
        torchvision_maskrcnn,
    )
    from maskrcnn_jax.torchvision.convert import to_torchvision

    header(THREADS, torch, import_torchvision(), jax, "cpu")

    config, variables, train_config = load_weights(os.path.expanduser(args.checkpoint))
    source = _eval_cli().load_source(args, train_config)
    n = len(source) if args.max_images is None else min(args.max_images, len(source))
    print(f"{config.backbone}, min_size {config.min_size}, max_size {config.max_size}, "
          f"{n} images")

    model = torchvision_maskrcnn(config)
    model.load_state_dict(to_torchvision(config, variables), strict=True)
    ground_truth = builders.coco_ground_truth(source)
    start = time.perf_counter()
    theirs, results = torchvision_coco_metrics(model, source, max_images=n,
                                               ground_truth=ground_truth)
    torch_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = evaluate(config, variables, source, batch_size=args.batch_size, max_images=n,
                    progress=False)
    jax_s = time.perf_counter() - start

    print(f"\ntorchvision: {len(results)} detections in {torch_s:.1f} s; "
          f"maskrcnn_jax evaluate: {jax_s:.1f} s (compilation included)")
    print(f"{'metric':<12}{'torchvision':>12}{'eval.py':>12}{'difference':>12}")
    worst = 0.0
    for iou_type in ("bbox", "segm"):
        for name in KEYS:
            key = f"{iou_type}/{name}"
            diff = ours[key] - theirs[key]
            worst = max(worst, abs(diff)) if name == "AP" else worst
            print(f"{key:<12}{theirs[key]:>12.4f}{ours[key]:>12.4f}{diff:>+12.4f}")
    print(f"largest |AP difference| (bbox, segm): {worst:.4f} = {100 * worst:.2f} AP points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
