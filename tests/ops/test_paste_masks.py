"""paste_masks.py against torchvision's `paste_masks_in_image` / `expand_boxes`.

Exactness: torch's resize kernels use fused multiply-adds on FMA builds (AVX2 / AVX512),
where we require bit-identical masks; elsewhere we allow the brief's 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import expand_boxes
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

from maskrcnn_jax.ops.paste_masks import (
    expand_boxes as jax_expand_boxes,
    expand_boxes_to_int,
    paste_masks_in_image,
    paste_masks_into_canvas,
)

FMA_BUILD = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
IMAGE = (150, 190)


def assert_matches(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    max_diff = float(np.max(np.abs(ours - ref), initial=0.0))
    assert max_diff <= (0.0 if FMA_BUILD else 1e-6), f"max abs diff {max_diff}"
    return max_diff


def random_boxes(rng, n, image_size):
    """Boxes of every kind: inside, partly outside, tiny (< 1 px), huge, near-integer."""
    im_h, im_w = image_size
    kinds = []
    centres = np.stack([rng.uniform(0, im_w, n), rng.uniform(0, im_h, n)], 1)
    sizes = np.exp(rng.uniform(np.log(2.0), np.log(0.9 * min(im_h, im_w)), (n, 2)))
    kinds.append(np.concatenate([centres - sizes / 2, centres + sizes / 2], 1))  # mostly inside
    edge = np.stack([rng.uniform(-40, im_w + 40, n), rng.uniform(-40, im_h + 40, n)], 1)
    kinds.append(np.concatenate([edge - sizes / 2, edge + sizes / 2], 1))  # often partly out
    tiny = rng.uniform(0.0, 0.9, (n, 2))
    kinds.append(np.concatenate([centres - tiny / 2, centres + tiny / 2], 1))  # < 1 pixel
    huge = rng.uniform(1.0, 1.6, (n, 2)) * np.array([im_w, im_h])
    kinds.append(np.concatenate([centres - huge / 2, centres + huge / 2], 1))  # beyond image
    near_int = np.round(kinds[0]) + rng.choice([-1e-4, 0.0, 1e-4], (n, 4))
    kinds.append(np.sort(near_int.reshape(n, 2, 2), axis=1).reshape(n, 4))
    return np.concatenate(kinds).astype(np.float32)


def fully_outside(boxes, mask_size, image_size, padding=1):
    """Boxes whose expanded integer box misses the image (torchvision's slicing may fail)."""
    b = expand_boxes(torch.from_numpy(boxes), (mask_size + 2 * padding) / mask_size).to(torch.int64)
    b = b.numpy()
    im_h, im_w = image_size
    return (b[:, 2] < 0) | (b[:, 3] < 0) | (b[:, 0] >= im_w) | (b[:, 1] >= im_h)


@pytest.fixture(scope="module")
def paste_fn():
    return jax.jit(paste_masks_in_image, static_argnames=("image_size", "padding"))


@pytest.mark.parametrize("mask_size", [28, 14])
def test_paste_matches_torchvision(paste_fn, mask_size):
    rng = np.random.default_rng(mask_size)
    boxes = random_boxes(rng, 16, IMAGE)
    masks = rng.random((len(boxes), mask_size, mask_size)).astype(np.float32)
    outside = fully_outside(boxes, mask_size, IMAGE)
    ours = np.asarray(paste_fn(jnp.asarray(masks), jnp.asarray(boxes), IMAGE))
    assert ours.shape == (len(boxes),) + IMAGE and ours.dtype == np.float32

    ref = tv_paste(torch.from_numpy(masks[~outside, None]), torch.from_numpy(boxes[~outside]),
                   IMAGE)[:, 0].numpy()
    assert_matches(ours[~outside], ref)
    # Both torch kernels (small boxes: channels-last, large: generic) must be exercised.
    heights = boxes[~outside, 3] - boxes[~outside, 1]
    widths = boxes[~outside, 2] - boxes[~outside, 0]
    assert np.any(heights + widths < 100) and np.any(heights + widths > 150)
    assert ref.any(axis=(1, 2)).sum() > len(ref) // 2
    # Boxes off the image: torchvision either raises or returns zeros; we return zeros.
    assert outside.sum() > 0 and not ours[outside].any()
    for box, mask in zip(boxes[outside], masks[outside]):
        try:
            single = tv_paste(torch.from_numpy(mask[None, None]), torch.from_numpy(box[None]),
                              IMAGE)
        except RuntimeError:
            continue
        assert not single.any()


def test_paste_with_padding_two():
    rng = np.random.default_rng(2)
    boxes = random_boxes(rng, 3, IMAGE)
    boxes = boxes[~fully_outside(boxes, 14, IMAGE, padding=2)]
    masks = rng.random((len(boxes), 14, 14)).astype(np.float32)
    ours = paste_masks_in_image(jnp.asarray(masks), jnp.asarray(boxes), IMAGE, padding=2)
    ref = tv_paste(torch.from_numpy(masks[:, None]), torch.from_numpy(boxes), IMAGE,
                   padding=2)[:, 0].numpy()
    assert_matches(ours, ref)


def test_inverted_boxes_match_torchvision(paste_fn):
    """x2 < x1 (or y2 < y1): torchvision's 1-pixel resize is sliced away, leaving zeros."""
    boxes = np.array([[50.0, 20.0, 45.0, 60.0], [10.0, 70.0, 90.0, 66.2], [30.5, 30.5, 30.2, 30.1],
                      [100.0, 40.0, 101.5, 41.0]], np.float32)
    masks = np.random.default_rng(5).random((4, 28, 28)).astype(np.float32)
    ours = paste_fn(jnp.asarray(masks), jnp.asarray(boxes), IMAGE)
    ref = tv_paste(torch.from_numpy(masks[:, None]), torch.from_numpy(boxes), IMAGE)[:, 0]
    assert_matches(ours, ref.numpy())
    assert ref[3].any()  # the last, normal, box is pasted


def test_expand_boxes_to_int_matches_torchvision():
    rng = np.random.default_rng(3)
    boxes = random_boxes(rng, 2000, (800, 1333))
    for mask_size in (28, 14):
        ref = expand_boxes(torch.from_numpy(boxes), (mask_size + 2) / mask_size).to(torch.int64)
        ours = expand_boxes_to_int(jnp.asarray(boxes), mask_size)
        np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


def test_expand_boxes_float_is_bit_identical():
    """Catches a fused multiply-add XLA might form that torch does not (1-ulp changes)."""
    boxes = np.random.default_rng(6).uniform(-200, 1500, (50000, 4)).astype(np.float32)
    for scale in (30 / 28, 16 / 14, 1.5):
        ref = expand_boxes(torch.from_numpy(boxes), scale).numpy()
        ours = jax.jit(jax_expand_boxes, static_argnums=1)(jnp.asarray(boxes), scale)
        np.testing.assert_array_equal(np.asarray(ours), ref)


def test_no_masks():
    out = paste_masks_in_image(jnp.zeros((0, 28, 28)), jnp.zeros((0, 4)), IMAGE)
    assert out.shape == (0,) + IMAGE and out.dtype == jnp.float32
    ref = tv_paste(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), IMAGE)
    assert tuple(ref.shape) == (0, 1) + IMAGE


CANVAS = (160, 200)


@pytest.fixture(scope="module")
def canvas_case():
    """Masks, boxes and sizes of three images of different sizes, padded to 12 masks."""
    rng = np.random.default_rng(4)
    sizes = [(150, 190), (97, 131), (160, 200)]
    masks, boxes = [], []
    for size in sizes:
        b = random_boxes(rng, 4, size)
        b = b[~fully_outside(b, 28, size)][:12]
        assert len(b) >= 8
        masks.append(rng.random((len(b), 28, 28)).astype(np.float32))
        boxes.append(b)
    return sizes, masks, boxes


def test_canvas_matches_torchvision_and_compiles_once(canvas_case):
    sizes, masks, boxes = canvas_case
    jitted = jax.jit(paste_masks_into_canvas, static_argnames=("canvas_size", "padding"))
    for size, m, b in zip(sizes, masks, boxes):
        out = np.asarray(jitted(jnp.asarray(m[:8]), jnp.asarray(b[:8]),
                                jnp.asarray(size, jnp.int32), CANVAS))
        assert out.shape == (8,) + CANVAS
        ref = tv_paste(torch.from_numpy(m[:8, None]), torch.from_numpy(b[:8]), size)[:, 0]
        assert_matches(out[:, : size[0], : size[1]], ref.numpy())
        assert not out[:, size[0]:].any() and not out[:, :, size[1]:].any()
    assert jitted._cache_size() == 1


def test_canvas_vmap_over_images(canvas_case):
    sizes, masks, boxes = canvas_case
    n = min(len(m) for m in masks)
    batched = jax.jit(jax.vmap(lambda m, b, s: paste_masks_into_canvas(m, b, s, CANVAS)))
    outs = np.asarray(batched(jnp.asarray(np.stack([m[:n] for m in masks])),
                              jnp.asarray(np.stack([b[:n] for b in boxes])),
                              jnp.asarray(sizes, jnp.int32)))
    for out, size, m, b in zip(outs, sizes, masks, boxes):
        ref = tv_paste(torch.from_numpy(m[:n, None]), torch.from_numpy(b[:n]), size)[:, 0]
        assert_matches(out[:, : size[0], : size[1]], ref.numpy())
        assert not out[:, size[0]:].any() and not out[:, :, size[1]:].any()
