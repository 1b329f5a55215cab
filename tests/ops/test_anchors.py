"""maskrcnn_jax.ops.anchors against torchvision's AnchorGenerator (exact equality)."""

import math

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from maskrcnn_jax.ops.anchors import (
    DEFAULT_ASPECT_RATIOS,
    DEFAULT_SIZES,
    base_anchors,
    level_anchors,
    multilevel_anchors,
)


def fpn_feature_sizes(height, width):
    """Feature sizes of ResNet-50-FPN levels '0'..'3' and 'pool' for a canvas.

    Every stride-2 stage (conv1, maxpool, layer2..4, and the 1x1 stride-2 max pool of the
    'pool' level) maps n -> ceil(n / 2).
    """
    sizes = []
    h, w = height, width
    for level in range(6):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        if level >= 1:  # after the maxpool: C2 (stride 4), C3, C4, C5, pool
            sizes.append((h, w))
    return sizes


def torchvision_anchors(canvas, feature_sizes, sizes=DEFAULT_SIZES, ratios=DEFAULT_ASPECT_RATIOS):
    generator = AnchorGenerator(sizes, ratios)
    height, width = canvas
    images = ImageList(torch.zeros(2, 3, height, width), [(height - 5, width - 3), (height, width)])
    features = [torch.zeros(2, 1, h, w) for h, w in feature_sizes]
    per_image = generator(images, features)
    counts = [h * w * len(s) * len(r) for (h, w), s, r in zip(feature_sizes, sizes, ratios)]
    torch.testing.assert_close(per_image[0], per_image[1], rtol=0, atol=0)
    return [t.numpy() for t in per_image[0].split(counts)]


@pytest.mark.parametrize(
    "canvas",
    [
        (800, 1344),  # COCO-sized canvas; 'pool' is 13x21 so its y stride is 800 // 13 = 61
        (512, 512),
        (320, 448),
        (800, 1216),  # 800x1216 images padded to multiples of 32: odd P5 (25x38)
        (333, 517),  # not a multiple of 32: ceil-halved odd sizes everywhere
    ],
)
def test_multilevel_anchors_equal_torchvision(canvas):
    feature_sizes = fpn_feature_sizes(*canvas)
    expected = torchvision_anchors(canvas, feature_sizes)
    actual = multilevel_anchors(feature_sizes, canvas)
    assert len(actual) == len(expected) == 5
    for a, e in zip(actual, expected):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, e)


def test_quirky_stride_is_integer_division():
    # 800 // 13 = 61, not 64: torchvision derives strides from the padded canvas size.
    anchors = multilevel_anchors(fpn_feature_sizes(800, 1344), (800, 1344))[-1]
    centres_y = np.unique((anchors[:, 1] + anchors[:, 3]) / 2)
    assert np.all(np.diff(centres_y) == 61)


def test_base_anchors_rounding_and_order():
    generator = AnchorGenerator(((32, 64, 100, 45),), ((0.5, 1.0, 2.0, 0.3),))
    expected = generator.cell_anchors[0].numpy()
    actual = base_anchors((32, 64, 100, 45), (0.5, 1.0, 2.0, 0.3))
    np.testing.assert_array_equal(actual, expected)
    # ratio-major order; ratio 1.0 with size 45 gives exactly +-22.5, which rounds half to even.
    np.testing.assert_array_equal(actual[7], [-22.0, -22.0, 22.0, 22.0])


def test_level_anchors_multi_size_multi_ratio():
    sizes, ratios = (16, 24, 40), (0.25, 1.0, 3.0)
    feature, stride = (7, 5), (9, 11)
    generator = AnchorGenerator((sizes,), (ratios,))
    expected = generator.grid_anchors([list(feature)], [[torch.tensor(stride[0]), torch.tensor(stride[1])]])[0]
    actual = level_anchors(feature, stride, sizes, ratios)
    assert actual.shape == (7 * 5 * 9, 4)
    np.testing.assert_array_equal(actual, expected.numpy())


def test_mismatched_levels_rejected():
    with pytest.raises(ValueError):
        multilevel_anchors([(10, 10)] * 4, (40, 40))
