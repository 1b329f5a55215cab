"""Canvas buckets: each image runs in the smallest canvas that holds it; one compiled function
per canvas used, none for new image sizes; the detections equal those of one big canvas."""

import numpy as np
import pytest

from maskrcnn_jax.canvas import bucket_for, default_canvas_buckets
from maskrcnn_jax.config import model_config
from maskrcnn_jax.inference.predictor import Predictor
from maskrcnn_jax.testing.images import ellipse_image
from maskrcnn_jax.testing.tiny import tiny_model


def test_default_buckets_for_torchvision_sizes():
    config = model_config()  # min_size 800, max_size 1333, no canvas_size
    assert config.canvas_buckets == ((800, 800), (800, 1088), (1088, 800), (800, 1344),
                                     (1344, 800))
    assert default_canvas_buckets(800, 1333) == ((800, 800), (800, 1088), (1088, 800),
                                                 (800, 1344), (1344, 800))
    assert config.canvas_size == (1344, 1344)  # training / export keep one square canvas
    # An explicit canvas_size is the only inference canvas (as before buckets existed).
    assert model_config(canvas_size=(800, 1344)).canvas_buckets == ((800, 1344),)
    buckets = config.canvas_buckets
    assert bucket_for((800, 800), buckets) == (800, 800)
    assert bucket_for((608, 800), buckets) == (800, 800)
    assert bucket_for((800, 1088), buckets) == (800, 1088)  # 4:3
    assert bucket_for((800, 1216), buckets) == (800, 1344)  # 3:2
    assert bucket_for((768, 1344), buckets) == (800, 1344)  # 16:9
    assert bucket_for((1344, 768), buckets) == (1344, 800)  # 9:16
    assert bucket_for((1376, 800), buckets) is None
    with pytest.raises(ValueError, match="multiples of 32"):
        model_config(canvas_buckets=[(800, 1000)])


@pytest.fixture(scope="module")
def bucketed():
    # A config of its own (box_detections_per_img; the parameters do not depend on it) so that
    # no other test shares its compiled functions: the counts below start from zero.
    config, variables = tiny_model()
    values = {**config.to_dict(), "box_detections_per_img": 9, "canvas_size": None,
              "canvas_buckets": None}
    return model_config(**values), variables


def test_one_compilation_per_bucket_used(bucketed):
    config, variables = bucketed
    assert config.canvas_buckets == ((96, 96), (96, 128), (128, 96))
    predictor = Predictor(config, variables, batch_size=2)
    rng = np.random.default_rng(0)
    first = [ellipse_image(rng, h, w) for h, w in ((60, 80), (80, 60), (50, 50), (61, 80))]
    predictor(first)
    assert predictor._forward._cache_size() == 3  # landscape, portrait, square
    again = [ellipse_image(rng, h, w) for h, w in ((30, 40), (90, 88), (120, 90), (75, 100))]
    predictor(again)
    assert predictor._forward._cache_size() == 3  # new sizes, same buckets: nothing compiled


@pytest.mark.slow
def test_bucketed_detections_equal_one_canvas(bucketed):
    config, variables = bucketed
    rng = np.random.default_rng(1)
    images = [ellipse_image(rng, h, w) for h, w in ((60, 80), (80, 60), (70, 70), (45, 90))]
    ours = Predictor(config, variables, batch_size=2)(images)
    square = config.copy_and_resolve_references()
    square.canvas_buckets = ((128, 128),)
    theirs = Predictor(square, variables, batch_size=2)(images)
    assert sum(len(r["scores"]) for r in ours) > 0
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a["labels"], b["labels"])
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3, rtol=0)
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(a["masks"], b["masks"], atol=1e-4, rtol=0)
