"""maskrcnn_jax.ops.anchors (the anchors the model runs) against torchvision's AnchorGenerator,
exact equality."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from maskrcnn_jax.models.maskrcnn import FPN_LEVELS
from maskrcnn_jax.ops.anchors import (
    DEFAULT_ASPECT_RATIOS,
    DEFAULT_SIZES,
    anchors_for_image,
    base_anchors,
    level_anchors_for_image,
    multilevel_anchors_for_image,
)

TORCHVISION_SIZES = ((32,), (64,), (128,), (256,), (512,))
TORCHVISION_RATIOS = ((0.5, 1.0, 2.0),) * 5


def padded(size, divisor=32):
    return tuple(int(math.ceil(s / divisor) * divisor) for s in size)


def feature_sizes(canvas, levels=FPN_LEVELS):
    """`ceil(canvas / 2**k)`: what the stride-2 convolutions and the P6 max pool compute."""
    return [tuple(int(math.ceil(s / 2**k)) for s in canvas) for k in levels]


def torchvision_anchors(image_size, sizes=TORCHVISION_SIZES, ratios=TORCHVISION_RATIOS,
                        levels=FPN_LEVELS):
    """torchvision's anchors of one image alone: an ImageList of it padded to 32 and feature
    maps `ceil(padded / 2**k)`."""
    pad = padded(image_size)
    images = ImageList(torch.zeros(1, 3, *pad), [tuple(image_size)])
    features = [torch.zeros(1, 1, h, w) for h, w in feature_sizes(pad, levels)]
    (anchors,) = AnchorGenerator(sizes, ratios)(images, features)
    return anchors.numpy()


def test_defaults_are_torchvisions():
    assert DEFAULT_SIZES == TORCHVISION_SIZES
    assert DEFAULT_ASPECT_RATIOS == TORCHVISION_RATIOS


IMAGE_SIZES = [
    (800, 1333),  # COCO-sized: padded 800x1344, P6 13x21 so its y stride is 800 // 13 = 61
    (800, 1216),  # odd P5 (25x38)
    (512, 512),
    (333, 517),  # padded 352x544: P6 6x9, strides 58 and 60
    (600, 401),
    (97, 130),
]


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_anchors_for_image_equal_torchvision(image_size):
    pad = padded(image_size)
    expected = torchvision_anchors(image_size)
    anchors, valid = jax.jit(lambda p: anchors_for_image(feature_sizes(pad), FPN_LEVELS, p))(
        jnp.asarray(pad, jnp.int32))
    anchors, valid = np.asarray(anchors), np.asarray(valid)
    assert anchors.dtype == np.float32 and valid.dtype == bool
    assert valid.all()
    np.testing.assert_array_equal(anchors, expected)


@pytest.mark.slow
@pytest.mark.parametrize("image_size", [(800, 1333), (333, 517)])
def test_levels_split_as_torchvision(image_size):
    pad = padded(image_size)
    expected = torchvision_anchors(image_size)
    anchors, valid = multilevel_anchors_for_image(feature_sizes(pad), FPN_LEVELS, pad)
    counts = [h * w * 3 for h, w in feature_sizes(pad)]
    assert [a.shape for a in anchors] == [(n, 4) for n in counts]
    assert [v.shape for v in valid] == [(n,) for n in counts]
    for a, e in zip(anchors, np.split(expected, np.cumsum(counts)[:-1])):
        np.testing.assert_array_equal(np.asarray(a), e)


def test_p6_stride_is_integer_division():
    # Padded height 800: P6 has ceil(800 / 64) = 13 rows, torchvision's stride 800 // 13 = 61.
    pad = (800, 1344)
    anchors, _ = level_anchors_for_image(
        feature_sizes(pad)[-1], 6, jnp.asarray(pad), base_anchors((512,), (0.5, 1.0, 2.0)))
    anchors = np.asarray(anchors)
    centres_y = np.unique((anchors[:, 1] + anchors[:, 3]) / 2)
    centres_x = np.unique((anchors[:, 0] + anchors[:, 2]) / 2)
    assert len(centres_y) == 13 and np.all(np.diff(centres_y) == 61)
    assert len(centres_x) == 21 and np.all(np.diff(centres_x) == 64)


def test_larger_canvas_marks_positions_beyond_the_image_grid_invalid():
    # Two images of one batch on a shared canvas, padded sizes traced (vmap under jit): the valid
    # anchors of each, in order, are torchvision's for that image alone; the rest lie outside
    # that image's feature grid on some level.
    canvas = (1024, 1376)
    image_sizes = [(800, 1333), (333, 517)]
    pads = jnp.asarray([padded(s) for s in image_sizes], jnp.int32)
    sizes = feature_sizes(canvas)
    anchors, valid = jax.jit(jax.vmap(lambda p: anchors_for_image(sizes, FPN_LEVELS, p)))(pads)
    total = sum(h * w * 3 for h, w in sizes)
    assert anchors.shape == (2, total, 4) and valid.shape == (2, total)
    for b, image_size in enumerate(image_sizes):
        a, v = np.asarray(anchors[b]), np.asarray(valid[b])
        np.testing.assert_array_equal(a[v], torchvision_anchors(image_size))
        # Invalid exactly where the row or column is beyond ceil(padded / 2**k) on that level.
        own = feature_sizes(padded(image_size))
        expected_valid = np.concatenate([
            np.broadcast_to(((np.arange(h) < oh)[:, None] & (np.arange(w) < ow)[None, :])[..., None],
                            (h, w, 3)).reshape(-1)
            for (h, w), (oh, ow) in zip(sizes, own)])
        np.testing.assert_array_equal(v, expected_valid)
        assert not v.all()


def test_multi_size_multi_ratio_level():
    sizes, ratios = ((16, 24, 40),), ((0.25, 1.0, 3.0),)
    image_size = (150, 210)
    pad = padded(image_size)
    expected = torchvision_anchors(image_size, sizes, ratios, levels=(3,))
    anchors, valid = anchors_for_image(feature_sizes(pad, (3,)), (3,), pad, sizes, ratios)
    assert anchors.shape == (math.ceil(pad[0] / 8) * math.ceil(pad[1] / 8) * 9, 4)
    assert np.asarray(valid).all()
    np.testing.assert_array_equal(np.asarray(anchors), expected)


def test_base_anchors_rounding_and_order():
    generator = AnchorGenerator(((32, 64, 100, 45),), ((0.5, 1.0, 2.0, 0.3),))
    expected = generator.cell_anchors[0].numpy()
    actual = base_anchors((32, 64, 100, 45), (0.5, 1.0, 2.0, 0.3))
    np.testing.assert_array_equal(actual, expected)
    # ratio-major order; ratio 1.0 with size 45 gives exactly +-22.5, which rounds half to even.
    np.testing.assert_array_equal(actual[7], [-22.0, -22.0, 22.0, 22.0])


def test_mismatched_levels_rejected():
    with pytest.raises(ValueError):
        multilevel_anchors_for_image([(10, 10)] * 4, FPN_LEVELS[:4], (40, 40))
