"""Host pre/post-processing vs torchvision's GeneralizedRCNNTransform and paste_masks_in_image."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.detection.transform import resize_boxes as tv_resize_boxes

from maskrcnn_jax.config import model_config
from maskrcnn_jax.data.transform import (
    bilinear_resize,
    paste_masks,
    preprocess,
    resize_boxes,
    resized_size,
)


@pytest.mark.parametrize("shape", [(480, 640), (97, 100), (1000, 300), (333, 517), (64, 64), (2000, 3000)])
def test_preprocess_matches_torchvision_transform(shape):
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    config = model_config(canvas_size=(1344, 1344))
    transform = GeneralizedRCNNTransform(800, 1333, list(config.image_mean), list(config.image_std))
    with torch.no_grad():
        image_list, _ = transform([torch.from_numpy(image).permute(2, 0, 1).float() / 255.0])
    theirs = image_list.tensors[0].permute(1, 2, 0).numpy()
    batch = preprocess([image], config)
    h, w = image_list.image_sizes[0]
    assert tuple(batch.image_sizes[0]) == (h, w) == resized_size(*shape, 800, 1333)
    assert tuple(batch.padded_sizes[0]) == theirs.shape[:2]
    # torchvision normalizes in its own op order; allow float32 rounding of that only.
    np.testing.assert_allclose(batch.images[0, :h, :w], theirs[:h, :w], atol=2e-6, rtol=0)
    assert not batch.images[0, h:].any() and not batch.images[0, :, w:].any()


@pytest.mark.parametrize("in_hw,out_hw", [((30, 30), (17, 45)), ((30, 30), (200, 301)),
                                          ((480, 640), (800, 1066)), ((31, 7), (64, 64)),
                                          ((5, 9), (5, 9)), ((300, 200), (61, 40))])
def test_bilinear_resize_bit_exact(in_hw, out_hw):
    rng = np.random.default_rng(0)
    for channels in (None, 3):
        shape = in_hw if channels is None else (*in_hw, channels)
        x = rng.standard_normal(shape).astype(np.float32)
        t = torch.from_numpy(x)
        t = t[None, None] if channels is None else t.permute(2, 0, 1)[None]
        theirs = F.interpolate(t, size=out_hw, mode="bilinear", align_corners=False)[0]
        theirs = theirs[0].numpy() if channels is None else theirs.permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(bilinear_resize(x, *out_hw), theirs)


def test_paste_masks_matches_torchvision():
    rng = np.random.default_rng(0)
    n = 40
    masks = rng.random((n, 28, 28)).astype(np.float32)
    xy = rng.uniform(-50, [600, 440], (n, 2))  # torchvision crashes on boxes wholly past the image
    wh = np.exp(rng.uniform(np.log(0.5), np.log(500), (n, 2)))
    wh = np.maximum(wh, 2 - xy)  # ... and on boxes wholly before it
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    boxes[0] = [10.0, 20.0, 10.2, 20.3]  # under one pixel
    theirs = paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (480, 640))
    ours = paste_masks(masks, boxes, (480, 640))
    np.testing.assert_array_equal(ours, theirs[:, 0].numpy())
    assert paste_masks(masks[:0], boxes[:0], (480, 640)).shape == (0, 480, 640)


def test_resize_boxes_matches_torchvision():
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 800, (50, 4)).astype(np.float32)
    theirs = tv_resize_boxes(torch.from_numpy(boxes), [800, 1066], [480, 640]).numpy()
    np.testing.assert_array_equal(resize_boxes(boxes, (800, 1066), (480, 640)), theirs)


def test_preprocess_rejects_bad_input():
    config = model_config(min_size=320, max_size=800, canvas_size=(512, 512))
    with pytest.raises(ValueError, match="image 1: expected dtype uint8"):
        preprocess([np.zeros((10, 10, 3), np.uint8), np.zeros((10, 10, 3), np.float32)], config)
    with pytest.raises(ValueError, match=r"image 0: expected an \(H, W, 3\)"):
        preprocess([np.zeros((10, 10), np.uint8)], config)
    with pytest.raises(ValueError, match="does not fit the canvas"):
        preprocess([np.zeros((1000, 300, 3), np.uint8)], config)
