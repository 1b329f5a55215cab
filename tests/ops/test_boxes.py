"""maskrcnn_jax.ops.boxes against torchvision's box ops and BoxCoder.

XLA on CPU contracts `a * b + c` into fused multiply-adds, rewrites division by a constant as
multiplication by its reciprocal, and uses its own exp/log; torch does none of these. Results
therefore agree with torchvision bit-for-bit where no such op is involved (area, clipping,
size mask) and otherwise to within 1e-6 relative to the magnitude of the operands that were
summed (a couple of float32 ulps), which is what `assert_close_to_scale` checks.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_area as tv_box_area
from torchvision.ops import box_iou as tv_box_iou
from torchvision.ops import clip_boxes_to_image, remove_small_boxes

from maskrcnn_jax.ops.boxes import (
    DEFAULT_BBOX_XFORM_CLIP,
    box_area,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    small_box_mask,
)

RTOL = 1e-6  # relative to the operands' magnitude: float32 op-order differences only
WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]


def random_boxes(rng, n, span=600.0, max_size=250.0, kinds=True):
    """float32 boxes incl. zero-area, inverted and beyond-the-image ones when `kinds`."""
    xy = rng.uniform(-0.2 * span, span, (n, 2))
    wh = rng.uniform(0.5, max_size, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    if kinds and n >= 8:
        kind = rng.integers(0, 4, n)
        boxes[kind == 1, 2] = boxes[kind == 1, 0]  # zero width
        boxes[kind == 2, 3] = boxes[kind == 2, 1]  # zero height
        inverted = kind == 3
        boxes[inverted, 0], boxes[inverted, 2] = boxes[inverted, 2].copy(), boxes[inverted, 0].copy()
    return boxes.astype(np.float32)


def positive_boxes(rng, n, span=600.0):
    """float32 boxes with strictly positive width and height (valid encode/decode references)."""
    xy = rng.uniform(-50.0, span, (n, 2))
    wh = rng.uniform(1.0, 300.0, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def assert_close_to_scale(actual, expected, scale, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(actual[~finite & ~np.isnan(expected)], expected[~finite & ~np.isnan(expected)])
    err = np.abs(actual[finite].astype(np.float64) - expected[finite])
    bound = rtol * np.broadcast_to(scale, expected.shape)[finite]
    worst = np.argmax(err - bound) if err.size else 0
    assert np.all(err <= bound), f"err {err[worst]} > bound {bound[worst]}"


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


iou_jit = jax.jit(box_iou)
decode_jit = jax.jit(decode_boxes, static_argnames=("weights", "bbox_xform_clip"))
encode_jit = jax.jit(encode_boxes, static_argnames=("weights",))


def test_box_area_exact(rng):
    boxes = random_boxes(rng, 500)
    expected = tv_box_area(torch.from_numpy(boxes)).numpy()
    np.testing.assert_array_equal(np.asarray(jax.jit(box_area)(boxes)), expected)
    assert (expected < 0).any() and (expected == 0).any()  # inverted / empty boxes were covered
    batched = boxes.reshape(5, 100, 4)
    np.testing.assert_array_equal(np.asarray(jax.vmap(box_area)(batched)), expected.reshape(5, 100))


def test_box_iou_matches_torchvision(rng):
    b1, b2 = random_boxes(rng, 300), random_boxes(rng, 200)
    expected = tv_box_iou(torch.from_numpy(b1), torch.from_numpy(b2)).numpy()
    actual = np.asarray(iou_jit(b1, b2))
    area1, area2 = np.abs(tv_box_area(torch.from_numpy(b1)).numpy()), np.abs(tv_box_area(torch.from_numpy(b2)).numpy())
    with np.errstate(invalid="ignore", divide="ignore"):
        lt = np.maximum(b1[:, None, :2], b2[None, :, :2])
        rb = np.minimum(b1[:, None, 2:], b2[None, :, 2:])
        wh = np.clip(rb - lt, 0, None)
        inter = wh[..., 0] * wh[..., 1]
        union = area1[:, None] + area2[None, :] - inter
        # IoU error from one differently rounded union: |iou| * (|a1| + |a2| + inter) / |union|
        scale = np.abs(expected) * (area1[:, None] + area2[None, :] + inter) / np.abs(union)
    assert_close_to_scale(actual, expected, np.nan_to_num(scale, posinf=0.0))
    assert np.isnan(expected).any() and (expected > 0.1).any()  # 0/0 pairs and real overlaps covered


def test_box_iou_integer_boxes_exact(rng):
    # Integer coordinates make every intermediate exact, so fused or not the result is identical.
    b1 = np.sort(rng.integers(0, 200, (60, 2, 2)), axis=1).transpose(0, 2, 1).reshape(60, 4).astype(np.float32)
    b2 = np.sort(rng.integers(0, 200, (70, 2, 2)), axis=1).transpose(0, 2, 1).reshape(70, 4).astype(np.float32)
    expected = tv_box_iou(torch.from_numpy(b1), torch.from_numpy(b2)).numpy()
    np.testing.assert_array_equal(np.asarray(iou_jit(b1, b2)), expected)


def test_box_iou_padding_and_empty(rng):
    b1, b2 = random_boxes(rng, 40, kinds=False), random_boxes(rng, 30, kinds=False)
    v1, v2 = rng.random(40) < 0.7, rng.random(30) < 0.6
    full = np.asarray(iou_jit(b1, b2))
    padded = np.asarray(iou_jit(b1, b2, v1, v2))
    pair_valid = v1[:, None] & v2[None, :]
    np.testing.assert_array_equal(padded[pair_valid], full[pair_valid])
    np.testing.assert_array_equal(padded[~pair_valid], -1.0)
    # one-sided masks
    np.testing.assert_array_equal(np.asarray(box_iou(b1, b2, valid1=v1))[~v1], -1.0)
    np.testing.assert_array_equal(np.asarray(box_iou(b1, b2, valid2=v2))[:, ~v2], -1.0)
    # N == 0 / M == 0
    empty = np.zeros((0, 4), np.float32)
    assert np.asarray(iou_jit(empty, b2)).shape == (0, 30)
    assert np.asarray(iou_jit(b1, empty, v1, np.zeros((0,), bool))).shape == (40, 0)
    assert np.asarray(iou_jit(empty, empty)).shape == (0, 0)


def test_box_iou_vmap(rng):
    b1 = np.stack([random_boxes(rng, 20, kinds=False) for _ in range(3)])
    b2 = np.stack([random_boxes(rng, 25, kinds=False) for _ in range(3)])
    v1 = rng.random((3, 20)) < 0.8
    v2 = rng.random((3, 25)) < 0.8
    batched = np.asarray(jax.jit(jax.vmap(box_iou))(b1, b2, v1, v2))
    for i in range(3):
        np.testing.assert_array_equal(batched[i], np.asarray(iou_jit(b1[i], b2[i], v1[i], v2[i])))


def test_clip_boxes_exact_with_traced_sizes(rng):
    boxes = random_boxes(rng, 400, span=900.0)
    sizes = [(480, 640), (800, 1333), (333, 517)]
    clip_jit = jax.jit(clip_boxes)
    for h, w in sizes:
        expected = clip_boxes_to_image(torch.from_numpy(boxes), (h, w)).numpy()
        np.testing.assert_array_equal(np.asarray(clip_jit(boxes, (h, w))), expected)
        np.testing.assert_array_equal(np.asarray(clip_boxes(boxes, (h, w))), expected)
    # image sizes vary per image inside one jitted, vmapped call
    hs = jnp.array([s[0] for s in sizes], jnp.int32)
    ws = jnp.array([s[1] for s in sizes], jnp.int32)
    batched = jax.jit(jax.vmap(lambda b, h, w: clip_boxes(b, (h, w)), in_axes=(None, 0, 0)))(boxes, hs, ws)
    for i, (h, w) in enumerate(sizes):
        expected = clip_boxes_to_image(torch.from_numpy(boxes), (h, w)).numpy()
        np.testing.assert_array_equal(np.asarray(batched[i]), expected)
        assert (expected != boxes).any()
    # leading dims, e.g. (N, K, 4) class-specific boxes
    nk = boxes.reshape(100, 4, 4)
    expected = clip_boxes_to_image(torch.from_numpy(nk), (480, 640)).numpy()
    np.testing.assert_array_equal(np.asarray(clip_jit(nk, (480, 640))), expected)


@pytest.mark.parametrize("min_size", [1e-3, 1.0, 7.5])
def test_small_box_mask_matches_remove_small_boxes(rng, min_size):
    boxes = random_boxes(rng, 300, max_size=15.0)
    expected = remove_small_boxes(torch.from_numpy(boxes), min_size).numpy()
    mask = np.asarray(jax.jit(small_box_mask)(boxes, min_size))
    np.testing.assert_array_equal(np.nonzero(mask)[0], expected)
    assert 0 < mask.sum() < len(boxes)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_matches_boxcoder(rng, weights):
    gt = positive_boxes(rng, 2000)
    proposals = positive_boxes(rng, 2000)
    proposals[:5] = gt[:5]  # identical boxes: zero targets
    expected = BoxCoder(weights).encode_single(torch.from_numpy(gt), torch.from_numpy(proposals)).numpy()
    actual = np.asarray(encode_jit(gt, proposals, weights=weights))
    wx, wy, ww, wh = weights
    pw, ph = proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1]
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    # dx = wx*(gt_ctr - ex_ctr)/pw: the centres' own magnitudes bound the rounding differences.
    sx = wx * (np.abs(gt[:, 0]) + gw + np.abs(proposals[:, 0]) + pw) / pw
    sy = wy * (np.abs(gt[:, 1]) + gh + np.abs(proposals[:, 1]) + ph) / ph
    sw = ww * (np.abs(np.log(gw / pw)) + 1e-7)  # log has ulp-level relative error
    sh = wh * (np.abs(np.log(gh / ph)) + 1e-7)
    assert_close_to_scale(actual, expected, np.stack([sx, sy, sw, sh], 1))
    np.testing.assert_array_equal(actual[:5], 0.0)


def _decode_scale(deltas, boxes, weights):
    """Magnitude of the summed operands of each decoded coordinate (float64)."""
    n = boxes.shape[0]
    d = deltas.reshape(n, -1, 4).astype(np.float64) / np.asarray(weights)
    d[..., 2:] = np.minimum(d[..., 2:], DEFAULT_BBOX_XFORM_CLIP)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    sx = np.abs(d[..., 0] * w[:, None]) + np.abs(cx)[:, None] + 0.5 * np.exp(d[..., 2]) * w[:, None]
    sy = np.abs(d[..., 1] * h[:, None]) + np.abs(cy)[:, None] + 0.5 * np.exp(d[..., 3]) * h[:, None]
    return np.stack([sx, sy, sx, sy], -1)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decode_matches_boxcoder_class_specific(rng, weights):
    n, k = 500, 91
    boxes = positive_boxes(rng, n)
    deltas = (rng.normal(size=(n, 4 * k)) * 3.0).astype(np.float32)
    # huge and infinite log-size deltas hit the bbox_xform_clip clamp
    deltas[:50, 2::4] = 100.0 * weights[2]
    deltas[50:60, 3::4] = np.inf
    deltas[60:70, 2::4] = -np.inf
    expected = BoxCoder(weights).decode_single(torch.from_numpy(deltas), torch.from_numpy(boxes)).numpy()
    expected = expected.reshape(n, k, 4)
    actual = np.asarray(decode_jit(deltas, boxes, weights=weights))
    assert actual.shape == (n, k, 4)
    assert_close_to_scale(actual, expected, _decode_scale(deltas, boxes, weights))
    # clamp: a huge dw gives exactly the box at dw = clip
    clipped = deltas[:50].copy()
    clipped[:, 2::4] = DEFAULT_BBOX_XFORM_CLIP * weights[2]
    np.testing.assert_array_equal(actual[:50], np.asarray(decode_jit(clipped, boxes[:50], weights=weights)))
    np.testing.assert_array_equal(actual[60:70, :, 0], actual[60:70, :, 2])  # zero width


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decode_single_class_and_vmap(rng, weights):
    boxes = positive_boxes(rng, 300)
    deltas = (rng.normal(size=(300, 4)) * 2.0).astype(np.float32)
    expected = BoxCoder(weights).decode_single(torch.from_numpy(deltas), torch.from_numpy(boxes)).numpy()
    actual = np.asarray(decode_jit(deltas, boxes, weights=weights))
    assert actual.shape == (300, 4)
    assert_close_to_scale(actual, expected, _decode_scale(deltas, boxes, weights)[:, 0])
    # batch via vmap equals the per-image calls
    fn = jax.jit(jax.vmap(lambda d, b: decode_boxes(d, b, weights)))
    batched = np.asarray(fn(deltas.reshape(3, 100, 4), boxes.reshape(3, 100, 4)))
    np.testing.assert_array_equal(batched.reshape(300, 4), actual)
    # and encode under vmap
    enc = jax.jit(jax.vmap(lambda g, p: encode_boxes(g, p, weights)))
    targets = np.asarray(enc(boxes.reshape(3, 100, 4), boxes[::-1].reshape(3, 100, 4)))
    np.testing.assert_array_equal(targets.reshape(300, 4), np.asarray(encode_jit(boxes, boxes[::-1], weights=weights)))


@pytest.mark.parametrize("weights", WEIGHTS)
def test_round_trip(rng, weights):
    gt = positive_boxes(rng, 1000)
    proposals = positive_boxes(rng, 1000)
    deltas = encode_jit(gt, proposals, weights=weights)
    # keep within the clamp so the round trip is the identity
    keep = np.all(np.abs(np.asarray(deltas)[:, 2:]) / np.asarray(weights[2:]) < DEFAULT_BBOX_XFORM_CLIP, axis=1)
    assert keep.mean() > 0.95
    back = np.asarray(decode_jit(deltas, proposals, weights=weights))[keep]
    # float32 round trip through ctr/size arithmetic: a few ulps of the coordinates' magnitude
    g = gt[keep]
    scale = np.abs(g) + np.abs(proposals[keep]) + (g[:, 2:] - g[:, :2]).repeat(2, axis=1)
    assert_close_to_scale(back, g, scale, rtol=1e-6)
    # torchvision's own round trip has errors of the same order
    tv = BoxCoder(weights)
    tv_back = tv.decode_single(tv.encode_single(torch.from_numpy(gt), torch.from_numpy(proposals)), torch.from_numpy(proposals)).numpy()[keep]
    assert_close_to_scale(tv_back, g, scale, rtol=1e-6)
