"""Large-scale jitter (`data/lsj.py`, `pipeline.prepare_lsj_example`) against torchvision.

* ScaleJitter: for the same uniform draw, `transforms.v2.ScaleJitter(target_size=(S, S))` of a
  PIL image (the recipe's backend) gives the same output size, the same pixels (its resize is
  PIL's antialiased bilinear) and the same boxes as ours.
* The whole augmentation (resize, FixedSizeCrop with one draw for both axes, padding with the
  mean colour, flip) against an independent NumPy composition on full-resolution masks, with
  torchvision's `roi_align` cropping the masks onto their boxes (`project_masks_on_boxes`).
"""

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.ops import roi_align
from torchvision.transforms import v2

from maskrcnn_jax.config import model_config
from maskrcnn_jax.data import coco_rle, lsj, pipeline
from maskrcnn_jax.ops.interpolate import nearest_indices

SIZE = 96
JITTER = lsj.LargeScaleJitter(size=SIZE)


def _image(rng, h, w):
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    return np.clip(base + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape, draw", [((70, 50), 0.0), ((70, 50), 0.31), ((41, 130), 0.77),
                                         ((120, 120), 0.999), ((33, 200), 0.5)])
def test_scale_jitter_matches_torchvision(shape, draw):
    h, w = shape
    image = _image(np.random.default_rng(0), h, w)
    boxes = np.asarray([[3.5, 4.0, 30.0, 41.25], [10.0, 0.0, w, h]], np.float32)
    torch.manual_seed(123)
    u = float(torch.rand(1))
    torch.manual_seed(123)  # ScaleJitter draws the same u
    out_image, out_boxes = v2.ScaleJitter(target_size=(SIZE, SIZE))(
        Image.fromarray(image), tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=shape))
    g = lsj.geometry(h, w, JITTER, lsj.draw_scale(JITTER, u), draw, flip=False)
    theirs = np.asarray(out_image)
    assert g.resized == theirs.shape[:2]
    resized = lsj.transform_image(image, lsj.Geometry(g.original, g.resized, 0, 0, g.resized,
                                                      max(g.resized), False), JITTER.fill)
    np.testing.assert_array_equal(resized[:g.resized[0], :g.resized[1]], theirs)
    ratio_only = lsj.Geometry(g.original, g.resized, 0, 0, (10 ** 6, 10 ** 6), 10 ** 6, False)
    ours_boxes, _ = lsj.transform_boxes(boxes, ratio_only)
    np.testing.assert_array_equal(ours_boxes, out_boxes.numpy())


def _reference(record, g, fill, crop_size):
    """The LSJ example by hand: full-resolution masks resized (torch nearest), cropped, padded,
    flipped; boxes scaled, shifted, clamped, empty ones dropped, flipped; crops by roi_align."""
    image = np.asarray(record["image"])
    h0, w0 = image.shape[:2]
    resized = np.asarray(Image.fromarray(image).resize(g.resized[::-1], Image.BILINEAR))
    masks = coco_rle.decode_masks(record["mask_rles"], h0, w0)
    masks = masks[:, nearest_indices(h0, g.resized[0])][:, :, nearest_indices(w0, g.resized[1])]
    ch, cw = g.cropped
    out = np.empty((g.size, g.size, 3), np.uint8)
    out[...] = fill
    out[:ch, :cw] = resized[g.top:g.top + ch, g.left:g.left + cw]
    full = np.zeros((len(masks), g.size, g.size), np.float32)
    full[:, :ch, :cw] = masks[:, g.top:g.top + ch, g.left:g.left + cw]
    boxes = np.asarray(record["boxes"], np.float32) * np.float32(g.resized[1] / w0)
    boxes[:, 1::2] = np.asarray(record["boxes"], np.float32)[:, 1::2] * np.float32(
        g.resized[0] / h0)
    boxes -= np.asarray([g.left, g.top] * 2, np.float32)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, cw)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, ch)
    kept = (boxes[:, 0] < boxes[:, 2]) & (boxes[:, 1] < boxes[:, 3])
    if g.flip:
        out, full = out[:, ::-1], full[:, :, ::-1]
        boxes = np.stack([g.size - boxes[:, 2], boxes[:, 1], g.size - boxes[:, 0], boxes[:, 3]], 1)
    rois = torch.cat([torch.arange(len(boxes))[:, None].float(), torch.from_numpy(boxes)], 1)
    crops = roi_align(torch.from_numpy(np.ascontiguousarray(full))[:, None], rois,
                      (crop_size, crop_size), 1.0).numpy()[:, 0]
    return out, boxes, kept, crops


def _record(rng, h, w):
    objects = [(5, 6, 30, 40), (h // 2, w // 3, h - 2, w - 1), (0, 0, 12, 9)]
    masks = np.zeros((len(objects), h, w), np.uint8)
    boxes = []
    for i, (y0, x0, y1, x1) in enumerate(objects):
        yy, xx = np.mgrid[y0:y1, x0:x1]
        masks[i, y0:y1, x0:x1] = ((yy + xx) % 3 != 0)
        ys, xs = np.nonzero(masks[i])
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return {"image": _image(rng, h, w), "boxes": np.asarray(boxes, np.float32),
            "labels": np.asarray([1, 2, 3], np.int32), "is_crowd": np.zeros(3, bool),
            "areas": masks.sum((1, 2)).astype(np.float32),
            "mask_rles": [r["counts"] for r in mask_utils.encode(
                np.asfortranarray(masks.transpose(1, 2, 0)))], "image_id": 7,
            "no_annotations": False}


@pytest.mark.parametrize("shape, scale, draw, flip", [
    ((80, 60), 1.9, 0.6, False),   # larger than S: cropped (boxes cut, one dropped)
    ((80, 60), 1.9, 0.6, True),
    ((70, 110), 0.4, 0.2, True),   # smaller: padded only
    ((50, 200), 1.2, 0.95, False),
])
def test_lsj_example_matches_a_direct_composition(shape, scale, draw, flip):
    config = model_config(min_size=64, max_size=64, canvas_size=(SIZE, SIZE))
    record = _record(np.random.default_rng(1), *shape)
    g = lsj.geometry(*shape, JITTER, scale, draw, flip)
    ours = pipeline.prepare_lsj_example(record, config, JITTER, scale=scale, crop_draw=draw,
                                        flip=flip, max_instances=4, mask_crop_size=14)
    image, boxes, kept, crops = _reference(record, g, JITTER.fill, 14)
    mean, std = np.asarray(config.image_mean, np.float32), np.asarray(config.image_std,
                                                                     np.float32)
    np.testing.assert_allclose(ours["images"], (image / np.float32(255) - mean) / std,
                               rtol=0, atol=1e-6)
    assert ours["image_sizes"].tolist() == ours["padded_sizes"].tolist() == [SIZE, SIZE]
    # The targets the crop keeps, in order, then padding (a dropped one is no target).
    valid = ours["valid"]
    assert valid.sum() == kept.sum() >= 1 and valid[:kept.sum()].all()
    np.testing.assert_array_equal(ours["boxes"][valid], boxes[kept])
    np.testing.assert_allclose(ours["masks"][valid], crops[kept], atol=1e-5)
    assert ours["masks"][valid].max() > 0.5  # masks present, not vacuous
