"""Numerical parity of the Flax modules with torchvision's maskrcnn_resnet50_fpn (v1).

Torch reference: the same architecture `maskrcnn_resnet50_fpn` builds, with FrozenBatchNorm2d
as when pretrained weights are loaded, every FrozenBatchNorm buffer and every bias randomised
(so neither BN nor the zero-initialised biases are identities), converted by
`torchvision_to_flax`. Each module is fed the torch reference's own inputs, so errors do not
compound, and compared as relative error max|a - b| / max|b| <= 1e-4 in float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection.backbone_utils import (
    _resnet_fpn_extractor,
    resnet_fpn_backbone,
)
from torchvision.models.detection.rpn import permute_and_flatten
from torchvision.ops.misc import FrozenBatchNorm2d

from maskrcnn_jax import models
from maskrcnn_jax.testing.torch_models import randomize_frozen_bn_and_biases
from maskrcnn_jax.torchvision.state_dict_to_flax import (
    backbone_with_fpn_to_flax,
    torchvision_to_flax,
)

RTOL = 1e-4
# bf16 keeps 8 mantissa bits (rounding 2**-9 ~ 2e-3 per cast); over the ~20 layers of a ResNet-18
# + FPN with randomised BN the roundings random-walk to a measured 1.4e-2 .. 1.8e-2 of the output
# range (8e-3 for the mask head + predictor). A real defect (wrong cast, lost scale) is O(1).
BF16_RTOL = 3e-2
NUM_CLASSES = 91


def rel_err(a, b):
    """max|a - b| / max|b| in float64 (printed, visible with `pytest -s`)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b).max() / np.abs(b).max()
    print(f"rel_err {err:.2e}")
    return err


def nhwc(t):
    return np.ascontiguousarray(t.detach().numpy().transpose(0, 2, 3, 1))


randomize_buffers_and_biases = randomize_frozen_bn_and_biases


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    # Exactly maskrcnn_resnet50_fpn's construction, with the FrozenBatchNorm2d it uses whenever
    # weights are loaded (weights=None would give plain BatchNorm2d).
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    model = torchvision.models.detection.MaskRCNN(
        _resnet_fpn_extractor(body, 3), num_classes=NUM_CLASSES).eval()
    randomize_buffers_and_biases(model, seed=1)
    return model


@pytest.fixture(scope="module")
def variables(torch_model):
    return torchvision_to_flax(torch_model.state_dict(), num_classes=NUM_CLASSES)


def sub(variables, name):
    out = {"params": variables["params"][name]}
    if name in variables.get("batch_stats", {}):
        out["batch_stats"] = variables["batch_stats"][name]
    return out


# Jitted applies shared by all tests (jax caches one executable per input shape).
resnet50_apply = jax.jit(models.ResNet50().apply)
fpn_apply = jax.jit(models.FeaturePyramidNetwork().apply)
rpn_apply = jax.jit(models.RPNHead(num_anchors=3).apply)
box_head_apply = jax.jit(models.TwoMLPHead().apply)
box_predictor_apply = jax.jit(models.FastRCNNPredictor(NUM_CLASSES).apply)
mask_head_apply = jax.jit(models.MaskRCNNHeads().apply)
mask_predictor_apply = jax.jit(models.MaskRCNNPredictor(NUM_CLASSES).apply)


@pytest.fixture(scope="module", params=[(256, 320), (200, 296)], ids=lambda s: f"{s[0]}x{s[1]}")
def torch_features(request, torch_model):
    """Torch reference maps for one image size (the second is not a multiple of 32)."""
    h, w = request.param
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    with torch.no_grad():
        body = torch_model.backbone.body(x)
        pyramid = torch_model.backbone.fpn(body)
        logits, deltas = torch_model.rpn.head(list(pyramid.values()))
    return {"image": x, "body": body, "fpn": pyramid, "rpn": (logits, deltas)}


def test_backbone_body(torch_features, variables):
    ours = resnet50_apply(sub(variables, "backbone"), nhwc(torch_features["image"]))
    ref = torch_features["body"]
    assert len(ours) == len(ref) == 4
    for o, key in zip(ours, ref):
        assert o.shape == nhwc(ref[key]).shape
        assert rel_err(o, nhwc(ref[key])) <= RTOL, key


def test_fpn(torch_features, variables):
    ours = fpn_apply(sub(variables, "fpn"), [nhwc(t) for t in torch_features["body"].values()])
    ref = torch_features["fpn"]
    assert list(ref) == ["0", "1", "2", "3", "pool"]
    assert len(ours) == 5
    for o, key in zip(ours, ref):
        assert o.shape == nhwc(ref[key]).shape
        assert rel_err(o, nhwc(ref[key])) <= RTOL, key


def test_rpn_head_flatten_order(torch_features, variables):
    logits, deltas = rpn_apply(sub(variables, "rpn_head"),
                               [nhwc(t) for t in torch_features["fpn"].values()])
    ref_logits, ref_deltas = torch_features["rpn"]
    for o_cls, o_box, r_cls, r_box in zip(logits, deltas, ref_logits, ref_deltas):
        n, a, h, w = r_cls.shape
        # torchvision's own flattening (as in concat_box_prediction_layers).
        r_cls = permute_and_flatten(r_cls, n, a, 1, h, w).reshape(n, -1).numpy()
        r_box = permute_and_flatten(r_box, n, a, 4, h, w).numpy()
        assert o_cls.shape == r_cls.shape and o_box.shape == r_box.shape
        assert rel_err(o_cls, r_cls) <= RTOL
        assert rel_err(o_box, r_box) <= RTOL


def test_box_head_and_predictor(torch_model, variables):
    rois = torch.randn(6, 256, 7, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_repr = torch_model.roi_heads.box_head(rois)
        ref_cls, ref_box = torch_model.roi_heads.box_predictor(ref_repr)
    representation = box_head_apply(sub(variables, "box_head"), nhwc(rois))
    assert rel_err(representation, ref_repr.numpy()) <= RTOL
    cls, box = box_predictor_apply(sub(variables, "box_predictor"), ref_repr.numpy())
    assert cls.shape == (6, NUM_CLASSES) and box.shape == (6, 4 * NUM_CLASSES)
    assert rel_err(cls, ref_cls.numpy()) <= RTOL
    assert rel_err(box, ref_box.numpy()) <= RTOL


def test_box_head_under_vmap(torch_model, variables):
    """Per-image batching (the lead vmaps over images): (N, R, 7, 7, C) under jit(vmap)."""
    rois = torch.randn(2, 3, 256, 7, 7, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = torch_model.roi_heads.box_predictor(torch_model.roi_heads.box_head(
            rois.flatten(0, 1)))[0].reshape(2, 3, NUM_CLASSES)

    @jax.jit
    @functools.partial(jax.vmap, in_axes=(None, 0))
    def classify(v, x):
        return models.FastRCNNPredictor(NUM_CLASSES).apply(
            sub(v, "box_predictor"), models.TwoMLPHead().apply(sub(v, "box_head"), x))[0]

    x = rois.numpy().transpose(0, 1, 3, 4, 2)
    assert rel_err(classify(variables, x), ref.numpy()) <= RTOL


def test_mask_head_and_predictor(torch_model, variables):
    rois = torch.randn(4, 256, 14, 14, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_feat = torch_model.roi_heads.mask_head(rois)
        ref_logits = torch_model.roi_heads.mask_predictor(ref_feat)
    feat = mask_head_apply(sub(variables, "mask_head"), nhwc(rois))
    assert rel_err(feat, nhwc(ref_feat)) <= RTOL
    logits = mask_predictor_apply(sub(variables, "mask_predictor"), nhwc(ref_feat))
    assert logits.shape == (4, 28, 28, NUM_CLASSES)
    assert rel_err(logits, nhwc(ref_logits)) <= RTOL


def test_transposed_conv_orientation():
    """Small MaskRCNNPredictor on a non-square map with a random (asymmetric) 2x2 kernel: a
    missing/extra spatial flip or swapped in/out axes would scramble the 2x2 output cells."""
    torch.manual_seed(5)
    ref = torchvision.models.detection.mask_rcnn.MaskRCNNPredictor(3, 5, 2).eval()
    randomize_buffers_and_biases(ref, seed=5)
    x = torch.randn(2, 3, 3, 4)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    v = {"params": {
        "conv5_mask": {"kernel": sd["conv5_mask.weight"].transpose(2, 3, 1, 0),
                       "bias": sd["conv5_mask.bias"]},
        "mask_fcn_logits": {"kernel": sd["mask_fcn_logits.weight"].transpose(2, 3, 1, 0),
                            "bias": sd["mask_fcn_logits.bias"]}}}
    ours = models.MaskRCNNPredictor(2, dim_reduced=5).apply(v, nhwc(x))
    with torch.no_grad():
        assert rel_err(ours, nhwc(ref(x))) <= 1e-6


def test_frozen_batch_norm():
    torch.manual_seed(6)
    ref = FrozenBatchNorm2d(16)
    randomize_buffers_and_biases(ref, seed=6)
    with torch.no_grad():
        ref.running_mean.mul_(50.0)  # large mean: folding order matters for rounding
    x = torch.randn(2, 16, 5, 3) * 10 + 40
    v = {"batch_stats": {k: v.numpy() for k, v in ref.state_dict().items()}}
    ours = jax.jit(models.FrozenBatchNorm().apply)(v, nhwc(x))
    with torch.no_grad():
        assert rel_err(ours, nhwc(ref(x))) <= 1e-6


@pytest.fixture(scope="module")
def resnet18_fpn():
    torch.manual_seed(0)
    model = resnet_fpn_backbone(backbone_name="resnet18", weights=None).eval()
    randomize_buffers_and_biases(model, seed=7)
    x = torch.randn(1, 3, 200, 296, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = model(x)
    return backbone_with_fpn_to_flax(model.state_dict()), x, ref


@functools.partial(jax.jit, static_argnames="dtype")
def resnet18_fpn_apply(v, x, dtype=None):
    body = models.ResNet18(dtype=dtype).apply(sub(v, "backbone"), x)
    return models.FeaturePyramidNetwork(dtype=dtype).apply(sub(v, "fpn"), body)


def test_resnet18_fpn_backbone(resnet18_fpn):
    v, x, ref = resnet18_fpn
    ours = resnet18_fpn_apply(v, nhwc(x))
    assert len(ours) == len(ref) == 5
    for o, key in zip(ours, ref):
        assert o.shape == nhwc(ref[key]).shape
        assert rel_err(o, nhwc(ref[key])) <= RTOL, key


def test_bf16_backbone_close_to_f32(resnet18_fpn):
    v, x, _ = resnet18_fpn
    f32 = resnet18_fpn_apply(v, nhwc(x))
    bf16 = resnet18_fpn_apply(v, nhwc(x), dtype=jnp.bfloat16)
    for a, b in zip(bf16, f32):
        assert a.dtype == jnp.bfloat16 and b.dtype == jnp.float32
        assert np.isfinite(np.asarray(a, np.float32)).all()
        assert rel_err(a, b) <= BF16_RTOL


def test_bf16_heads_close_to_f32(variables):
    rois = np.random.default_rng(9).standard_normal((3, 14, 14, 256), dtype=np.float32)

    @functools.partial(jax.jit, static_argnames="dtype")
    def mask_logits(v, x, dtype=None):
        feat = models.MaskRCNNHeads(dtype=dtype).apply(sub(v, "mask_head"), x)
        return models.MaskRCNNPredictor(NUM_CLASSES, dtype=dtype).apply(
            sub(v, "mask_predictor"), feat)

    f32 = mask_logits(variables, rois)
    bf16 = mask_logits(variables, rois, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16 and np.isfinite(np.asarray(bf16, np.float32)).all()
    assert rel_err(bf16, f32) <= BF16_RTOL, "mask logits bf16"
    # The parameters themselves stay float32 whatever the computation dtype.
    shapes = jax.eval_shape(models.MaskRCNNPredictor(NUM_CLASSES, dtype=jnp.bfloat16).init,
                            jax.random.PRNGKey(0), rois[:1, :1, :1])
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))
