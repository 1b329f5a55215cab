"""Pictures of detections: masks tinted, boxes, labels and scores drawn over the image."""

import numpy as np

_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
], np.uint8)


def draw_detections(image, detections, class_names=None, score_threshold=0.5):
    """An RGB uint8 picture of `image` with masks (tinted), boxes, labels and scores drawn.

    `detections`: `boxes`, `scores`, `labels` and either `masks (N, 1, H, W)` (pasted, as
    `Predictor` returns by default) or `mask_probs (N, M, M)` on the boxes
    (`paste_masks=False`), pasted here one box extent at a time: no float array of the whole
    image is made, whatever its size.
    """
    return np.asarray(detections_picture(image, detections, class_names, score_threshold))


def detections_picture(image, detections, class_names=None, score_threshold=0.5):
    """`draw_detections` as a PIL image (what predict.py saves: one copy of a large image
    fewer)."""
    from PIL import Image, ImageDraw

    picture = np.array(image, np.uint8)  # a copy, tinted in place
    keep = np.flatnonzero(np.asarray(detections["scores"]) >= score_threshold)
    for i, (y0, y1, x0, x1), probs in _mask_regions(detections, keep, picture.shape[:2]):
        color = _PALETTE[int(detections["labels"][i]) % len(_PALETTE)].astype(np.float32)
        region = picture[y0:y1, x0:x1]
        inside = probs >= 0.5
        region[inside] = (0.5 * region[inside] + 0.5 * color).clip(0, 255).astype(np.uint8)
    picture = Image.fromarray(picture)
    draw = ImageDraw.Draw(picture)
    for i in keep:
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
    return picture


def _mask_regions(detections, keep, image_size):
    """`(i, (y0, y1, x0, x1), probabilities)` of the kept detections' masks, in order."""
    if "mask_probs" not in detections:
        height, width = image_size
        for i in keep:
            yield i, (0, height, 0, width), detections["masks"][i, 0]
        return
    from maskrcnn_jax.data.transform import pasted_crops

    probs = np.asarray(detections["mask_probs"])[keep]
    boxes = np.asarray(detections["boxes"])[keep]
    for k, extent, crop in pasted_crops(probs, boxes, image_size):
        yield keep[k], extent, crop
