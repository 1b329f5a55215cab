"""The torchvision Mask R-CNN the model parity tests share, made to detect confidently, and its
conversion (the `models` session fixture of tests/conftest.py).

The torchvision model is built with random weights (fixed seed) and made to detect confidently by
scaling its objectness and classifier logits. Images are resized to a small `min_size` to keep
the suite fast on a CPU while running the real architecture. Few RPN candidates keep near-ties
(to which a random-weight model is very sensitive) rare.
"""

import numpy as np

from maskrcnn_jax.inference.predictor import Predictor
from maskrcnn_jax.testing.images import ellipse_image
from maskrcnn_jax.testing.torch_models import make_confident, randomize_batch_norm
from maskrcnn_jax.torchvision.convert import from_torchvision

KWARGS = dict(num_classes=5, min_size=320, max_size=480, box_score_thresh=0.05,
              box_detections_per_img=20, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=60)
CANVAS = (480, 480)
IMAGE_SHAPES = [(240, 320), (300, 200), (256, 256)]


def image(rng, h, w):
    """A smooth image with five bright ellipses (uint8 RGB)."""
    return ellipse_image(rng, h, w, num_ellipses=5)


def build(architecture="v1"):
    """(torchvision model, Predictor of its conversion, test images) for torchvision's
    `maskrcnn_resnet50_fpn` ('v1') or `maskrcnn_resnet50_fpn_v2` ('v2'; its BatchNorm2d layers
    in eval mode with randomised statistics, so that the norms are exercised)."""
    import torch

    from maskrcnn_jax.testing import import_torchvision

    torchvision = import_torchvision()
    torch.manual_seed(0)
    if architecture == "v2":
        model = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(
            weights=None, weights_backbone=None, **KWARGS).eval()
        randomize_batch_norm(model, seed=1)
    else:
        model = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, **KWARGS).eval()
    if architecture == "v2":
        make_confident(model, class_scale=0.1, box_scale=0.05)
    else:
        make_confident(model)
    config, variables = from_torchvision(model.state_dict(), canvas_size=CANVAS, **KWARGS)
    predictor = Predictor(config, variables)
    rng = np.random.default_rng(0)
    images = [image(rng, h, w) for h, w in IMAGE_SHAPES]
    return model, predictor, images


