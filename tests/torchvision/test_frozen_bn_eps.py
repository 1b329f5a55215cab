"""`frozen_bn_eps`: torchvision's official COCO_V1 Mask R-CNN runs its backbone's FrozenBatchNorm2d
with eps 0 (`overwrite_eps(model, 0.0)`), not the default 1e-5.

The reference is torchvision's `maskrcnn_resnet50_fpn` with random weights, made into what the
COCO_V1 builder produces: FrozenBatchNorm2d with eps 0 (`freeze_batch_norm`), random affine
weights (`randomize_frozen_bn_and_biases`) and running statistics calibrated to the activations
(so the random network is normalised as a trained one). As in pretrained ResNets, some channels
are near-dead: 5% of the outputs of every block's first two convolutions are scaled by 1e-3, so
their running variance is ~1e-7..1e-6, where eps 1e-5 instead of 0 shrinks them several-fold.
Converted with `frozen_bn_eps=0.0`, maskrcnn_jax matches torchvision detection for detection;
with the default 1e-5 it visibly does not (which is what makes the first check meaningful).
"""

import json

import numpy as np
import pytest
import torch
import torchvision

from maskrcnn_jax import checkpoints
from maskrcnn_jax.config import model_config
from maskrcnn_jax.inference.predictor import Predictor
from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen
from maskrcnn_jax.testing.images import ellipse_image
from maskrcnn_jax.testing.matching import compare_detections
from maskrcnn_jax.testing.parity_model import KWARGS
from maskrcnn_jax.testing.torch_models import (
    freeze_batch_norm,
    make_confident,
    randomize_frozen_bn_and_biases,
    torchvision_maskrcnn,
)
from maskrcnn_jax.torchvision.convert import from_torchvision

# Both images resize to height 320 (widths 427 and 457, padded to 448 and 480): one small canvas.
IMAGE_SHAPES = [(240, 320), (210, 300)]
CANVAS = (320, 480)
DEAD_FRACTION, DEAD_SCALE = 0.05, 1e-3
# A small torchvision-convertible architecture for the config/CLI checks (no inference).
SMALL = dict(backbone="resnet18", num_classes=4, min_size=96, max_size=128, canvas_size=(128, 128),
             fpn_channels=32, box_representation_size=64, mask_head_layers=(32, 16),
             mask_dim_reduced=24)


@pytest.fixture(scope="module", autouse=True)
def torch_single_thread():
    """torch on one thread (a shared 2-core CPU runs these small models faster so)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _frozen_bns(module):
    from torchvision.ops.misc import FrozenBatchNorm2d

    return [m for m in module.modules() if isinstance(m, FrozenBatchNorm2d)]


@torch.no_grad()
def calibrate_frozen_bn(body, batch):
    """Set every FrozenBatchNorm2d's running mean/variance to its input's per-channel statistics
    on `batch (N, 3, H, W)`, layer by layer in one forward pass (a pre-hook sets them just before
    the layer runs), as a trained network's statistics describe its activations."""
    def hook(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)))

    handles = [m.register_forward_pre_hook(hook) for m in _frozen_bns(body)]
    try:
        body(batch)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def make_near_dead_channels(body, seed):
    """Scale `DEAD_FRACTION` of the output channels of each residual block's conv1 and conv2 by
    `DEAD_SCALE`: after calibration their BN running variance is ~1e-7..1e-6 (pretrained ResNets
    have such channels)."""
    g = torch.Generator().manual_seed(seed)
    for layer in (body.layer1, body.layer2, body.layer3, body.layer4):
        for block in layer:
            for conv in (block.conv1, block.conv2):
                c = conv.weight.shape[0]
                conv.weight[torch.randperm(c, generator=g)[: int(c * DEAD_FRACTION)]] *= DEAD_SCALE


@pytest.fixture(scope="module")
def reference():
    """(torchvision model as COCO_V1 builds it: eps 0, with near-dead channels; test images;
    its detections per image as NumPy dicts)."""
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, **KWARGS).eval()
    make_confident(model)
    body = freeze_batch_norm(model.backbone.body, eps=0.0)
    randomize_frozen_bn_and_biases(body, seed=1)
    make_near_dead_channels(body, seed=2)
    rng = np.random.default_rng(0)
    images = [ellipse_image(rng, h, w) for h, w in IMAGE_SHAPES]
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float() / 255.0 for im in images]
    with torch.no_grad():
        calibrate_frozen_bn(body, model.transform(tensors)[0].tensors)
        outputs = [{k: v.numpy() for k, v in model([t])[0].items()} for t in tensors]
    return model, images, outputs


def _jax_outputs(reference, frozen_bn_eps):
    model, images, _ = reference
    config, variables = from_torchvision(model.state_dict(), frozen_bn_eps=frozen_bn_eps,
                                         canvas_size=CANVAS, **KWARGS)
    assert config.frozen_bn_eps == frozen_bn_eps
    return Predictor(config, variables)(images)


def _report(theirs, ours, label, record_property):
    rows = []
    for i, (t, o) in enumerate(zip(theirs, ours)):
        diff = compare_detections(o, t)
        diff.pop("match")
        # torchvision's detections without a same-label partner within 0.01 px.
        diff["unmatched_at_0.01px"] = compare_detections(o, t, box_tol=0.01)["unmatched"]
        print(f"{label} image {i}: {diff}")
        record_property(f"{label}_image{i}", diff)
        rows.append(diff)
    return rows


def test_reference_has_near_dead_channels(reference):
    model, _, outputs = reference
    bns = _frozen_bns(model.backbone.body)
    assert bns and all(m.eps == 0.0 for m in bns)
    var = torch.cat([m.running_var for m in bns])
    dead = var[var < 1e-5]
    print(f"running_var < 1e-5: {len(dead)} of {len(var)}, range "
          f"{float(dead.min()):.1e}..{float(dead.max()):.1e}")
    assert len(dead) >= 100 and float(dead.max()) < 1e-5
    for out in outputs:
        assert len(out["boxes"]) >= 5 and out["scores"].max() > 0.5, "must detect confidently"


@pytest.mark.slow
def test_eps_zero_matches_torchvision(reference, record_property):
    _, _, theirs = reference
    ours = _jax_outputs(reference, 0.0)
    for diff in _report(theirs, ours, "eps0", record_property):
        assert diff["count_ours"] == diff["count_theirs"]
        assert diff["unmatched"] == 0
        assert diff["max_box_diff"] <= 0.01, diff
        assert diff["max_score_diff"] <= 1e-4, diff
        assert diff["max_mask_mae"] <= 1e-4, diff


@pytest.mark.slow
def test_default_eps_does_not_match(reference, record_property):
    """With torchvision's default 1e-5 the detections of an eps-0 checkpoint visibly differ."""
    _, _, theirs = reference
    ours = _jax_outputs(reference, 1e-5)
    for diff in _report(theirs, ours, "eps1e-5", record_property):
        assert (diff["count_ours"] != diff["count_theirs"] or diff["unmatched"] > 0
                or diff["max_box_diff"] > 1.0 or diff["max_score_diff"] > 1e-2), diff


def _small_state_dict(frozen_bn_eps):
    torch.manual_seed(0)
    return torchvision_maskrcnn(model_config(frozen_bn_eps=frozen_bn_eps, **SMALL)).state_dict()


def test_torchvision_maskrcnn_uses_config_eps():
    for eps in (0.0, 1e-5):
        model = torchvision_maskrcnn(model_config(frozen_bn_eps=eps, **SMALL))
        bns = _frozen_bns(model.backbone.body)
        assert bns and all(m.eps == eps for m in bns)


def test_save_load_keeps_frozen_bn_eps(tmp_path):
    config, variables = from_torchvision(_small_state_dict(0.0), frozen_bn_eps=0.0, **SMALL)
    checkpoints.save_converted(tmp_path / "eps0", config, variables)
    loaded, _, _ = checkpoints.load_weights(tmp_path / "eps0")
    assert loaded.frozen_bn_eps == 0.0
    assert loaded.to_dict() == config.to_dict()
    # The model built from the loaded config uses it (setup runs on bind, without weights).
    assert MaskRCNN(frozen(loaded)).bind({}).backbone.frozen_bn_eps == 0.0
    # A round trip to torchvision builds the torch model with the same eps.
    bns = _frozen_bns(torchvision_maskrcnn(loaded).backbone.body)
    assert all(m.eps == 0.0 for m in bns)


def test_config_without_frozen_bn_eps_loads_as_default(tmp_path):
    """Checkpoints converted before the key existed ran (and still run) with 1e-5."""
    config, variables = from_torchvision(_small_state_dict(1e-5), **SMALL)
    checkpoints.save_converted(tmp_path / "old", config, variables)
    path = tmp_path / "old" / "config.json"
    values = json.loads(path.read_text())
    del values["frozen_bn_eps"]
    path.write_text(json.dumps(values))
    loaded, _, _ = checkpoints.load_weights(tmp_path / "old")
    assert loaded.frozen_bn_eps == 1e-5
    # A config dict that lacks the key (built by hand) still builds the model.
    legacy = config.to_dict()
    del legacy["frozen_bn_eps"]
    assert MaskRCNN(frozen(legacy)).bind({}).backbone.frozen_bn_eps == 1e-5


def test_negative_eps_rejected():
    with pytest.raises(ValueError, match="frozen_bn_eps"):
        model_config(frozen_bn_eps=-1.0)
