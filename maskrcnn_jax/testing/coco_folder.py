"""A small COCO-format folder (json + JPEG/PNG images, polygons and RLE) that data tests build."""

import io
import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}]
LABEL_OF = {3: 1, 7: 2, 18: 3}  # sorted ids -> 1..K


def _image_bytes(array, fmt):
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def write_coco_folder(root, rng=None):
    """A tiny COCO folder: train (RGB JPEG with polygons + uncompressed crowd RLE, grayscale PNG
    with a compressed RLE and a two-part polygon, an image without annotations) and val."""
    rng = rng or np.random.default_rng(0)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for d in ("train", "val"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    images = {
        11: ("a.jpg", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), "JPEG"),
        5: ("gray.png", rng.integers(0, 256, (30, 20), dtype=np.uint8), "PNG"),
        42: ("empty.jpg", rng.integers(0, 256, (24, 36, 3), dtype=np.uint8), "JPEG"),
    }
    for file, array, fmt in images.values():
        with open(os.path.join(root, "train", file), "wb") as f:
            f.write(_image_bytes(array, fmt))
    crowd = np.zeros((40, 50), np.uint8)
    crowd[5:30, 30:48] = 1
    flat = crowd.flatten(order="F")  # uncompressed RLE: run lengths in column-major order
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    gray_mask = np.zeros((30, 20), np.uint8, order="F")
    gray_mask[3:12, 4:15] = 1
    gray_rle = mask_utils.encode(gray_mask)
    annotations = [
        {"id": 101, "image_id": 11, "category_id": 18, "iscrowd": 0, "area": 300.0,
         "bbox": [2.5, 3.0, 20.0, 15.5],
         "segmentation": [[2.5, 3.0, 22.5, 3.0, 22.5, 18.5, 2.5, 18.5]]},
        {"id": 102, "image_id": 11, "category_id": 3, "iscrowd": 0, "area": 120.0,
         "bbox": [10.0, 20.0, 12.0, 14.0],
         "segmentation": [[10.0, 20.0, 22.0, 27.0, 10.0, 34.0]]},
        {"id": 103, "image_id": 11, "category_id": 3, "iscrowd": 1, "area": float(crowd.sum()),
         "bbox": [30.0, 5.0, 18.0, 25.0],
         "segmentation": {"size": [40, 50], "counts": runs}},
        {"id": 104, "image_id": 5, "category_id": 7, "iscrowd": 0, "area": float(gray_mask.sum()),
         "bbox": [4.0, 3.0, 11.0, 9.0],
         "segmentation": {"size": [30, 20], "counts": gray_rle["counts"].decode()}},
        {"id": 105, "image_id": 5, "category_id": 18, "iscrowd": 0, "area": 40.0,
         "bbox": [1.0, 15.0, 17.0, 12.0],
         "segmentation": [[1.0, 15.0, 6.0, 15.0, 6.0, 20.0], [10.0, 20.0, 18.0, 20.0, 18.0, 27.0]]},
    ]
    train = {"images": [{"id": i, "file_name": f, "height": a.shape[0], "width": a.shape[1]}
                        for i, (f, a, _) in images.items()],
             "annotations": annotations, "categories": CATEGORIES}
    with open(os.path.join(root, "annotations", "instances_train.json"), "w") as f:
        json.dump(train, f)
    val_image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with open(os.path.join(root, "val", "v.png"), "wb") as f:
        f.write(_image_bytes(val_image, "PNG"))
    val = {"images": [{"id": 7, "file_name": "v.png", "height": 32, "width": 32}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 7, "iscrowd": 0, "area": 50.0,
                            "bbox": [1, 1, 10, 10],
                            "segmentation": [[1, 1, 11, 1, 11, 11, 1, 11]]}],
           "categories": CATEGORIES}
    with open(os.path.join(root, "annotations", "instances_val.json"), "w") as f:
        json.dump(val, f)
    return train, {i: a for i, (_, a, _) in images.items()}
