"""Fresh initialisation as torchvision's: the Linear layers of the box head and predictor keep
torch's `nn.Linear` defaults (weight and bias uniform in +-1/sqrt(fan_in)), compared with
torchvision's own fresh modules of the same shapes (their statistics, within sampling error);
so do the mask predictor's biases (torchvision leaves them at the layers' defaults).
The convolutions' initialisations are checked against torchvision's by name in the modules
(`kaiming_normal_` fan_out for the ResNet and heads, `kaiming_uniform_(a=1)` for the FPN)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection.faster_rcnn import (FastRCNNConvFCHead, FastRCNNPredictor,
                                                      TwoMLPHead)
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

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


def test_mask_predictor_as_torchvision():
    """Kernels kaiming-normal (fan_out) as torchvision's; biases at torch's layer default,
    uniform in +-1/sqrt(fan_in) (ConvTranspose2d: fan_in = out x 2 x 2), not zero."""
    torch.manual_seed(0)
    dim = 256
    theirs = MaskRCNNPredictor(CHANNELS, dim, CLASSES)
    params = models.MaskRCNNPredictor(num_classes=CLASSES, dim_reduced=dim).init(
        jax.random.PRNGKey(2), jnp.zeros((1, 14, 14, CHANNELS)))["params"]
    for name in ("conv5_mask", "mask_fcn_logits"):  # normal: the std (the max is a tail draw)
        ours, weight = np.asarray(params[name]["kernel"]), getattr(theirs, name).weight.detach()
        assert ours.size == weight.numel()
        assert abs(ours.std() - float(weight.std())) <= 0.05 * float(weight.std()), name
    for name, fan_in in (("conv5_mask", dim * 4), ("mask_fcn_logits", dim)):
        bound = 1 / np.sqrt(fan_in)
        ours = np.asarray(params[name]["bias"])
        theirs_bias = getattr(theirs, name).bias.detach().numpy()
        assert 0.8 * bound <= np.abs(theirs_bias).max() <= bound, name  # the bound is torch's
        assert 0.8 * bound <= np.abs(ours).max() <= bound, name
        assert ours.std() >= 0.8 * bound / np.sqrt(3), name  # uniform, not a constant
