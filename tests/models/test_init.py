"""Fresh initialisation as torchvision's: the Linear layers of the box head and predictor keep
torch's `nn.Linear` defaults (weight and bias uniform in +-1/sqrt(fan_in)), compared with
torchvision's own fresh modules of the same shapes (their statistics, within sampling error).
The convolutions' initialisations are checked against torchvision's by name in the modules
(`kaiming_normal_` fan_out for the ResNet and heads, `kaiming_uniform_(a=1)` for the FPN)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection.faster_rcnn import (FastRCNNConvFCHead, FastRCNNPredictor,
                                                      TwoMLPHead)

from maskrcnn_jax import models

CHANNELS, RESOLUTION, REPRESENTATION, CLASSES = 64, 7, 512, 91


def _same_distribution(ours, theirs, what):
    ours, theirs = np.asarray(ours).ravel(), theirs.detach().numpy().ravel()
    assert ours.size == theirs.size, what
    assert abs(ours.std() - theirs.std()) <= 0.05 * theirs.std(), (what, ours.std(), theirs.std())
    assert abs(np.abs(ours).max() - np.abs(theirs).max()) <= 0.05 * np.abs(theirs).max(), what
    assert abs(ours.mean()) <= 5 * theirs.std() / np.sqrt(theirs.size), what


@pytest.fixture(scope="module")
def torch_modules():
    torch.manual_seed(0)
    return {
        "two_mlp": TwoMLPHead(CHANNELS * RESOLUTION**2, REPRESENTATION),
        "predictor": FastRCNNPredictor(REPRESENTATION, CLASSES),
        "conv_fc": FastRCNNConvFCHead((CHANNELS, RESOLUTION, RESOLUTION), [CHANNELS],
                                      [REPRESENTATION], norm_layer=torch.nn.BatchNorm2d),
    }


def test_box_head_linears_as_torchvision(torch_modules):
    key = jax.random.PRNGKey(0)
    pooled = jnp.zeros((1, RESOLUTION, RESOLUTION, CHANNELS))
    params = models.TwoMLPHead(representation_size=REPRESENTATION).init(key, pooled)["params"]
    theirs = torch_modules["two_mlp"]
    for name in ("fc6", "fc7"):
        _same_distribution(params[name]["kernel"], getattr(theirs, name).weight, f"{name} weight")
        _same_distribution(params[name]["bias"], getattr(theirs, name).bias, f"{name} bias")
    v2 = models.FastRCNNConvFCHead(conv_layers=(CHANNELS,), fc_layers=(REPRESENTATION,)).init(
        key, pooled)["params"]
    linear = torch_modules["conv_fc"][2]  # the Linear after the flatten
    _same_distribution(v2["fc_0"]["kernel"], linear.weight, "v2 fc weight")
    _same_distribution(v2["fc_0"]["bias"], linear.bias, "v2 fc bias")


def test_box_predictor_as_torchvision(torch_modules):
    params = models.FastRCNNPredictor(num_classes=CLASSES).init(
        jax.random.PRNGKey(1), jnp.zeros((1, REPRESENTATION)))["params"]
    theirs = torch_modules["predictor"]
    for name in ("cls_score", "bbox_pred"):
        _same_distribution(params[name]["kernel"], getattr(theirs, name).weight, f"{name} weight")
        _same_distribution(params[name]["bias"], getattr(theirs, name).bias, f"{name} bias")
