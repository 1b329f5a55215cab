"""Per-worker throughput of the training input pipeline: large-scale jitter into 1024 x 1024
(`pipeline.prepare_lsj_example`, torchvision's v2 recipe) against the resize to 800 / 1333
(`pipeline.prepare_example`, the 1x recipe), images/s of one process (= one grain worker).

    python bench/lsj.py [--images 40] [--size 1024] [--instances 7]

COCO-like records: 640 x 480 photos (COCO's most common size) with `--instances` objects
(COCO's mean is ~7) of polygon masks, decoded once; the timed work is everything a worker does
per record after decoding (augmentation, normalisation, box and mask targets at 112 x 112).
A host of `configs/tpu_pod_v2_lsj.py` must prepare `G / P` images per step (README,
"Per-host input budget"): the printed images/s per worker times the workers per host is what
a host sustains.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from maskrcnn_jax.config import model_config  # noqa: E402
from maskrcnn_jax.data import lsj, pipeline  # noqa: E402


def record(rng, index, height=480, width=640, instances=7):
    """A decoded COCO-like record: a textured photo and `instances` random polygons."""
    yy, xx = np.mgrid[:height, :width]
    image = np.stack([(xx * 255 // width), (yy * 255 // height), (xx ^ yy) % 256], -1)
    image = np.clip(image + rng.integers(0, 40, image.shape), 0, 255).astype(np.uint8)
    rles, boxes = [], []
    for _ in range(instances):
        cx, cy = rng.uniform(60, width - 60), rng.uniform(60, height - 60)
        radius = rng.uniform(15, 120, 12)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 12))
        poly = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
        poly = np.clip(poly, 0, [width - 1, height - 1])
        rle = mask_utils.merge(mask_utils.frPyObjects([poly.reshape(-1).tolist()], height,
                                                      width))
        x, y, w, h = mask_utils.toBbox(rle)
        rles.append(rle["counts"])
        boxes.append([x, y, x + w, y + h])
    return {"image": image, "boxes": np.asarray(boxes, np.float32),
            "labels": rng.integers(1, 81, instances).astype(np.int32),
            "is_crowd": np.zeros(instances, bool),
            "areas": np.asarray([mask_utils.area({"size": [height, width], "counts": r})
                                 for r in rles], np.float32),
            "mask_rles": rles, "image_id": index, "no_annotations": False}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--instances", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    records = [record(rng, i, instances=args.instances) for i in range(args.images)]
    config = model_config(min_size=800, max_size=1333, canvas_size=(1344, 1344))
    jitter = lsj.LargeScaleJitter(size=args.size)
    draws = np.random.default_rng(1)

    def run_lsj(r):
        return pipeline.prepare_lsj_example(
            r, config, jitter, scale=lsj.draw_scale(jitter, draws.random()),
            crop_draw=draws.random(), flip=bool(draws.random() < 0.5), max_instances=100,
            mask_crop_size=112)

    def run_resize(r):
        return pipeline.prepare_example(r, config, min_size=800, flip=bool(draws.random() < 0.5),
                                        max_instances=100, mask_crop_size=112)

    print(f"{args.images} records of 640x480 with {args.instances} instances, one process")
    for name, fn in (("LSJ into 1024x1024 (v2 recipe)", run_lsj),
                     ("resize to 800/1333 (1x recipe)", run_resize)):
        fn(records[0])  # warm-up
        start = time.perf_counter()
        for r in records:
            fn(r)
        seconds = time.perf_counter() - start
        print(f"  {name}: {args.images / seconds:.1f} images/s per worker "
              f"({1000 * seconds / args.images:.1f} ms per image)")


if __name__ == "__main__":
    main()
