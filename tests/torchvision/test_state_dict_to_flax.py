"""The torchvision -> Flax weight converter (`state_dict_to_flax`): structure, layouts, errors.

Structure reference: `jax.eval_shape(module.init, ...)` of each Flax module, which must give
exactly the converted tree (same paths, same shapes, float32). torchvision's v2 architecture is
read from the keys (`from_torchvision`). The other direction: test_flax_to_state_dict.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from maskrcnn_jax import models
from maskrcnn_jax.torchvision.state_dict_to_flax import (
    resnet_to_flax,
    torchvision_to_flax,
)

NUM_CLASSES = 91
TOP_LEVEL = ["backbone", "box_head", "box_predictor", "fpn", "mask_head", "mask_predictor",
             "rpn_head"]


@pytest.fixture(scope="module")
def state_dict():
    """The real maskrcnn_resnet50_fpn keys (weights=None: BatchNorm2d, num_batches_tracked)."""
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def converted(state_dict):
    return torchvision_to_flax(state_dict, num_classes=NUM_CLASSES)


def _nhwc(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


# Each top-level name -> (Flax module, example input) used by the lead's top-level model.
MODULES = {
    "backbone": (models.ResNet50(), _nhwc(1, 64, 64, 3)),
    "fpn": (models.FeaturePyramidNetwork(),
            [_nhwc(1, 16, 16, 256), _nhwc(1, 8, 8, 512), _nhwc(1, 4, 4, 1024),
             _nhwc(1, 2, 2, 2048)]),
    "rpn_head": (models.RPNHead(num_anchors=3), [_nhwc(1, 8, 8, 256), _nhwc(1, 4, 4, 256)]),
    "box_head": (models.TwoMLPHead(), _nhwc(2, 7, 7, 256)),
    "box_predictor": (models.FastRCNNPredictor(NUM_CLASSES), _nhwc(2, 1024)),
    "mask_head": (models.MaskRCNNHeads(), _nhwc(2, 14, 14, 256)),
    "mask_predictor": (models.MaskRCNNPredictor(NUM_CLASSES), _nhwc(2, 14, 14, 256)),
}


def shape_tree(tree):
    return jax.tree_util.tree_map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


def without_counters(tree):
    """`tree` without BatchNorm2d's `num_batches_tracked` (FrozenBatchNorm modules have none;
    the converter keeps them where the state dict has them), after checking each is an int32
    scalar beside a `running_mean`."""
    if not hasattr(tree, "items"):
        return tree
    if "num_batches_tracked" in tree:
        counter = tree["num_batches_tracked"]
        assert counter.shape == () and counter.dtype == np.int32 and "running_mean" in tree
    return {k: without_counters(v) for k, v in tree.items() if k != "num_batches_tracked"}


def init_shapes(module, example):
    return shape_tree(jax.eval_shape(module.init, jax.random.PRNGKey(0), example))


def test_top_level_names(converted):
    assert sorted(converted) == ["batch_stats", "params"]
    assert sorted(converted["params"]) == TOP_LEVEL
    assert sorted(converted["batch_stats"]) == ["backbone"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_tree_matches_module_init(converted, name):
    module, example = MODULES[name]
    expected = init_shapes(module, example)
    got = {"params": converted["params"][name]}
    if name in converted["batch_stats"]:
        got["batch_stats"] = without_counters(converted["batch_stats"][name])
    assert shape_tree(got) == expected


def test_leaves_are_float32_numpy_and_cover_every_tensor(state_dict, converted):
    leaves = jax.tree_util.tree_leaves(without_counters(converted))
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in leaves)
    counters = [k for k in state_dict if k.endswith("num_batches_tracked")]
    assert len(counters) == len(jax.tree_util.tree_leaves(converted)) - len(leaves) > 0
    assert sum(a.size for a in leaves) == sum(v.numel() for k, v in state_dict.items()
                                             if k not in counters)


def test_numpy_input_gives_same_result(state_dict, converted):
    as_numpy = torchvision_to_flax({k: v.numpy() for k, v in state_dict.items()})
    jax.tree_util.tree_map(np.testing.assert_array_equal, as_numpy, converted)


def test_converted_variables_do_not_alias_the_torch_tensors(state_dict):
    """Changing the torch tensors in place after conversion (training the torch model on) must
    not change the converted variables: `Tensor.numpy()` is a view, so conversion copies."""
    sd = {k: v.clone() for k, v in state_dict.items()}
    variables = torchvision_to_flax(sd, num_classes=NUM_CLASSES)
    before = jax.tree_util.tree_map(np.copy, variables)
    with torch.no_grad():
        for v in sd.values():
            if v.is_floating_point():
                v.add_(1.0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, before)


def test_layouts(state_dict, converted):
    p = converted["params"]
    conv = state_dict["backbone.body.layer2.0.conv2.weight"].numpy()  # (O, I, kh, kw)
    np.testing.assert_array_equal(p["backbone"]["layer2_0"]["conv2"]["kernel"][2, 0, 5, 7],
                                  conv[7, 5, 2, 0])
    bn = state_dict["backbone.body.layer3.1.bn2.running_var"].numpy()
    np.testing.assert_array_equal(converted["batch_stats"]["backbone"]["layer3_1"]["bn2"]
                                  ["running_var"], bn)
    # fc6: torch flattens (c, h, w); the Flax kernel's rows are in NHWC (h, w, c) order.
    fc6 = state_dict["roi_heads.box_head.fc6.weight"].numpy()
    kernel = p["box_head"]["fc6"]["kernel"]
    rng = np.random.default_rng(0)
    for o, c, h, w in zip(*(rng.integers(0, n, 20) for n in (1024, 256, 7, 7))):
        assert kernel[(h * 7 + w) * 256 + c, o] == fc6[o, c * 49 + h * 7 + w]
    # ConvTranspose2d (in, out, kh, kw) -> (kh, kw, out, in).
    deconv = state_dict["roi_heads.mask_predictor.conv5_mask.weight"].numpy()
    np.testing.assert_array_equal(p["mask_predictor"]["conv5_mask"]["kernel"][1, 0, 3, 9],
                                  deconv[9, 3, 1, 0])
    linear = state_dict["roi_heads.box_predictor.bbox_pred.weight"].numpy()
    np.testing.assert_array_equal(p["box_predictor"]["bbox_pred"]["kernel"], linear.T)


def _without(sd, key):
    return {k: v for k, v in sd.items() if k != key}


@pytest.mark.parametrize("key", [
    "backbone.body.layer1.0.downsample.0.weight",
    "backbone.body.layer4.2.bn3.running_mean",
    "backbone.fpn.layer_blocks.3.0.bias",
    "rpn.head.bbox_pred.weight",
    "roi_heads.box_head.fc7.bias",
    "roi_heads.mask_predictor.conv5_mask.bias",
])
def test_missing_key_is_named(state_dict, key):
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        torchvision_to_flax(_without(state_dict, key))


def test_unexpected_key_is_named(state_dict):
    extra = dict(state_dict, **{"roi_heads.keypoint_head.0.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected keys.*keypoint_head\.0\.weight"):
        torchvision_to_flax(extra)


@pytest.mark.parametrize("key,shape", [
    ("backbone.body.layer3.2.conv2.weight", (256, 256, 1, 1)),
    ("backbone.body.layer2.1.bn1.weight", (64,)),
    ("backbone.fpn.inner_blocks.1.0.weight", (256, 256, 1, 1)),
    ("rpn.head.bbox_pred.weight", (8, 256, 1, 1)),
    ("roi_heads.box_head.fc6.weight", (1024, 256 * 7 * 7 + 1)),
    ("roi_heads.mask_predictor.mask_fcn_logits.weight", (90, 256, 1, 1)),
])
def test_shape_mismatch_is_named(state_dict, key, shape):
    bad = dict(state_dict, **{key: torch.zeros(shape)})
    with pytest.raises(ValueError, match="shape mismatch for '" + key.replace(".", r"\.")):
        torchvision_to_flax(bad)


def test_num_classes_mismatch(state_dict):
    with pytest.raises(ValueError, match=r"roi_heads\.box_predictor\.cls_score\.weight"):
        torchvision_to_flax(state_dict, num_classes=2)


@pytest.mark.parametrize("arch,module", [("resnet18", models.ResNet18()),
                                         ("resnet50", models.ResNet50())])
def test_resnet_to_flax_structure(arch, module):
    sd = getattr(torchvision.models, arch)(weights=None).state_dict()
    assert "fc.weight" in sd
    variables = resnet_to_flax(sd)
    assert shape_tree(without_counters(variables)) == init_shapes(module, _nhwc(1, 64, 64, 3))


def test_resnet_to_flax_numerics():
    """ImageNet ResNet-18 (BatchNorm2d in eval mode, random running stats) up to layer4."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        x = torch.randn(2, 3, 72, 88, generator=g)
        y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        ref = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            y = layer(y)
            ref.append(y.numpy().transpose(0, 2, 3, 1))
    ours = jax.jit(models.ResNet18().apply)(resnet_to_flax(net.state_dict()),
                                            x.numpy().transpose(0, 2, 3, 1))
    for o, r in zip(ours, ref):
        assert o.shape == r.shape
        assert np.abs(np.asarray(o) - r).max() / np.abs(r).max() <= 1e-4


@pytest.fixture(scope="module")
def state_dict_v2():
    """The real maskrcnn_resnet50_fpn_v2 keys (BatchNorm2d everywhere, num_batches_tracked)."""
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_v2_is_recognised_and_matches_the_v2_model(state_dict_v2):
    """`from_torchvision` reads v2 from the keys; its tree is exactly `MaskRCNN(v2 config)`'s
    (paths and shapes: BN statistics of the FPN and heads in 'batch_stats', the 2-conv RPN head and
    FastRCNNConvFCHead), every tensor used once, and the inverse gives torchvision's keys back
    bit for bit."""
    from maskrcnn_jax.models.variables import variable_shapes
    from maskrcnn_jax.torchvision.convert import (
        architecture_of,
        from_torchvision,
        to_torchvision,
    )

    assert architecture_of(state_dict_v2)["architecture"] == "v2"
    config, variables = from_torchvision(state_dict_v2)
    assert config.architecture == "v2" and config.mask_head_layers == (256,) * 4
    assert sorted(variables["batch_stats"]) == ["backbone", "box_head", "fpn", "mask_head"]
    assert sorted(variables["params"]["rpn_head"]) == ["bbox_pred", "cls_logits", "conv", "conv_1"]
    got = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
           for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
    assert got == variable_shapes(config)
    # The v1 model's tree is a different one: the check above can fail.
    v1 = config.copy_and_resolve_references()
    v1.architecture = "v1"
    assert got != variable_shapes(v1)
    # BatchNorm2d throughout (batch norms trainable, counters kept): every tensor, both ways.
    assert config.backbone_norm == "batch_norm" and config.batch_norm == "train"
    assert sum(int(np.prod(s)) for s in got.values()) == sum(
        v.numel() for v in state_dict_v2.values())
    back = to_torchvision(config, variables)
    assert sorted(back) == sorted(state_dict_v2)
    for key, value in state_dict_v2.items():
        assert torch.equal(back[key], value), key


def test_v2_keyword_and_shape_errors(state_dict, state_dict_v2):
    from maskrcnn_jax.torchvision.convert import from_torchvision

    with pytest.raises(ValueError, match="architecture='v2' given, but the state dict has 'v1'"):
        from_torchvision(state_dict, architecture="v2")
    with pytest.raises(ValueError, match="architecture='v1' given, but the state dict has 'v2'"):
        from_torchvision(state_dict_v2, architecture="v1")
    bad = dict(state_dict_v2)
    bad["roi_heads.box_head.2.1.running_var"] = torch.ones(128)
    with pytest.raises(ValueError, match=r"roi_heads\.box_head\.2\.1\.running_var.*\(128,\)"):
        from_torchvision(bad)
    missing = {k: v for k, v in state_dict_v2.items() if k != "backbone.fpn.layer_blocks.1.1.bias"}
    with pytest.raises(KeyError, match=r"backbone\.fpn\.layer_blocks\.1\.1\.bias"):
        from_torchvision(missing)
