"""Tests of `maskrcnn_jax.ops.nms` against torchvision's `nms` / `batched_nms` (exact indices).

The reference is `torchvision.ops.nms` (its compiled C++ CPU kernel: stable descending sort,
IoU > threshold in float32) applied to the
valid boxes only, mapped back to the padded indices. Boxes are clustered (jittered copies of a
few base boxes) so that IoUs spread over [0, 1] and long suppression chains occur; each data
set asserts that a good share of the boxes is suppressed, so the comparison is not vacuous.
"""

import jax
import numpy as np
import pytest
import torch
import torchvision

from maskrcnn_jax.ops.nms import batched_nms_padded, default_settings, nms_padded

STATIC = ("max_output", "tile_size", "block_size", "self_suppression")
# The threshold is a traced argument: one compilation serves all thresholds of a shape.
nms_jit = jax.jit(nms_padded, static_argnames=STATIC)
batched_jit = jax.jit(batched_nms_padded, static_argnames=STATIC)


def clustered_boxes(rng, n, num_clusters=None, integer=False):
    """`(n, 4)` float32 boxes: jittered copies of a few base boxes, plus scores in [0, 1)."""
    num_clusters = num_clusters or max(1, n // 15)
    xy = rng.uniform(0, 600, (num_clusters, 2))
    wh = rng.uniform(10, 120, (num_clusters, 2))
    k = rng.integers(0, num_clusters, n)
    jitter = rng.normal(0, 0.15, (n, 4)) * np.concatenate([wh[k], wh[k]], 1)
    boxes = np.concatenate([xy[k], xy[k] + wh[k]], 1) + jitter
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    if integer:  # exact under torchvision's batched_nms coordinate offsets
        boxes = np.round(boxes)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return boxes.astype(np.float32), rng.random(n).astype(np.float32)


def torch_nms_padded(boxes, scores, valid, thr):
    """torchvision.ops.nms on the valid boxes, as indices into the padded arrays."""
    idx = np.flatnonzero(valid)
    keep = torchvision.ops.nms(torch.from_numpy(boxes[idx]), torch.from_numpy(scores[idx]), thr)
    return idx[keep.numpy()]


def torch_batched_nms_padded(boxes, scores, groups, valid, thr):
    """torchvision.ops.batched_nms on the valid boxes, as indices into the padded arrays."""
    idx = np.flatnonzero(valid)
    keep = torchvision.ops.batched_nms(torch.from_numpy(boxes[idx]), torch.from_numpy(scores[idx]),
                                       torch.from_numpy(groups[idx].astype(np.int64)), thr)
    return idx[keep.numpy()]


def assert_same(result, ref, max_output):
    """Exact kept indices and order, count, and -1 padding."""
    indices, count = (np.asarray(r) for r in result)
    assert indices.shape == (max_output,) and indices.dtype == np.int32
    expected = ref[:max_output]
    assert int(count) == len(expected)
    np.testing.assert_array_equal(indices[:len(expected)], expected)
    assert np.all(indices[len(expected):] == -1)


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision_with_padding(thr):
    rng = np.random.default_rng(1)
    boxes, scores = clustered_boxes(rng, 300)
    valid = rng.random(300) > 0.2
    ref = torch_nms_padded(boxes, scores, valid, thr)
    assert len(ref) < 0.85 * valid.sum()  # clustered: many suppressions
    assert_same(nms_jit(boxes, scores, valid, thr, max_output=300), ref, 300)


def test_extreme_thresholds():
    # Negative: every pair with IoU >= 0 suppresses (only the top box of each image survives);
    # >= 1: nothing is suppressed. Same shapes as above, so no new compilation.
    rng = np.random.default_rng(11)
    boxes, scores = clustered_boxes(rng, 300)
    valid = rng.random(300) > 0.2
    for thr in [-0.5, 1.0]:
        ref = torch_nms_padded(boxes, scores, valid, thr)
        assert len(ref) == (1 if thr < 0 else valid.sum())
        assert_same(nms_jit(boxes, scores, valid, thr, max_output=300), ref, 300)


@pytest.mark.parametrize("tile_size,block_size", [(8, 8), (8, 24), (16, 8), (512, 512)])
def test_results_do_not_depend_on_tiling(tile_size, block_size):
    # N=203 is not a multiple of any tile; small tiles/blocks give many cross-tile passes.
    rng = np.random.default_rng(2)
    boxes, scores = clustered_boxes(rng, 203, num_clusters=10)
    valid = rng.random(203) > 0.1
    ref = torch_nms_padded(boxes, scores, valid, 0.5)
    assert len(ref) < 0.6 * valid.sum()
    result = nms_jit(boxes, scores, valid, 0.5, max_output=203, tile_size=tile_size,
                     block_size=block_size)
    assert_same(result, ref, 203)


def test_nms_5000_boxes():
    rng = np.random.default_rng(3)
    boxes, scores = clustered_boxes(rng, 5000, num_clusters=400)
    valid = np.ones(5000, bool)
    ref = torch_nms_padded(boxes, scores, valid, 0.5)
    assert len(ref) < 0.6 * 5000
    assert_same(nms_jit(boxes, scores, valid, 0.5, max_output=5000), ref, 5000)
    # Early stop at max_output must give the prefix.
    assert_same(nms_jit(boxes, scores, valid, 0.5, max_output=1000), ref, 1000)


def test_max_output_smaller_and_larger_than_kept():
    rng = np.random.default_rng(4)
    boxes, scores = clustered_boxes(rng, 150)
    valid = rng.random(150) > 0.3
    ref = torch_nms_padded(boxes, scores, valid, 0.5)
    for max_output in [7, len(ref) - 1, 200]:
        assert_same(nms_jit(boxes, scores, valid, 0.5, max_output=max_output), ref, max_output)
    assert_same(nms_jit(boxes, scores, valid, 0.5, max_output=0), ref, 0)


def test_all_invalid_empty_and_single():
    rng = np.random.default_rng(5)
    boxes, scores = clustered_boxes(rng, 40)
    assert_same(nms_jit(boxes, scores, np.zeros(40, bool), 0.5, max_output=10), np.zeros(0, int), 10)
    empty = nms_jit(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), bool),
                    0.5, max_output=5)
    assert_same(empty, np.zeros(0, int), 5)
    one = boxes[:1], scores[:1]
    assert_same(nms_jit(*one, np.ones(1, bool), 0.5, max_output=3), np.array([0]), 3)
    assert_same(nms_jit(*one, np.zeros(1, bool), 0.5, max_output=3), np.zeros(0, int), 3)
    group = np.zeros(0, np.int32)
    empty_b = batched_jit(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), group,
                          np.zeros((0,), bool), 0.5, max_output=4)
    assert_same(empty_b, np.zeros(0, int), 4)


def test_invalid_boxes_never_suppress():
    # A high-scoring invalid duplicate must not remove the valid box it covers.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10]], np.float32)
    scores = np.array([0.9, 0.5, 0.4], np.float32)
    valid = np.array([False, True, True])
    assert_same(nms_jit(boxes, scores, valid, 0.5, max_output=3), np.array([1]), 3)
    assert_same(nms_jit(boxes, scores, np.ones(3, bool), 0.5, max_output=3), np.array([0]), 3)


def test_equal_scores_follow_index_order():
    rng = np.random.default_rng(6)
    boxes, _ = clustered_boxes(rng, 250)
    scores = (rng.integers(0, 4, 250) / 4).astype(np.float32)  # many exact ties
    valid = rng.random(250) > 0.1
    for thr in [0.3, 0.7]:
        ref = torch_nms_padded(boxes, scores, valid, thr)
        assert_same(nms_jit(boxes, scores, valid, thr, max_output=250, tile_size=32), ref, 250)
    # All scores equal: pure index order decides.
    flat = np.full(250, 0.5, np.float32)
    ref = torch_nms_padded(boxes, flat, valid, 0.5)
    assert_same(nms_jit(boxes, flat, valid, 0.5, max_output=250, tile_size=32), ref, 250)


def test_degenerate_boxes_and_threshold_boundary():
    rng = np.random.default_rng(7)
    boxes, scores = clustered_boxes(rng, 120)
    boxes[0:20, 2] = boxes[0:20, 0]          # zero width
    boxes[20:30, 3] = boxes[20:30, 1]        # zero height
    boxes[30:45, [0, 2]] = boxes[30:45, [2, 0]]  # inverted x (negative area)
    boxes[45:55] = boxes[45:55, [2, 3, 0, 1]]    # inverted x and y (positive area)
    boxes[55:60] = boxes[0]                  # identical zero-area boxes: 0/0 = NaN IoU
    boxes[60:65] = boxes[70]                 # identical boxes: IoU 1
    valid = np.ones(120, bool)
    for thr in [0.3, 0.5, 0.7]:
        ref = torch_nms_padded(boxes, scores, valid, thr)
        assert_same(nms_jit(boxes, scores, valid, thr, max_output=120), ref, 120)
    # IoU exactly 0.5 (inter 1, union 2) is not > 0.5: both kept; at 0.49 the second goes.
    pair = np.array([[0, 0, 2, 1], [0, 0, 1, 1]], np.float32)
    pair_scores = np.array([0.9, 0.8], np.float32)
    for thr, expected in [(0.5, [0, 1]), (0.49, [0])]:
        ref = torch_nms_padded(pair, pair_scores, np.ones(2, bool), thr)
        np.testing.assert_array_equal(ref, expected)
        assert_same(nms_jit(pair, pair_scores, np.ones(2, bool), thr, max_output=2), ref, 2)


def test_vmap_over_images_with_per_image_thresholds():
    rng = np.random.default_rng(8)
    data = [clustered_boxes(rng, 180) for _ in range(3)]
    boxes = np.stack([d[0] for d in data])
    scores = np.stack([d[1] for d in data])
    valid = rng.random((3, 180)) > 0.2
    valid[1] = False  # one image with nothing valid
    thrs = np.array([0.3, 0.5, 0.7], np.float32)
    fn = jax.jit(jax.vmap(lambda b, s, v, t: nms_padded(b, s, v, t, max_output=100)))
    indices, counts = fn(boxes, scores, valid, thrs)
    for i in range(3):
        ref = torch_nms_padded(boxes[i], scores[i], valid[i], float(thrs[i]))
        assert_same((indices[i], counts[i]), ref, 100)


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_batched_nms_matches_torchvision(thr):
    # Integer coordinates make torchvision's coordinate-offset trick (used for small N on CPU)
    # exact, so its result is the true per-group NMS.
    rng = np.random.default_rng(9)
    boxes, scores = clustered_boxes(rng, 300, num_clusters=15, integer=True)
    groups = rng.integers(0, 4, 300).astype(np.int32)
    valid = rng.random(300) > 0.2
    ref = torch_batched_nms_padded(boxes, scores, groups, valid, thr)
    assert len(ref) < valid.sum() - 20  # a fair number of in-group suppressions
    plain = torch_nms_padded(boxes, scores, valid, thr)
    assert len(ref) > len(plain)  # groups really stop cross-group suppression
    assert_same(batched_jit(boxes, scores, groups, valid, thr, max_output=300), ref, 300)
    assert_same(batched_jit(boxes, scores, groups, valid, thr, max_output=300, tile_size=16,
                            block_size=16), ref, 300)
    assert_same(batched_jit(boxes, scores, groups, valid, thr, max_output=50), ref, 50)


def test_batched_nms_large_and_ties_and_vmap():
    # N=1500 (numel > 4000) uses torchvision's per-class loop; float coordinates.
    rng = np.random.default_rng(10)
    boxes, scores = clustered_boxes(rng, 1500, num_clusters=60)
    groups = rng.integers(0, 5, 1500).astype(np.int32)
    valid = rng.random(1500) > 0.1
    ref = torch_batched_nms_padded(boxes, scores, groups, valid, 0.5)
    assert_same(batched_jit(boxes, scores, groups, valid, 0.5, max_output=1500), ref, 1500)
    # Ties across and within groups (coordinate-trick path: one stable nms).
    b2, _ = clustered_boxes(rng, 200, integer=True)
    s2 = (rng.integers(0, 3, 200) / 3).astype(np.float32)
    g2 = rng.integers(0, 3, 200).astype(np.int32)
    v2 = rng.random(200) > 0.1
    ref2 = torch_batched_nms_padded(b2, s2, g2, v2, 0.5)
    assert_same(batched_jit(b2, s2, g2, v2, 0.5, max_output=200), ref2, 200)
    # vmap: the same image twice with different groupings.
    g3 = np.stack([g2, np.zeros_like(g2)])
    fn = jax.jit(jax.vmap(lambda g: batched_nms_padded(b2, s2, g, v2, 0.5, max_output=200)))
    indices, counts = fn(g3)
    assert_same((indices[0], counts[0]), ref2, 200)
    assert_same((indices[1], counts[1]), torch_nms_padded(b2, s2, v2, 0.5), 200)


# The fixed-point in-tile pass (the GPU / TPU default, `default_settings`) run here on the CPU:
# the same exact results as the sequential one, on the data sets above that stress it most
# (long suppression chains, ties, degenerate boxes, groups, early stop, small tiles).
FIXED_POINT = dict(self_suppression="fixed_point")


@pytest.mark.parametrize("tile_size,block_size", [(16, 8), (512, 512)])
def test_fixed_point_pass_matches_torchvision(tile_size, block_size):
    tiling = dict(tile_size=tile_size, block_size=block_size, **FIXED_POINT)
    rng = np.random.default_rng(1)
    boxes, scores = clustered_boxes(rng, 300)
    valid = rng.random(300) > 0.2
    for thr in [-0.5, 0.3, 0.7, 1.0]:
        ref = torch_nms_padded(boxes, scores, valid, thr)
        assert_same(nms_jit(boxes, scores, valid, thr, max_output=300, **tiling), ref, 300)
        assert_same(nms_jit(boxes, scores, valid, thr, max_output=40, **tiling), ref, 40)
    boxes, scores = clustered_boxes(rng, 300)
    boxes[0:20, 2] = boxes[0:20, 0]          # zero width
    boxes[30:45, [0, 2]] = boxes[30:45, [2, 0]]  # inverted x
    boxes[55:60] = boxes[0]                  # identical zero-area boxes: NaN IoU
    boxes[60:65] = boxes[70]                 # identical boxes
    scores = (rng.integers(0, 4, 300) / 4).astype(np.float32)  # ties
    ref = torch_nms_padded(boxes, scores, valid, 0.5)
    assert len(ref) < 0.7 * valid.sum()
    assert_same(nms_jit(boxes, scores, valid, 0.5, max_output=300, **tiling), ref, 300)
    # Groups (integer coordinates: torchvision's offset trick exact).
    boxes, scores = clustered_boxes(rng, 300, num_clusters=15, integer=True)
    groups = rng.integers(0, 4, 300).astype(np.int32)
    ref = torch_batched_nms_padded(boxes, scores, groups, valid, 0.5)
    assert_same(batched_jit(boxes, scores, groups, valid, 0.5, max_output=300, **tiling), ref, 300)


def test_fixed_point_pass_5000_boxes():
    rng = np.random.default_rng(3)
    boxes, scores = clustered_boxes(rng, 5000, num_clusters=400)
    valid = np.ones(5000, bool)
    ref = torch_nms_padded(boxes, scores, valid, 0.5)
    assert_same(nms_jit(boxes, scores, valid, 0.5, max_output=1000, tile_size=512,
                        block_size=512, **FIXED_POINT), ref, 1000)


def test_default_settings_by_backend():
    assert default_settings("cpu") == ("sequential", 64, 256)
    assert default_settings("gpu") == default_settings("tpu") == ("fixed_point", 512, 512)
    assert default_settings() == default_settings(jax.default_backend())
    with pytest.raises(ValueError, match="self_suppression"):
        nms_jit(*clustered_boxes(np.random.default_rng(0), 8), np.ones(8, bool), 0.5,
                max_output=8, self_suppression="parallel")
