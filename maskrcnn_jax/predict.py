"""Detect objects in image files and write pictures and COCO-format detections.

    python -m maskrcnn_jax.predict IMAGE [IMAGE ...] --checkpoint DIR --out DIR
        [--score-threshold 0.5] [--class-names names.txt]

`--checkpoint` is a directory written by `python -m maskrcnn_jax.convert` (config.json +
Orbax variables) or a training workdir of train.py. For each image, `OUT/<name>.png` shows the
masks, boxes, labels and scores drawn over the image, and `OUT/<name>.json` holds its detections
in COCO results format (bbox as xywh, masks as RLE, `category_id` = the 1-based label unless
the checkpoint's data set maps labels to category ids).
"""

import argparse
import json
import os
import sys

import numpy as np

from maskrcnn_jax.checkpoints import load_checkpoint

_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
], np.uint8)


def draw_detections(image, detections, class_names=None, score_threshold=0.5):
    """An RGB uint8 picture of `image` with masks (tinted), boxes, labels and scores drawn."""
    from PIL import Image, ImageDraw

    canvas = np.asarray(image, np.float32).copy()
    keep = detections["scores"] >= score_threshold
    for i in np.where(keep)[0]:
        color = _PALETTE[int(detections["labels"][i]) % len(_PALETTE)].astype(np.float32)
        mask = detections["masks"][i, 0] >= 0.5
        canvas[mask] = 0.5 * canvas[mask] + 0.5 * color
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for i in np.where(keep)[0]:
        color = tuple(int(c) for c in _PALETTE[int(detections["labels"][i]) % len(_PALETTE)])
        x1, y1, x2, y2 = (float(v) for v in detections["boxes"][i])
        draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
        label = int(detections["labels"][i])
        name = class_names[label] if class_names and label < len(class_names) else str(label)
        text = f"{name} {float(detections['scores'][i]):.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text)
        y_text = max(y1 - (bottom - top) - 2, 0)
        draw.rectangle([x1, y_text, x1 + right - left + 4, y_text + bottom - top + 2], fill=color)
        draw.text((x1 + 2, y_text), text, fill=(255, 255, 255))
    return np.asarray(picture)


def coco_results(detections, image_id, category_ids=None):
    """COCO results-format dicts for one image's detections (bbox xywh, RLE masks), as
    `evaluation.detections_to_coco`; labels are the category ids unless `category_ids`, a
    `{label: category id}` dict, maps them."""
    from maskrcnn_jax.evaluation import detections_to_coco

    labels = np.asarray(detections["labels"]).reshape(-1)
    mapping = category_ids or {int(label): int(label) for label in labels}
    return detections_to_coco(image_id, detections["boxes"], detections["scores"], labels,
                              detections["masks"], mapping)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="detections drawn (all are written to the JSON)")
    parser.add_argument("--class-names", help="text file, one name per line, line 0 = background")
    args = parser.parse_args(argv)
    from PIL import Image

    from maskrcnn_jax.predictor import Predictor

    for path in args.images:
        if not os.path.isfile(path):
            parser.error(f"no such image file: {path}")
    config, variables, train_config = load_checkpoint(args.checkpoint)
    class_names = None
    if train_config and train_config.get("data", {}).get("name") == "shapes":
        from maskrcnn_jax.data.shapes import CLASS_NAMES

        class_names = ["background", *CLASS_NAMES]
    if args.class_names:
        with open(args.class_names) as f:
            class_names = [line.strip() for line in f]
    predictor = Predictor(config, variables)
    os.makedirs(args.out, exist_ok=True)
    for image_id, path in enumerate(args.images):
        try:
            image = np.asarray(Image.open(path).convert("RGB"))
        except OSError as e:
            raise SystemExit(f"{path}: cannot read image: {e}")
        detections = predictor([image])[0]
        stem = os.path.splitext(os.path.basename(path))[0]
        Image.fromarray(draw_detections(image, detections, class_names, args.score_threshold)).save(
            os.path.join(args.out, stem + ".png"))
        with open(os.path.join(args.out, stem + ".json"), "w") as f:
            json.dump(coco_results(detections, image_id), f)
        shown = int((detections["scores"] >= args.score_threshold).sum())
        print(f"{path}: {len(detections['scores'])} detections ({shown} >= {args.score_threshold}) "
              f"-> {os.path.join(args.out, stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
