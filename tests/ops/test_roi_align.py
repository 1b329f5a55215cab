"""RoIAlign, FPN level mapping and multilevel RoIAlign vs torchvision and a NumPy C++ transcription.

References:
* `torchvision.ops.roi_align` (NCHW, rois with a batch index): torchvision's compiled C++ CPU
  kernel and its backward, including the zeroing of samples more than one pixel outside the map;
* `numpy_roi_align`: a float64 loop transcribing torchvision/csrc/ops/cpu/roi_align_kernel.cpp
  (coordinates in float32 as the kernel's `T = float`), an independent second reference;
* torchvision autograd for gradients, `MultiScaleRoIAlign` and `LevelMapper` for the pyramid.

Tolerance: 1e-5 absolute on values of O(1) (float32 summation order differs).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align
from torchvision.ops.poolers import initLevelMapper

from maskrcnn_jax.ops.roi_align import (
    infer_level_scales,
    map_boxes_to_levels,
    multilevel_roi_align,
    roi_align,
)
from maskrcnn_jax.testing.references import numpy_roi_align

ATOL = 1e-5
_STATIC = ("output_size", "spatial_scale", "sampling_ratio", "aligned", "max_sampling_grid")
roi_align_jit = jax.jit(roi_align, static_argnames=_STATIC)
multilevel_jit = jax.jit(
    multilevel_roi_align,
    static_argnames=("output_size", "scales", "sampling_ratio", "aligned", "max_sampling_grid"),
)


def torchvision_roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned):
    """torchvision.ops.roi_align on channel-last numpy inputs -> (R, oh, ow, C) numpy."""
    feats = torch.from_numpy(np.ascontiguousarray(features.transpose(2, 0, 1))[None])
    rois = torch.from_numpy(np.concatenate([np.zeros((len(boxes), 1), np.float32), boxes], 1))
    out = tv_roi_align(feats, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return out.numpy().transpose(0, 2, 3, 1)


def adaptive_grid_bound(boxes, output_size, spatial_scale, aligned):
    """Largest adaptive grid any box needs (so the static bound is exact)."""
    size = (boxes[:, 2:] - boxes[:, :2]) * spatial_scale
    if not aligned:
        size = np.maximum(size, 1.0)
    return int(max(np.ceil(size[:, 1] / output_size[0]).max(), np.ceil(size[:, 0] / output_size[1]).max(), 1))


def boxes_in_sample_range(rng, n, height, width, spatial_scale):
    """Boxes whose samples all stay inside [-1, size]: partly outside the map (down to -0.5 px),
    zero-size and inverted ones included."""
    lo = -0.5 / spatial_scale
    x = rng.uniform(lo, (width - 1) / spatial_scale, (n, 2))
    y = rng.uniform(lo, (height - 1) / spatial_scale, (n, 2))
    boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1)
    half = n // 2  # the first half well-formed (sorted), the rest possibly inverted
    boxes[:half] = np.concatenate([np.minimum(boxes[:half, :2], boxes[:half, 2:]),
                                   np.maximum(boxes[:half, :2], boxes[:half, 2:])], 1)
    boxes[0, 2] = boxes[0, 0]  # zero width
    boxes[1, 3] = boxes[1, 1]  # zero height
    boxes[2, 2:] = boxes[2, :2]  # a point
    return boxes.astype(np.float32)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, -1, 0])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.25, 1 / 16])
def test_roi_align_matches_torchvision(aligned, sampling_ratio, spatial_scale):
    rng = np.random.default_rng(hash((aligned, sampling_ratio, spatial_scale)) % 2**32)
    height, width, channels, output_size = 13, 19, 3, (5, 4)
    features = rng.standard_normal((height, width, channels)).astype(np.float32)
    boxes = boxes_in_sample_range(rng, 40, height, width, spatial_scale)
    grid = adaptive_grid_bound(boxes, output_size, spatial_scale, aligned) if sampling_ratio <= 0 else None
    got = roi_align_jit(jnp.asarray(features), jnp.asarray(boxes), output_size=output_size,
                        spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned,
                        max_sampling_grid=grid)
    # torchvision's C++ kernel cannot take an aligned RoI inverted in exactly one axis with the
    # adaptive grid (its sample count is then negative: "cannot create std::vector larger than
    # max_size()"); those rows come from the NumPy transcription of the same kernel.
    inverted = (boxes[:, 2] < boxes[:, 0]) != (boxes[:, 3] < boxes[:, 1])
    numpy_rows = inverted if (aligned and sampling_ratio <= 0) else np.zeros(len(boxes), bool)
    want = np.zeros(np.shape(got), np.float32)
    want[~numpy_rows] = torchvision_roi_align(features, boxes[~numpy_rows], output_size,
                                              spatial_scale, sampling_ratio, aligned)
    if numpy_rows.any():
        want[numpy_rows] = numpy_roi_align(features, boxes[numpy_rows], output_size,
                                           spatial_scale, sampling_ratio, aligned)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=ATOL)
    assert np.abs(want).max() > 0.5  # the comparison is not vacuous


def test_numpy_reference_matches_torchvision():
    """The NumPy transcription agrees with torchvision where both apply (validates the oracle)."""
    rng = np.random.default_rng(1)
    features = rng.standard_normal((9, 11, 2)).astype(np.float32)
    boxes = boxes_in_sample_range(rng, 12, 9, 11, 0.5)
    # Not the RoIs inverted in one axis, which the C++ kernel rejects when aligned (see above).
    boxes = boxes[(boxes[:, 2] < boxes[:, 0]) == (boxes[:, 3] < boxes[:, 1])]
    for aligned in (False, True):
        want = torchvision_roi_align(features, boxes, (3, 3), 0.5, -1, aligned)
        got = numpy_roi_align(features, boxes, (3, 3), 0.5, -1, aligned)
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_far_outside_matches_cpp_semantics(aligned, sampling_ratio):
    rng = np.random.default_rng(7 + aligned + 2 * sampling_ratio)
    height, width, channels, output_size, scale = 10, 14, 2, (4, 3), 0.5
    features = rng.standard_normal((height, width, channels)).astype(np.float32)
    # Coordinates from far before to far beyond the map (in image pixels, map * 2).
    xy = rng.uniform(-3 * width, 4 * width, (30, 2))
    wh = rng.uniform(0, 2.5 * width, (30, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    boxes[:5, 2:] = boxes[:5, :2] - 3.0  # inverted
    boxes[5:8] = [[-40, -40, 3, 3], [20, 10, 60, 60], [-3.9, 5, 30, 18.5]]  # straddling the map
    grid = adaptive_grid_bound(boxes, output_size, scale, aligned) if sampling_ratio <= 0 else None
    got = roi_align_jit(jnp.asarray(features), jnp.asarray(boxes), output_size=output_size,
                        spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=aligned,
                        max_sampling_grid=grid)
    want = torchvision_roi_align(features, boxes, output_size, scale, sampling_ratio, aligned)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=ATOL)
    np.testing.assert_allclose(
        numpy_roi_align(features, boxes, output_size, scale, sampling_ratio, aligned), want,
        rtol=0, atol=ATOL)
    # Not vacuous: some RoIs lie wholly outside (all samples zeroed), others see the map.
    per_roi = np.abs(want).reshape(len(boxes), -1).max(1)
    assert (per_roi == 0).sum() >= 3 and (per_roi > 0).sum() >= 5, per_roi


@pytest.mark.parametrize("aligned,sampling_ratio", [(False, 2), (True, -1)])
def test_roi_align_gradient_matches_torchvision(aligned, sampling_ratio):
    rng = np.random.default_rng(3)
    height, width, channels, output_size, scale = 12, 15, 3, (4, 4), 0.5
    features = rng.standard_normal((height, width, channels)).astype(np.float32)
    boxes = boxes_in_sample_range(rng, 25, height, width, scale)
    if aligned:
        # torchvision's C++ kernel rejects aligned RoIs inverted in exactly one axis with the
        # adaptive grid (a negative sample count); our forward for them is covered above.
        boxes = boxes[(boxes[:, 2] < boxes[:, 0]) == (boxes[:, 3] < boxes[:, 1])]
        boxes = np.concatenate([boxes] * 2)[:25]
    cotangent = rng.standard_normal((25,) + output_size + (channels,)).astype(np.float32)
    grid = adaptive_grid_bound(boxes, output_size, scale, aligned) if sampling_ratio <= 0 else None

    def loss(f):
        out = roi_align(f, jnp.asarray(boxes), output_size, scale, sampling_ratio, aligned, grid)
        return jnp.sum(out * cotangent)

    got = jax.jit(jax.grad(loss))(jnp.asarray(features))
    feats = torch.from_numpy(np.ascontiguousarray(features.transpose(2, 0, 1))[None]).requires_grad_()
    rois = torch.from_numpy(np.concatenate([np.zeros((25, 1), np.float32), boxes], 1))
    out = tv_roi_align(feats, rois, output_size, scale, sampling_ratio, aligned)
    (out * torch.from_numpy(cotangent.transpose(0, 3, 1, 2))).sum().backward()
    want = feats.grad[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=ATOL)
    assert np.abs(want).max() > 0.5


def test_roi_align_bf16_features_computed_in_float32():
    rng = np.random.default_rng(4)
    features = rng.standard_normal((16, 16, 8)).astype(np.float32)
    boxes = boxes_in_sample_range(rng, 20, 16, 16, 1.0)
    f_bf16 = jnp.asarray(features, jnp.bfloat16)
    got = roi_align_jit(f_bf16, jnp.asarray(boxes), output_size=(3, 3), spatial_scale=1.0,
                        sampling_ratio=2, aligned=False, max_sampling_grid=None)
    assert got.dtype == jnp.bfloat16
    want = torchvision_roi_align(np.asarray(f_bf16.astype(jnp.float32)), boxes, (3, 3), 1.0, 2, False)
    # Only the final rounding to bf16 (8 mantissa bits) differs from a float32 computation.
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2**-8, atol=1e-6)


def test_adaptive_grid_beyond_bound_is_clamped():
    """A RoI needing a larger grid than the bound is averaged over the bounded grid."""
    rng = np.random.default_rng(5)
    features = rng.standard_normal((20, 20, 2)).astype(np.float32)
    boxes = np.array([[0.0, 0.0, 19.0, 19.0]], np.float32)  # grid ceil(19 / 2) = 10 per axis
    got = roi_align_jit(jnp.asarray(features), jnp.asarray(boxes), output_size=(2, 2),
                        spatial_scale=1.0, sampling_ratio=0, aligned=False, max_sampling_grid=3)
    want = torchvision_roi_align(features, boxes, (2, 2), 1.0, 3, False)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=ATOL)


def test_roi_align_jit_vmap_and_empty():
    rng = np.random.default_rng(6)
    features = rng.standard_normal((2, 10, 12, 3)).astype(np.float32)
    boxes = np.stack([boxes_in_sample_range(rng, 7, 10, 12, 1.0) for _ in range(2)])
    batched = jax.jit(jax.vmap(lambda f, b: roi_align(f, b, (3, 3), 1.0, 2, True)))
    got = batched(jnp.asarray(features), jnp.asarray(boxes))
    for i in range(2):
        want = torchvision_roi_align(features[i], boxes[i], (3, 3), 1.0, 2, True)
        np.testing.assert_allclose(np.asarray(got[i]), want, rtol=0, atol=ATOL)
    empty = roi_align_jit(jnp.asarray(features[0]), jnp.zeros((0, 4)), output_size=(3, 3),
                          spatial_scale=1.0, sampling_ratio=2, aligned=False, max_sampling_grid=None)
    assert empty.shape == (0, 3, 3, 3)
    feats = [jnp.asarray(features[0]), jnp.asarray(features[0][::2, ::2])]
    empty = multilevel_jit(feats, jnp.zeros((0, 4)), output_size=(2, 2), scales=(0.25, 0.125))
    assert empty.shape == (0, 2, 2, 3)


def test_map_boxes_to_levels_matches_level_mapper():
    rng = np.random.default_rng(8)
    xy = rng.uniform(0, 500, (300, 2))
    wh = np.exp(rng.uniform(np.log(1), np.log(1500), (300, 2)))
    boxes = np.concatenate([xy, xy + wh], 1)
    # Squares exactly on and next to the level boundaries (sqrt(area) = 224 * 2**k), zero area.
    sides = [s * f for s in (28.0, 56.0, 112.0, 224.0, 448.0, 896.0) for f in (1.0, 1 - 1e-6, 1 + 1e-6, 1 - 1e-3)]
    special = [[10.0, 20.0, 10.0 + s, 20.0 + s] for s in sides] + [[5, 5, 5, 9], [3, 3, 3, 3]]
    boxes = np.concatenate([boxes, np.array(special)]).astype(np.float32)
    for k_min, k_max in [(2, 5), (3, 4)]:
        want = initLevelMapper(k_min, k_max)([torch.from_numpy(boxes)]).numpy()
        got = jax.jit(map_boxes_to_levels, static_argnums=(1, 2))(jnp.asarray(boxes), k_min, k_max)
        np.testing.assert_array_equal(np.asarray(got), want)
        assert len(np.unique(want)) == k_max - k_min + 1


@pytest.fixture(scope="module")
def pyramid():
    """A 4-level pyramid of a 512x768 canvas (8 channels) and boxes of all levels' sizes."""
    rng = np.random.default_rng(9)
    canvas = (512, 768)
    shapes = [(canvas[0] // s, canvas[1] // s) for s in (4, 8, 16, 32)]
    feats = [rng.standard_normal(shape + (8,)).astype(np.float32) for shape in shapes]
    xy = rng.uniform(0, [canvas[1] - 20, canvas[0] - 20], (120, 2))
    wh = np.exp(rng.uniform(np.log(4), np.log(700), (120, 2)))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [canvas[1], canvas[0]])], 1).astype(np.float32)
    boxes[:3] = [[10, 10, 700, 500], [50.5, 0, 768, 512], [0, 30, 600, 470]]  # level 5 (k_max)
    return canvas, feats, boxes


def jit_rounding_atol(feats):
    """Bound on differences from XLA:CPU's FMA contraction / reciprocal division (even op by op:
    vectorised division by a constant uses a reciprocal), which the C++ kernel does not do.

    Sample coordinates move by at most a couple of float32 ulps of the largest coordinate (the
    map extent); an interpolated value then moves by at most that times the largest difference
    between neighbouring pixels, once per axis.
    """
    extent = max(max(f.shape[:2]) for f in feats)
    slope = max(max(np.abs(np.diff(f, axis=0)).max(), np.abs(np.diff(f, axis=1)).max()) for f in feats)
    return ATOL + 2 * (2 * float(np.spacing(np.float32(extent)))) * float(slope)


@pytest.mark.parametrize("output_size", [(7, 7), (14, 14)])
def test_multilevel_roi_align_matches_multiscale_roi_align(pyramid, output_size):
    canvas, feats, boxes = pyramid
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, sampling_ratio=2)
    tfeats = {str(i): torch.from_numpy(np.ascontiguousarray(f.transpose(2, 0, 1))[None])
              for i, f in enumerate(feats)}
    want = pooler(tfeats, [torch.from_numpy(boxes)], [canvas]).numpy().transpose(0, 2, 3, 1)
    scales = infer_level_scales([f.shape[:2] for f in feats], canvas)
    assert scales == tuple(pooler.scales)
    got = multilevel_jit([jnp.asarray(f) for f in feats], jnp.asarray(boxes),
                         output_size=output_size, scales=scales)
    # Level-0 coordinates reach ~190 here, so XLA:CPU's ulp-level coordinate rounding shows.
    atol = jit_rounding_atol(feats)
    err = np.abs(np.asarray(got) - want).max()
    assert err <= atol, (err, atol)
    print(f"multilevel {output_size}: max abs error {err:.2e} (bound {atol:.2e})")
    levels = pooler.map_levels([torch.from_numpy(boxes)]).numpy()
    assert len(np.unique(levels)) == 4  # every level is exercised


def test_multilevel_roi_align_vmap_over_images(pyramid):
    canvas, feats, boxes = pyramid
    feats2 = [np.stack([f, -2.0 * f]) for f in feats]
    boxes2 = np.stack([boxes[:40], boxes[40:80]])
    scales = (0.25, 0.125, 0.0625, 0.03125)
    fn = jax.jit(jax.vmap(lambda f, b: multilevel_roi_align(f, b, (5, 5), scales, sampling_ratio=2)))
    got = fn([jnp.asarray(f) for f in feats2], jnp.asarray(boxes2))
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], (5, 5), sampling_ratio=2)
    tfeats = {str(i): torch.from_numpy(np.ascontiguousarray(f.transpose(0, 3, 1, 2))) for i, f in enumerate(feats2)}
    want = pooler(tfeats, [torch.from_numpy(b) for b in boxes2], [canvas, canvas]).numpy()
    want = want.transpose(0, 2, 3, 1).reshape(2, 40, 5, 5, 8)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2 * jit_rounding_atol(feats))


def test_multilevel_valid_sizes_equal_cropped_maps():
    """A canvas larger than the valid extent pools exactly as the cropped maps would."""
    from maskrcnn_jax.ops.roi_align import multilevel_roi_align

    rng = np.random.default_rng(7)
    canvas, valid = (96, 128), (64, 96)
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    feats = [rng.standard_normal((canvas[0] // int(1 / s), canvas[1] // int(1 / s), 8)).astype(np.float32)
             for s in scales]
    xy = rng.uniform(-10, [valid[1], valid[0]], (40, 2))
    wh = rng.uniform(2, 80, (40, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    sizes = np.array([[valid[0] // int(1 / s), valid[1] // int(1 / s)] for s in scales], np.int32)
    ours = jax.jit(lambda f, b, v: multilevel_roi_align(f, b, (7, 7), scales, valid_sizes=v))(
        feats, boxes, sizes)
    cropped = [f[:h, :w] for f, (h, w) in zip(feats, sizes)]
    expected = jax.jit(lambda f, b: multilevel_roi_align(f, b, (7, 7), scales))(cropped, boxes)
    # Same arithmetic; only XLA's fusion (FMA) of the two programs may differ.
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), atol=1e-5, rtol=0)
