"""Mask targets vs torchvision's `project_masks_on_boxes`, and the compact (cropped) form's error.

References: torchvision.models.detection.roi_heads.project_masks_on_boxes (its compiled
RoIAlign) on random masks and boxes; the compact form (targets from the input pipeline's mask
crops, `data.mask_crops.crop_resized_masks`) is measured against our full-resolution targets on
realistic data (filled ellipses / star polygons in their tight boxes, proposals jittered GT
boxes).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import project_masks_on_boxes as tv_project

from maskrcnn_jax.data.mask_crops import crop_resized_masks
from maskrcnn_jax.ops.mask_targets import (
    project_cropped_masks_on_boxes,
    project_masks_on_boxes,
)

ATOL = 1e-5
project_jit = jax.jit(project_masks_on_boxes, static_argnames=("mask_size", "max_sampling_grid"))


def _crops(masks, gt_boxes, crop_size):
    """`(G, S, S)` crops of `(G, H, W)` masks on their boxes, as the input pipeline makes them
    (not resized: identity row / column maps)."""
    _, height, width = masks.shape
    return crop_resized_masks(masks.astype(np.uint8), np.arange(height), np.arange(width),
                              gt_boxes, crop_size)


def test_project_masks_on_boxes_matches_torchvision():
    rng = np.random.default_rng(0)
    num_gt, height, width, num_rois, size = 4, 30, 40, 60, 7
    masks = (rng.random((num_gt, height, width)) > 0.5).astype(np.float32)
    # Boxes partly beyond the image (within 1 px, where the pure-torch path is exact), tiny,
    # zero-size and inverted.
    x = rng.uniform(-1, width - 1, (num_rois, 2))
    y = rng.uniform(-1, height - 1, (num_rois, 2))
    boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1).astype(np.float32)
    boxes[:30] = np.concatenate([np.minimum(boxes[:30, :2], boxes[:30, 2:]),
                                 np.maximum(boxes[:30, :2], boxes[:30, 2:])], 1)
    boxes[0] = [5, 5, 5, 5]
    boxes[1] = [3, 4, 3.4, 20]
    matched = rng.integers(0, num_gt, num_rois).astype(np.int64)
    grid = int(np.ceil(max(width, height) / size)) + 1
    got = project_jit(jnp.asarray(masks), jnp.asarray(boxes), jnp.asarray(matched, jnp.int32),
                      mask_size=size, max_sampling_grid=grid)
    want = tv_project(torch.from_numpy(masks), torch.from_numpy(boxes), torch.from_numpy(matched), size)
    assert got.shape == (num_rois, size, size) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=0, atol=ATOL)
    assert want.numpy().max() > 0.9


def _shape_mask(rng, height, width):
    """A filled ellipse or star polygon with a random 16..400 px tight box; (mask, tight box)."""
    for _ in range(100):
        bw, bh = np.exp(rng.uniform(np.log(16), np.log(400), 2))
        if bw < width - 2 and bh < height - 2:
            break
    cx = rng.uniform(bw / 2, width - bw / 2)
    cy = rng.uniform(bh / 2, height - bh / 2)
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    u, v = (xx - cx) / (bw / 2), (yy - cy) / (bh / 2)
    if rng.random() < 0.5:
        mask = u**2 + v**2 <= 1.0
    else:  # star-shaped polygon: radius piecewise linear in the angle
        radii = rng.uniform(0.35, 1.0, 9)
        radii[rng.integers(9)] = 1.0
        angle = np.arctan2(v, u)
        r = np.interp(angle, np.linspace(-np.pi, np.pi, 10), np.append(radii, radii[0]))
        mask = np.hypot(u, v) <= r
    ys, xs = np.nonzero(mask)
    box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # tight pixel box
    return mask.astype(np.float32), np.array(box, np.float32)


def _realistic_image(rng, height, width, num_gt, num_rois):
    masks, gt_boxes = zip(*[_shape_mask(rng, height, width) for _ in range(num_gt)])
    masks, gt_boxes = np.stack(masks), np.stack(gt_boxes)
    matched = rng.integers(0, num_gt, num_rois)
    gt = gt_boxes[matched]
    size = gt[:, 2:] - gt[:, :2]
    center = (gt[:, :2] + gt[:, 2:]) / 2 + rng.uniform(-0.3, 0.3, (num_rois, 2)) * size
    new_size = size * rng.uniform(0.7, 1.3, (num_rois, 2))
    boxes = np.concatenate([center - new_size / 2, center + new_size / 2], 1)
    boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
    return masks, gt_boxes, boxes, matched.astype(np.int32)


@pytest.mark.parametrize("image_size", [(512, 512), (800, 1066)])
def test_cropped_mask_targets_close_to_full_resolution(image_size):
    rng = np.random.default_rng(image_size[1])
    masks, gt_boxes, boxes, matched = _realistic_image(rng, *image_size, num_gt=6, num_rois=48)
    grid = int(np.ceil((boxes[:, 2:] - boxes[:, :2]).max() / 28))  # exact full-resolution targets
    full = np.asarray(project_jit(jnp.asarray(masks), jnp.asarray(boxes), jnp.asarray(matched),
                                  mask_size=28, max_sampling_grid=grid))
    crops = _crops(masks, gt_boxes, 112)
    assert crops.shape == (6, 112, 112)
    compact = jax.jit(project_cropped_masks_on_boxes, static_argnames=("mask_size",))(
        crops, jnp.asarray(gt_boxes), jnp.asarray(boxes), jnp.asarray(matched), mask_size=28)
    err = np.abs(np.asarray(compact) - full)
    per_roi = err.mean(axis=(1, 2))
    print(f"{image_size}: compact-form MAE {err.mean():.4f}, worst RoI {per_roi.max():.4f}, "
          f"max abs {err.max():.3f}")
    assert err.mean() <= 0.02
    assert full.mean() > 0.2  # real targets, not all-empty


@pytest.mark.slow
def test_mask_targets_vmap_over_images():
    rng = np.random.default_rng(5)
    images = [_realistic_image(rng, 96, 128, num_gt=3, num_rois=10) for _ in range(2)]
    masks, gt_boxes, boxes, matched = (np.stack(x) for x in zip(*images))
    full = jax.jit(jax.vmap(lambda m, b, i: project_masks_on_boxes(m, b, i, 14, 10)))(masks, boxes, matched)
    crops = np.stack([_crops(m, g, 32) for m, g in zip(masks, gt_boxes)])
    compact = jax.jit(jax.vmap(lambda c, g, b, i: project_cropped_masks_on_boxes(c, g, b, i, 14)))(
        crops, gt_boxes, boxes, matched)
    for k in range(2):
        want = tv_project(torch.from_numpy(masks[k]), torch.from_numpy(boxes[k]),
                          torch.from_numpy(matched[k].astype(np.int64)), 14).numpy()
        np.testing.assert_allclose(np.asarray(full[k]), want, rtol=0, atol=ATOL)
        one = project_cropped_masks_on_boxes(crops[k], jnp.asarray(gt_boxes[k]), jnp.asarray(boxes[k]),
                                             jnp.asarray(matched[k]), 14)
        np.testing.assert_allclose(np.asarray(compact[k]), np.asarray(one), rtol=0, atol=ATOL)
