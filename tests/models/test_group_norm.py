"""The `group_norm` backbone option: MaskedGroupNorm against torch's GroupNorm, and the
canvas invariance it must keep (an image's features do not depend on the canvas around it)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from maskrcnn_jax import models
from maskrcnn_jax.models.norm import MaskedGroupNorm


def _torch_group_norm(x_nhwc, groups, scale, bias):
    gn = torch.nn.GroupNorm(groups, x_nhwc.shape[-1], eps=1e-5)
    with torch.no_grad():
        gn.weight.copy_(torch.from_numpy(scale))
        gn.bias.copy_(torch.from_numpy(bias))
        out = gn(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2))
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("channels,groups", [(64, 32), (8, 8), (48, 16)])
def test_masked_group_norm_is_torch_group_norm_on_the_valid_region(channels, groups):
    """Each image normalised over its own valid (top-left) region equals torch's GroupNorm of that
    region cropped out; the statistics ignore whatever lies outside it."""
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (2, 16, 20, channels)).astype(np.float32)
    x[0, 10:] = 1e4  # garbage outside image 0's region must not enter its statistics
    sizes = [(10, 20), (16, 12)]
    valid = np.zeros((2, 16, 20), bool)
    for i, (h, w) in enumerate(sizes):
        valid[i, :h, :w] = True
    module = MaskedGroupNorm()
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(valid))
    scale = rng.normal(1.0, 0.2, channels).astype(np.float32)
    bias = rng.normal(0.0, 0.2, channels).astype(np.float32)
    variables = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    assert math.gcd(32, channels) == groups
    out = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(x), jnp.asarray(valid)))
    for i, (h, w) in enumerate(sizes):
        want = _torch_group_norm(x[i : i + 1, :h, :w], groups, scale, bias)
        np.testing.assert_allclose(out[i : i + 1, :h, :w], want, rtol=1e-5, atol=2e-5)




def test_masked_group_norm_without_mask_is_plain_group_norm():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 7, 32)).astype(np.float32)
    module = MaskedGroupNorm()
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x))
    out = np.asarray(module.apply(variables, jnp.asarray(x)))
    want = _torch_group_norm(x, 32, np.ones(32, np.float32), np.zeros(32, np.float32))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["group_norm", "frozen_bn"])
def test_backbone_features_do_not_depend_on_the_canvas(norm):
    """A 64x96 image alone and in a 128x128 zero-padded canvas (as `transform.preprocess` pads)
    gives the same C2..C5 inside its region: the padding would shift unmasked GroupNorm
    statistics; the masked ones and `zero_outside` see only the image. ResNet-18's BasicBlocks
    also catch max-pool windows leaking across the region's edge into the first 3x3 conv."""
    rng = np.random.default_rng(2)
    net = models.ResNet18(norm=norm, width=16)
    image = rng.normal(size=(1, 64, 96, 3)).astype(np.float32)
    big = np.zeros((1, 128, 128, 3), np.float32)
    big[:, :64, :96] = image
    small_valid = np.ones((1, 64, 96), bool)
    big_valid = np.zeros((1, 128, 128), bool)
    big_valid[:, :64, :96] = True
    variables = net.init(jax.random.PRNGKey(0), jnp.asarray(image), jnp.asarray(small_valid))
    if norm == "group_norm":
        assert "batch_stats" not in variables  # GroupNorm has trainable scale/bias only
        assert "scale" in variables["params"]["layer1_0"]["bn1"]
    apply = jax.jit(net.apply)
    small = apply(variables, jnp.asarray(image), jnp.asarray(small_valid))
    large = apply(variables, jnp.asarray(big), jnp.asarray(big_valid))
    for a, b in zip(small, large):
        h, w = a.shape[1:3]
        np.testing.assert_allclose(np.asarray(b[:, :h, :w]), np.asarray(a), rtol=1e-4, atol=1e-4)
    if norm == "group_norm":  # the masking matters: canvas-wide statistics differ
        unmasked = apply(variables, jnp.asarray(big), None)
        assert np.abs(np.asarray(unmasked[0][:, :16, :24]) - np.asarray(small[0])).max() > 1e-2


def test_unknown_norm_is_rejected():
    net = models.ResNet18(norm="layer_norm")
    with pytest.raises(ValueError, match="unknown norm 'layer_norm'"):
        net.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
