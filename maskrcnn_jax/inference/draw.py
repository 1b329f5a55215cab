"""Pictures of detections: masks tinted, boxes, labels and scores drawn over the image."""

import numpy as np

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
