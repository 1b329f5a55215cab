"""maskrcnn_jax.ops.matcher.match against torchvision's Matcher, over padded ground truth.

Our gt rows are padded (interleaved at random positions); torchvision sees only the valid rows.
Our indices therefore map back through the positions of the valid rows before comparison.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou as tv_box_iou

from maskrcnn_jax.ops.boxes import box_iou
from maskrcnn_jax.ops.matcher import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, match

CONFIGS = [(0.7, 0.3, True), (0.5, 0.5, False), (0.5, 0.5, True), (0.7, 0.3, False)]


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(99)


# One compiled matcher per config (static thresholds), shared by all tests.
_MATCHERS = {
    cfg: jax.jit(lambda q, v, cfg=cfg: match(q, v, cfg[0], cfg[1], cfg[2])) for cfg in CONFIGS
}


def integer_boxes(rng, n, span=120, max_size=60):
    """Integer-coordinate float32 boxes: IoU arithmetic is then exact in any op order, and
    coincidences (ties, zero overlaps) are frequent."""
    xy = rng.integers(0, span, (n, 2))
    wh = rng.integers(1, max_size, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


MAX_GT = 16  # fixed padded gt count (one compilation per config)
NUM_PREDS = 300


def pad_gt(rng, gt, total=MAX_GT):
    """Pad `gt` to `total` rows with garbage rows at random positions; return boxes, valid mask."""
    valid = np.zeros(total, bool)
    valid[rng.choice(total, len(gt), replace=False)] = True
    boxes = (rng.uniform(0, 150, (total, 4))).astype(np.float32)  # garbage, may overlap a lot
    boxes[valid] = gt
    return boxes, valid


def reference(gt, preds, cfg):
    quality = tv_box_iou(torch.from_numpy(gt), torch.from_numpy(preds))
    return Matcher(*cfg)(quality).numpy()


def to_padded_index(ref, valid):
    """Map torchvision's compact gt indices to our padded indices (negative codes unchanged)."""
    positions = np.nonzero(valid)[0]
    return np.where(ref >= 0, positions[np.maximum(ref, 0)], ref)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_random_boxes_with_padding(rng, cfg):
    outcomes = set()
    for trial in range(4):
        gt = integer_boxes(rng, rng.integers(1, 12))
        preds = integer_boxes(rng, NUM_PREDS)
        # some predictions are small integer jitters of gt boxes, so IoU >= 0.7 occurs
        near = rng.integers(0, len(gt), 30)
        preds[:30] = gt[near] + rng.integers(-3, 4, (30, 4)).astype(np.float32)
        preds[:30, 2:] = np.maximum(preds[:30, 2:], preds[:30, :2] + 1)
        boxes, valid = pad_gt(rng, gt)
        expected = to_padded_index(reference(gt, preds, cfg), valid)
        quality = box_iou(jnp.asarray(boxes), jnp.asarray(preds), valid1=jnp.asarray(valid))
        actual = np.asarray(_MATCHERS[cfg](quality, valid))
        assert actual.dtype == np.int32
        np.testing.assert_array_equal(actual, expected)
        # the quality alone is not enough: garbage in padded rows must be masked via gt_valid too
        raw = box_iou(jnp.asarray(boxes), jnp.asarray(preds))
        np.testing.assert_array_equal(np.asarray(_MATCHERS[cfg](raw, valid)), expected)
        outcomes |= {int(np.sign(e)) if e < 0 else 1 for e in expected}
        outcomes |= {-2} if (expected == BETWEEN_THRESHOLDS).any() else set()
    # matched and background outcomes were exercised across the trials of this config
    assert {1, -1}.issubset(outcomes)
    if cfg[1] < cfg[0]:
        assert BETWEEN_THRESHOLDS in outcomes


def test_float_boxes_same_quality_matrix(rng):
    # Non-integer boxes: feed both matchers the same torchvision IoU matrix (ours padded with -1).
    for cfg in CONFIGS:
        gt = rng.uniform(0, 400, (9, 2)).astype(np.float32)
        gt = np.concatenate([gt, gt + rng.uniform(5, 150, (9, 2)).astype(np.float32)], 1)
        preds = rng.uniform(0, 400, (NUM_PREDS, 2)).astype(np.float32)
        preds = np.concatenate([preds, preds + rng.uniform(5, 150, (NUM_PREDS, 2)).astype(np.float32)], 1)
        quality = tv_box_iou(torch.from_numpy(gt), torch.from_numpy(preds)).numpy()
        valid = np.zeros(MAX_GT, bool)
        valid[rng.choice(MAX_GT, 9, replace=False)] = True
        padded = np.full((MAX_GT, NUM_PREDS), -1.0, np.float32)
        padded[valid] = quality
        expected = to_padded_index(Matcher(*cfg)(torch.from_numpy(quality)).numpy(), valid)
        np.testing.assert_array_equal(np.asarray(_MATCHERS[cfg](padded, valid)), expected)
        assert (expected >= 0).any() and (expected == BELOW_LOW_THRESHOLD).any()
        if cfg[1] < cfg[0]:
            assert (expected == BETWEEN_THRESHOLDS).any()


def test_exact_ties_and_gt_overlapping_nothing(rng):
    preds = integer_boxes(rng, NUM_PREDS)
    preds[50:55] = preds[10]  # duplicate predictions: tied highest IoU for the gt below
    gt = np.stack(
        [
            preds[10] + np.array([1, 1, 0, 0], np.float32),  # best matched by preds 10 and 50..54
            preds[10] + np.array([1, 1, 0, 0], np.float32),  # duplicate gt: argmax tie -> first gt
            np.array([1000, 1000, 1010, 1010], np.float32),  # overlaps nothing: highest IoU is 0
            preds[77],
        ]
    )
    for cfg in CONFIGS:
        expected = reference(gt, preds, cfg)
        boxes, valid = pad_gt(rng, gt)
        quality = box_iou(jnp.asarray(boxes), jnp.asarray(preds), valid1=jnp.asarray(valid))
        actual = np.asarray(_MATCHERS[cfg](quality, valid))
        np.testing.assert_array_equal(actual, to_padded_index(expected, valid))
        assert not (expected == 1).any()  # ties over gt go to the first of the duplicate gts
        if cfg[2]:
            # torchvision's quirk: the gt overlapping nothing has highest IoU 0, so every prediction
            # with IoU 0 to it (all of them) gets its argmax back: nothing stays -1 or -2.
            assert (expected >= 0).all()
            assert (expected == 0).sum() > 6  # zero-overlap predictions fall back to gt 0


def test_no_valid_gt_and_empty_shapes(rng):
    preds = integer_boxes(rng, NUM_PREDS)
    boxes = integer_boxes(rng, MAX_GT)
    valid = np.zeros(MAX_GT, bool)
    for cfg in CONFIGS:
        quality = box_iou(jnp.asarray(boxes), jnp.asarray(preds), valid1=jnp.asarray(valid))
        np.testing.assert_array_equal(np.asarray(_MATCHERS[cfg](quality, valid)), BELOW_LOW_THRESHOLD)
        # unmasked quality with overlaps: gt_valid alone must still force background
        raw = box_iou(jnp.asarray(preds[:MAX_GT]), jnp.asarray(preds))
        np.testing.assert_array_equal(np.asarray(_MATCHERS[cfg](raw, valid)), BELOW_LOW_THRESHOLD)
    assert match(jnp.zeros((0, 7)), jnp.zeros((0,), bool), 0.7, 0.3, True).shape == (7,)
    np.testing.assert_array_equal(match(jnp.zeros((0, 7)), jnp.zeros((0,), bool), 0.7, 0.3, True), -1)
    assert match(jnp.zeros((4, 0)), jnp.ones((4,), bool), 0.7, 0.3, True).shape == (0,)
    with pytest.raises(ValueError):
        match(jnp.zeros((2, 3)), jnp.ones((2,), bool), 0.3, 0.7, False)


@pytest.mark.parametrize("cfg", [(0.7, 0.3, True), (0.5, 0.5, False)])
def test_vmap_over_images(rng, cfg):
    num_images, max_gt, num_preds = 4, 8, 100
    gt_boxes = np.zeros((num_images, max_gt, 4), np.float32)
    gt_valid = np.zeros((num_images, max_gt), bool)
    preds = np.stack([integer_boxes(rng, num_preds) for _ in range(num_images)])
    expected = []
    for i, n in enumerate([3, 8, 0, 1]):
        gt = integer_boxes(rng, n)
        boxes, valid = pad_gt(rng, gt, max_gt)
        gt_boxes[i], gt_valid[i] = boxes, valid
        if n:
            expected.append(to_padded_index(reference(gt, preds[i], cfg), valid))
        else:
            expected.append(np.full(num_preds, BELOW_LOW_THRESHOLD))

    def per_image(g, v, p):
        return match(box_iou(g, p, valid1=v), v, *cfg)

    actual = np.asarray(jax.jit(jax.vmap(per_image))(gt_boxes, gt_valid, preds))
    np.testing.assert_array_equal(actual, np.stack(expected))
