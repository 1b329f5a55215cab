"""Evaluation benchmark: eval.py's `evaluate` vs torchvision's reference evaluation loop, R50-FPN,
identical weights and images, images/s over a whole COCO evaluation.

Run:  python bench/eval.py [--images 12] [--batch_size 1] [--min_size 800 --max_size 1333]
                           [--threads N]

A COCO folder of `--images` random images in COCO's common photo shapes (640x480, 480x640,
640x427, 427x640, 640x640, 640x360; 3 random box + mask annotations each) is written and built
into the `coco_instances` data source (not timed). Both sides then evaluate every image: bbox
and segm COCOeval at the end, against the same ground truth.

- torchvision: the loop of its reference scripts (`references/detection/engine.py` `evaluate`
  with `coco_eval.CocoEvaluator`): read the image file (PIL), to a float tensor, `model([image])`
  one image at a time (torchvision's resize, network, box and mask post-processing with
  `paste_masks_in_image`), masks > 0.5 RLE-encoded per detection with pycocotools, boxes to
  xywh; then pycocotools `COCOeval` per IoU type.
- maskrcnn_jax: `maskrcnn_jax.inference.evaluation.evaluate` (what eval.py runs: the grain input
  pipeline, canvas buckets, batches of `--batch_size` per device, host paste + RLE overlapped
  with the device, pycocotools), after one untimed run that compiles every canvas used; and
  again with `coco_backend='faster_coco_eval'` when faster-coco-eval is installed.

Prints images/s of each and the ratio `maskrcnn_jax / torchvision` (> 1: maskrcnn_jax faster).
The models have random weights (seed 0) made to detect (scaled logits: ~100 detections per
image, so pasting and encoding do real work); the AP itself is meaningless here.
"""

import argparse
import json
import os
import sys
import tempfile
import time

from timing import THREADS_HELP, header, pin_threads  # noqa: E402  (bench/timing.py; before jax/torch)

THREADS = pin_threads()

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402
from timing import detecting_torchvision_maskrcnn, torch_device, torch_sync  # noqa: E402

from maskrcnn_jax.data import builders  # noqa: E402
from maskrcnn_jax.inference import evaluation  # noqa: E402
from maskrcnn_jax.testing import import_torchvision  # noqa: E402
from maskrcnn_jax.torchvision.convert import from_torchvision  # noqa: E402

COCO_SHAPES = ((480, 640), (640, 480), (427, 640), (640, 427), (640, 640), (360, 640))


def write_folder(root, n, rng):
    """COCO folder `root/{val, annotations/instances_val.json}` of `n` random images."""
    os.makedirs(os.path.join(root, "val"))
    os.makedirs(os.path.join(root, "annotations"))
    images, annotations = [], []
    for i in range(n):
        h, w = COCO_SHAPES[i % len(COCO_SHAPES)]
        file_name = f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(
            os.path.join(root, "val", file_name))
        images.append({"id": i + 1, "file_name": file_name, "height": h, "width": w})
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            x1, y1 = x0 + int(rng.integers(16, w // 2)), y0 + int(rng.integers(16, h // 2))
            mask = np.zeros((h, w), np.uint8, order="F")
            mask[y0:y1, x0:x1] = 1
            rle = mask_utils.encode(mask)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": int(rng.integers(1, 91)), "iscrowd": 0,
                                "area": float(mask.sum()),
                                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                                "segmentation": {"size": [h, w],
                                                 "counts": rle["counts"].decode()}})
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, 91)]
    with open(os.path.join(root, "annotations", "instances_val.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return images


def torchvision_reference_loop(model, root, images, device, torchvision):
    """torchvision's references/detection evaluation: per image model + paste, RLE per mask,
    then COCOeval (bbox, segm). Returns the 24 stats."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from torchvision.transforms.functional import pil_to_tensor

    results = []
    with torch.no_grad():
        for info in images:
            image = Image.open(os.path.join(root, "val", info["file_name"])).convert("RGB")
            tensor = pil_to_tensor(image).to(device).float() / 255.0
            out = {k: v.to("cpu") for k, v in model([tensor])[0].items()}
            torch_sync(torch, device)
            boxes = out["boxes"]
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
            masks = out["masks"] > 0.5  # coco_eval.prepare_for_coco_segmentation
            rles = [mask_utils.encode(np.array(m[0, :, :, np.newaxis], dtype=np.uint8,
                                               order="F"))[0] for m in masks]
            for k, (score, label) in enumerate(zip(out["scores"].tolist(),
                                                   out["labels"].tolist())):
                rles[k]["counts"] = rles[k]["counts"].decode("utf-8")
                results.append({"image_id": info["id"], "category_id": label, "bbox": xywh[k],
                                "score": score, "segmentation": rles[k]})
    import contextlib
    import io

    stats = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(os.path.join(root, "annotations", "instances_val.json"))
        for iou_type in ("bbox", "segm"):
            drop = "segmentation" if iou_type == "bbox" else "bbox"
            detections = gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in results])
            evaluator = COCOeval(gt, detections, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats[iou_type] = evaluator.stats
    return stats, len(results)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=1, help="maskrcnn_jax images per device")
    parser.add_argument("--min_size", type=int, default=800)
    parser.add_argument("--max_size", type=int, default=1333)
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    args = parser.parse_args()
    torchvision = import_torchvision()
    device = torch_device(jax, torch)
    print("Evaluation benchmark, R50-FPN, COCO bbox + segm")
    header(THREADS, torch, torchvision, jax, device)
    model, state = detecting_torchvision_maskrcnn(torch, torchvision)
    model.transform.min_size, model.transform.max_size = (args.min_size,), args.max_size
    model.to(device)
    work = tempfile.mkdtemp(prefix="eval_bench_")
    root = os.path.join(work, "coco")
    images = write_folder(root, args.images, np.random.default_rng(0))
    source = builders.load("coco_instances", os.path.join(work, "tfds"), "validation",
                           manual_dir=root)
    config, variables = from_torchvision(state, min_size=args.min_size, max_size=args.max_size)
    shapes = ", ".join(f"{h}x{w}" for h, w in COCO_SHAPES)
    print(f"{args.images} images ({shapes} in turn), min_size {args.min_size} / max_size "
          f"{args.max_size}; maskrcnn_jax canvases "
          f"{' '.join(f'{h}x{w}' for h, w in config.canvas_buckets)}, batch {args.batch_size}\n")

    def ours(backend):
        return evaluation.evaluate(config, variables, source, batch_size=args.batch_size,
                                   progress=False, coco_backend=backend,
                                   workdir=os.path.join(work, "out"))

    start = time.perf_counter()
    ours("pycocotools")
    first = time.perf_counter() - start
    torchvision_reference_loop(model, root, images[:1], device, torchvision)  # warm-up
    start = time.perf_counter()
    tv_stats, tv_detections = torchvision_reference_loop(model, root, images, device,
                                                         torchvision)
    tv_s = time.perf_counter() - start
    print("| evaluation | wall s | images/s | maskrcnn_jax / torchvision speed | detections | "
          "bbox AP | segm AP |\n|---|---:|---:|---:|---:|---:|---:|")
    print(f"| torchvision reference loop (batch 1) | {tv_s:.1f} | {args.images / tv_s:.2f} | | "
          f"{tv_detections} | {tv_stats['bbox'][0]:.4f} | {tv_stats['segm'][0]:.4f} |",
          flush=True)
    backends = ["pycocotools"]
    try:
        import faster_coco_eval  # noqa: F401

        backends.append("faster_coco_eval")
    except ImportError:
        print("(faster-coco-eval not installed: its row is skipped)")
    for backend in backends:
        start = time.perf_counter()
        metrics = ours(backend)
        seconds = time.perf_counter() - start
        with open(os.path.join(work, "out", "metrics.json")) as f:
            detections = json.load(f)["num_detections"]
        print(f"| maskrcnn_jax evaluate, {backend} | {seconds:.1f} | {args.images / seconds:.2f} "
              f"| {tv_s / seconds:.2f} | {detections} | {metrics['bbox/AP']:.4f} | "
              f"{metrics['segm/AP']:.4f} |", flush=True)
    print(f"\nmaskrcnn_jax's first run (compiling {len(config.canvas_buckets)} canvases at "
          f"most): {first:.1f} s")


if __name__ == "__main__":
    main()
