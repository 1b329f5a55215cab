"""torchvision's v2 architecture trained against torchvision (`model.train()`): its batch norms
trainable (nn.BatchNorm2d in train mode, `batch_norm='train'`) or frozen (FrozenBatchNorm2d,
`batch_norm='frozen'`).

torchvision's v2 architecture (BatchNorm2d in the backbone, FPN, box head and mask head) around a
ResNet-18 with narrow heads (`testing.torch_models.torchvision_maskrcnn` of the config below: the
parts `maskrcnn_resnet50_fpn_v2` is made of), randomised norms and sharpened predictors, the stem
and layer1 frozen (`requires_grad=False`, as `trainable_backbone_layers=3`: their norms still
train-mode, as torchvision's do), converted with `from_torchvision` (batch norms trainable,
`batch_norm='train'`). The loss-parity set-up (`testing.loss_parity`: the same images, targets
and deterministic sampling of every candidate) with the canvas equal to torchvision's padded
batch (224 x 288), so that both sides' backbone and FPN statistics cover the same elements; the
head norms' statistics cover the sampled RoIs (box head) and the positives (mask head) on both
sides, ours masking the padded slots out.

Float64 on both sides (`jax.enable_x64`, the torch model `.double()`), one training forward and
backward: the five losses, every trainable gradient leaf (relative L2 <= 1e-4: the losses'
float32 casts bound it, as in test_gradient_parity.py), and every norm's running mean, running
variance (unbiased, momentum 0.1) and `num_batches_tracked` after the step (relative 1e-5).
Not vacuous: the running statistics move by far more than the tolerance, and the biased batch
variance in their update (a plausible mistake) is outside it where the count is small (layer4).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.misc import FrozenBatchNorm2d

from maskrcnn_jax.config import model_config
from maskrcnn_jax.data.transform import preprocess
from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen
from maskrcnn_jax.models.norm import fit_norm_layout
from maskrcnn_jax.models.variables import variable_shapes
from maskrcnn_jax.testing import loss_parity
from maskrcnn_jax.testing.torch_models import randomize_batch_norm, torchvision_maskrcnn
from maskrcnn_jax.torchvision.convert import from_torchvision
from maskrcnn_jax.torchvision.state_dict_to_flax import torchvision_to_flax
from maskrcnn_jax.training.losses import LOSS_NAMES, compute_losses

pytestmark = pytest.mark.slow

CANVAS = (224, 288)  # both images' padded size: torchvision's batch tensor
KWARGS = dict(loss_parity.PARITY_KWARGS, rpn_post_nms_top_n_train=128)
ARCHITECTURE = dict(backbone="resnet18", architecture="v2", backbone_norm="batch_norm",
                    fpn_channels=32, box_representation_size=64, mask_head_layers=(32, 32),
                    mask_dim_reduced=32)
GRAD_RTOL = 1e-4
# Statistics: relative 1e-5 (atol 1e-6 of the layer's scale): the RoIs' coordinates pass through
# float32 (box decoding), which moves the heads' statistics by ~1e-6 in float64 runs.
STATS_RTOL = 1e-5
MOMENTUM = 0.1


def _flat(tree):
    return {"/".join(getattr(k, "key", str(k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module", params=["train", "frozen"])
def runs(request):
    mode = request.param
    torch.manual_seed(0)
    config = model_config(canvas_size=CANVAS, mask_rois_per_image=loss_parity.MASK_ROIS,
                          batch_norm=mode, **ARCHITECTURE, **KWARGS)
    model = torchvision_maskrcnn(config)
    norm_type = torch.nn.BatchNorm2d if mode == "train" else FrozenBatchNorm2d
    assert sum(isinstance(m, norm_type) for m in model.modules()) > 20
    randomize_batch_norm(model, seed=1)
    with torch.no_grad():  # O(1) logits, as loss_parity.randomize does for v2
        model.rpn.head.cls_logits.weight.mul_(0.3)
        model.rpn.head.bbox_pred.weight.mul_(0.01)
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.1)
        model.roi_heads.box_predictor.bbox_pred.weight.mul_(0.05)
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(0.1)
    for name, p in model.backbone.body.named_parameters():  # trainable_backbone_layers=3
        if name.startswith(("conv1", "bn1", "layer1")):
            p.requires_grad_(False)
    converted_config, variables = from_torchvision(model.state_dict(), canvas_size=CANVAS,
                                                   mask_rois_per_image=loss_parity.MASK_ROIS,
                                                   batch_norm=mode, **KWARGS)
    assert converted_config.batch_norm == mode

    rng = np.random.default_rng(0)
    batch = preprocess([loss_parity.image(rng, h, w) for h, w in loss_parity.ORIGINAL_SHAPES],
                       config)
    assert batch.padded_sizes.tolist() == [list(CANVAS)] * 2
    objects = [[(60, 80, 45, 55), (245, 185, 40, 30), (120, 40, 18, 15)],
               [(110, 110, 80, 70), (30, 25, 22, 18)]]
    labels = np.asarray([[1, 4, 2], [3, 1, 0]], np.int32)
    masks, boxes, valid = zip(*[loss_parity.ellipse_objects(CANVAS, size, obj, 3)
                                for size, obj in zip(batch.image_sizes, objects)])
    jax_batch = dict(images=batch.images, image_sizes=batch.image_sizes,
                     padded_sizes=batch.padded_sizes, boxes=np.stack(boxes), labels=labels,
                     valid=np.stack(valid), masks=np.stack(masks))

    # torchvision, float64, train mode: one forward (updates its running statistics) + backward.
    model64 = copy.deepcopy(model).double().train()
    tensor = torch.from_numpy(batch.images.transpose(0, 3, 1, 2).astype(np.float64))
    setup = dict(torch_model=model64,
                 image_list=ImageList(tensor, [tuple(int(v) for v in s) for s in
                                               batch.image_sizes]),
                 torch_targets=[{"boxes": torch.from_numpy(jax_batch["boxes"][b][k]).double(),
                                 "labels": torch.from_numpy(labels[b][k].astype(np.int64)),
                                 "masks": torch.from_numpy(jax_batch["masks"][b][k][:, :h, :w])}
                                for b, (k, (h, w)) in enumerate(zip(jax_batch["valid"],
                                                                    batch.image_sizes))])
    losses = loss_parity.torch_losses(setup)
    sum(losses.values()).backward()
    state = {k: v.detach().numpy() for k, v in model64.state_dict().items()}
    grads = dict(state)
    for name, p in model64.named_parameters():
        grads[name] = (p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape)))
    # torch's gradients on our tree (batch norms' weight and bias under 'params').
    torch_grads = _flat(fit_norm_layout(torchvision_to_flax(grads),
                                        variable_shapes(converted_config))["params"])
    torch_after = _flat(torchvision_to_flax(state)["batch_stats"])  # running stats, as FrozenBN

    # maskrcnn_jax, float64: compute_losses's gradient and updated statistics.
    net = MaskRCNN(frozen(converted_config))
    with jax.enable_x64(True):
        v = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64 if np.issubdtype(
            np.asarray(a).dtype, np.floating) else None), variables)
        b = dict(jax_batch, images=np.asarray(jax_batch["images"], np.float64))

        def loss(params):
            return compute_losses(net, {**v, "params": params}, b, jax.random.PRNGKey(0))

        (total, (jax_losses, stats)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(
            v["params"])
        jax_grads, jax_stats = _flat(jax.device_get(g)), _flat(jax.device_get(stats))
    frozen_leaves = {k for k in torch_grads if k.startswith(("backbone/conv1", "backbone/bn1",
                                                             "backbone/layer1_"))}
    return dict(mode=mode, torch_losses={k: float(v.detach()) for k, v in losses.items()},
                jax_losses={k: float(v) for k, v in jax_losses.items()},
                torch_grads=torch_grads, jax_grads=jax_grads, torch_stats=torch_after,
                jax_stats=jax_stats, before=_flat(variables["batch_stats"]),
                frozen=frozen_leaves, variables=variables)


def test_losses_match_torchvision_train_mode(runs):
    for name in LOSS_NAMES:
        ours, theirs = runs["jax_losses"][name], runs["torch_losses"][name]
        assert theirs > 0 and abs(ours - theirs) <= GRAD_RTOL * theirs, (name, ours, theirs)


def test_gradients_match_torchvision_train_mode(runs):
    """Every trainable leaf, batch norms' weight and bias included (gradients through the batch
    statistics, as torch's autograd)."""
    leaves = sorted(k for k in runs["torch_grads"] if k not in runs["frozen"])
    assert any(k.endswith("bn1/weight") for k in leaves) == (runs["mode"] == "train")
    assert len(leaves) > 40
    worst = []
    for k in leaves:
        ref = runs["torch_grads"][k].astype(np.float64)
        norm = float(np.linalg.norm(ref))
        assert norm > 0, k
        worst.append((float(np.linalg.norm(runs["jax_grads"][k] - ref)) / norm, k))
    worst.sort(reverse=True)
    print("\nworst gradient leaves (rel L2):", [(k, f"{r:.2e}") for r, k in worst[:5]])
    assert worst[0][0] <= GRAD_RTOL, worst[0]


def test_running_statistics_match_torchvision(runs):
    """After the step every norm's running mean / variance equals torchvision's (the frozen
    stages' too: torch updates them in train mode), and `num_batches_tracked` is 1."""
    stats = [k for k in runs["torch_stats"] if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 40 and any(k.startswith("mask_head/") for k in stats)
    if runs["mode"] == "frozen":  # FrozenBatchNorm2d: nothing moves on either side
        for k in stats:
            np.testing.assert_array_equal(runs["jax_stats"][k], runs["before"][k])
            np.testing.assert_array_equal(runs["torch_stats"][k], runs["before"][k])
        assert not any(k.endswith("num_batches_tracked") for k in runs["jax_stats"])
        return
    assert any(k.startswith("backbone/layer1_") for k in stats)
    for k in stats:
        ours, theirs = runs["jax_stats"][k], runs["torch_stats"][k]
        before = runs["before"][k]
        moved = np.abs(theirs - before).max()
        assert moved > 1e3 * STATS_RTOL * np.abs(theirs).max(), k  # not vacuous
        np.testing.assert_allclose(ours, theirs, rtol=STATS_RTOL,
                                   atol=0.1 * STATS_RTOL * np.abs(theirs).max(), err_msg=k)
    counters = [k for k in runs["jax_stats"] if k.endswith("num_batches_tracked")]
    assert len(counters) == len(stats) // 2
    assert all(int(runs["jax_stats"][k]) == 1 for k in counters)


def test_biased_variance_update_would_fail(runs):
    """The running variance's unbiased correction n / (n - 1) is visible at this tolerance
    where n is small: in layer4 (stride 32: n = 2 images x 7 x 9 = 126), a biased update (a
    plausible mistake) would fail the test above."""
    if runs["mode"] == "frozen":
        pytest.skip("frozen batch norms keep their statistics")
    n = 2 * 7 * 9
    checked = 0
    for k in runs["torch_stats"]:
        if k.startswith("backbone/layer4_") and k.endswith("running_var"):
            before = runs["before"][k].astype(np.float64)
            theirs = runs["torch_stats"][k].astype(np.float64)
            unbiased_batch_var = (theirs - (1 - MOMENTUM) * before) / MOMENTUM
            biased = (1 - MOMENTUM) * before + MOMENTUM * unbiased_batch_var * (n - 1) / n
            assert np.max(np.abs(biased - theirs) / np.abs(theirs)) > 10 * STATS_RTOL, k
            checked += 1
    assert checked >= 4
