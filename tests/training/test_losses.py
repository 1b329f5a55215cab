"""Training targets and losses: parity with torchvision's training forward, and robustness.

Parity: a torchvision Mask R-CNN (ResNet-50 FPN, FrozenBatchNorm2d as with loaded weights, BN
buffers and biases randomised, objectness / classifier / mask logits sharpened so that every loss
depends strongly on its targets) in train mode and its `from_torchvision` conversion get the same
preprocessed images (`maskrcnn_jax.data.transform.preprocess`; torchvision gets the same float tensor
cropped to the two images' common padded size, bypassing its transform which would resize again)
and the same targets (boxes, labels, full-resolution masks, one object cut by the image border).
Sampling is made deterministic in both by sample counts above the number of candidates and
positive fraction 1 (every positive and every negative is taken). Each of the five losses must
agree within 1e-4 relative. The set-up is `maskrcnn_jax.testing.loss_parity` (shared with
tests/test_gradient_parity.py).

Robustness uses a tiny backbone on a small canvas (fast to compile): finite losses and gradients
for images without objects and for a batch mixing empty and non-empty images; the crops mask path
against the full-resolution path; sample counts with the default (random) sampling.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from maskrcnn_jax.config import model_config
from maskrcnn_jax.data.mask_crops import crop_resized_masks
from maskrcnn_jax.layers import targets as tg
from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen, group_padded_sizes, mask_budget
from maskrcnn_jax.ops.boxes import decode_boxes
from maskrcnn_jax.testing import loss_parity
from maskrcnn_jax.testing.loss_parity import MASK_ROIS, PARITY_KWARGS, ellipse_objects
from maskrcnn_jax.training.losses import LOSS_NAMES, compute_losses, mask_loss

RTOL = 1e-4

# --------------------------------------------------------------------------------------------
# Parity with torchvision
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parity():
    setup = loss_parity.build()
    torch_model, config, variables = setup["torch_model"], setup["config"], setup["variables"]
    batch, jax_batch = setup["batch"], setup["jax_batch"]
    assert batch.padded_sizes.tolist() == [[224, 288], [224, 288]]
    assert batch.image_sizes.tolist() == [[200, 260], [200, 263]]

    captured = {}
    select = type(torch_model.roi_heads).select_training_samples.__get__(torch_model.roi_heads)

    def capture(proposals, targets):
        out = select(proposals, targets)
        captured["labels"] = out[2]
        captured["candidates"] = [len(p) + len(t["boxes"]) for p, t in zip(proposals, targets)]
        return out

    torch_model.roi_heads.select_training_samples = capture
    try:
        with torch.no_grad():
            losses = loss_parity.torch_losses(setup)
    finally:
        del torch_model.roi_heads.select_training_samples
    torch_losses = {k: float(v) for k, v in losses.items()}
    num_positive = [int((lb > 0).sum()) for lb in captured["labels"]]
    num_sampled = [len(lb) for lb in captured["labels"]]

    model = MaskRCNN(frozen({**config.to_dict(), "mask_rois_per_image": MASK_ROIS}))
    loss_fn = jax.jit(lambda v, b, k: compute_losses(model, v, b, k))
    total, (jax_losses, _) = loss_fn(variables, jax_batch, jax.random.PRNGKey(0))
    return dict(torch=torch_losses, jax={k: float(v) for k, v in jax_losses.items()},
                total=float(total), num_positive=num_positive, num_sampled=num_sampled,
                num_candidates=captured["candidates"])


def test_parity_setup_is_exact(parity):
    """torchvision took every RoI candidate (so its random sampler chose nothing), and every
    positive fits the JAX mask-head slots (nothing dropped)."""
    print("RoI candidates / sampled / positive per image (torchvision):",
          parity["num_candidates"], parity["num_sampled"], parity["num_positive"])
    assert parity["num_sampled"] == parity["num_candidates"]
    assert max(parity["num_candidates"]) < PARITY_KWARGS["box_batch_size_per_image"]
    assert all(3 <= n <= MASK_ROIS for n in parity["num_positive"])
    assert sorted(parity["torch"]) == sorted(LOSS_NAMES)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_matches_torchvision(parity, name):
    ours, theirs = parity["jax"][name], parity["torch"][name]
    rel = abs(ours - theirs) / abs(theirs)
    print(f"{name}: jax {ours:.7f} torchvision {theirs:.7f} rel diff {rel:.2e}")
    assert theirs > 0, "the reference loss must be non-trivial"
    assert rel <= RTOL


# Two images of different padded sizes, (224, 288) and (160, 320): torchvision's batch tensor is
# (224, 320), so each image trains with the other's padding (anchors there are RPN negatives).
MIXED_SHAPES = ((200, 260), (100, 200))


@pytest.fixture(scope="module")
def mixed_sizes():
    setup = loss_parity.build("resnet18", MIXED_SHAPES)
    assert setup["batch"].padded_sizes.tolist() == [[224, 288], [160, 320]]
    assert tuple(setup["image_list"].tensors.shape[-2:]) == (224, 320)
    with torch.no_grad():
        torch_losses = {k: float(v) for k, v in loss_parity.torch_losses(setup).items()}

    def jax_losses(group):
        model = MaskRCNN(frozen({**setup["config"].to_dict(), "mask_rois_per_image": MASK_ROIS,
                                 "train_padding_group": group}))
        _, (terms, _) = jax.jit(lambda v, b, k: compute_losses(model, v, b, k))(
            setup["variables"], setup["jax_batch"], jax.random.PRNGKey(0))
        return {k: float(terms[k]) for k in LOSS_NAMES}

    return torch_losses, jax_losses


def test_padding_group_matches_torchvision_batch(mixed_sizes):
    """`train_padding_group` 2 (the default): the five losses of a batch of two images of
    different sizes equal torchvision's on its padded batch tensor; each image alone (group 1)
    does not (torchvision's RPN losses are normalised by the sampled anchors, the other
    image's padding included, and its features there reach the RoIs near the border)."""
    torch_losses, jax_losses = mixed_sizes
    grouped, alone = jax_losses(2), jax_losses(1)
    for name in LOSS_NAMES:
        rel = abs(grouped[name] - torch_losses[name]) / abs(torch_losses[name])
        print(f"{name}: grouped {grouped[name]:.7f} alone {alone[name]:.7f} "
              f"torchvision {torch_losses[name]:.7f}")
        assert rel <= RTOL, name
    rel = {k: abs(alone[k] - torch_losses[k]) / abs(torch_losses[k]) for k in LOSS_NAMES}
    assert rel["loss_rpn_box_reg"] > 0.1 and max(rel.values()) > 100 * RTOL


def test_group_padded_sizes():
    sizes = jnp.asarray([[96, 128], [128, 96], [64, 64], [160, 32], [32, 32]], jnp.int32)
    np.testing.assert_array_equal(group_padded_sizes(sizes, 1), sizes)
    np.testing.assert_array_equal(
        group_padded_sizes(sizes, 2),
        [[128, 128], [128, 128], [160, 64], [160, 64], [32, 32]])
    np.testing.assert_array_equal(group_padded_sizes(sizes, 8), [[160, 128]] * 5)
    with pytest.raises(ValueError, match="train_padding_group"):
        model_config(train_padding_group=0)


@pytest.mark.slow
def test_batch_wide_mask_budget_matches_torchvision():
    """`mask_rois_per_batch`: the positives of both images packed into one budget. Exactly as
    many slots as positives gives torchvision's mask loss; one slot fewer drops a positive and
    changes it (so the comparison can fail)."""
    setup = loss_parity.build()
    with torch.no_grad():
        reference = float(loss_parity.torch_losses(setup)["loss_mask"])

    def model(budget):
        return MaskRCNN(frozen({**setup["config"].to_dict(), "mask_rois_per_batch": budget}))

    positives = None
    results = {}
    for budget in ("exact", "one short"):
        if positives is None:  # count them with a generous budget first
            outputs = jax.jit(lambda v, b, k: model(2 * MASK_ROIS).apply(
                v, b["images"], b["image_sizes"], b["padded_sizes"],
                {n: b[n] for n in ("boxes", "labels", "valid", "masks")}, k, train=True))(
                    setup["variables"], setup["jax_batch"], jax.random.PRNGKey(0))
            positives = int(outputs["mask_rois"]["valid"].sum())
            assert outputs["mask_logits"].shape[:2] == (1, 2 * MASK_ROIS)
        size = positives if budget == "exact" else positives - 1
        _, (losses, _) = jax.jit(lambda v, b, k, n=size: compute_losses(model(n), v, b, k))(
            setup["variables"], setup["jax_batch"], jax.random.PRNGKey(0))
        results[budget] = float(losses["loss_mask"])
    print(f"positives {positives}; loss_mask torchvision {reference:.7f}, packed exact "
          f"{results['exact']:.7f}, one short {results['one short']:.7f}")
    assert abs(results["exact"] - reference) <= RTOL * reference
    # Dropping one of ~24 near-equal per-RoI losses moves the mean by ~4e-4 relative: far more
    # than the packed budget's own error (float32 summation order, ~1e-7).
    exact_error = max(abs(results["exact"] - reference), 1e-6 * reference)
    assert abs(results["one short"] - reference) > 10 * exact_error


def test_total_is_sum(parity):
    np.testing.assert_allclose(parity["total"], sum(parity["jax"][n] for n in LOSS_NAMES),
                               rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Tiny model: empty images, gradients, crops path, random sampling
# --------------------------------------------------------------------------------------------

TINY_CANVAS = (96, 96)
TINY_SIZES = np.asarray([[64, 96], [96, 80]], np.int32)
TINY_PADDED = np.asarray([[64, 96], [96, 96]], np.int32)
CROP_SIZE = 56
# Few mask-head RoIs: the gradient of the mask predictor's transposed conv is slow on XLA:CPU.
TINY_MASK_ROIS = 2


def _crops(masks, boxes):
    """`(G, CROP_SIZE, CROP_SIZE)` crops of `(G, H, W)` masks on their boxes, as the input
    pipeline makes them (not resized: identity row / column maps)."""
    _, height, width = masks.shape
    return crop_resized_masks(masks, np.arange(height), np.arange(width), boxes, CROP_SIZE)


@pytest.fixture(scope="module")
def tiny():
    """Tiny-backbone model, a 2-image batch with crops (the input pipeline's format), and a
    jitted `value_and_grad` of `compute_losses` w.r.t. the params."""
    config = model_config(
        backbone="tiny", num_classes=3, min_size=64, max_size=96, canvas_size=TINY_CANVAS,
        rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
        rpn_batch_size_per_image=64, box_batch_size_per_image=64,
        mask_rois_per_image=TINY_MASK_ROIS)
    model = MaskRCNN(frozen(config))
    images = np.random.default_rng(0).normal(size=(2, *TINY_CANVAS, 3)).astype(np.float32)
    for b, (h, w) in enumerate(TINY_PADDED):
        images[b, h:] = 0
        images[b, :, w:] = 0

    def init_all(m, x, padded):
        fpn = m.features(x, padded)
        m.rpn_head(fpn)
        m.box_outputs(jnp.zeros((1, 1, 7, 7, 256)))
        m.mask_logits(jnp.zeros((1, 1, 14, 14, 256)))

    variables = jax.jit(lambda k, x, p: model.init(k, x, p, method=init_all))(
        jax.random.PRNGKey(0), images, TINY_PADDED)
    objects = [[(30, 25, 20, 15), (70, 40, 22, 20)], [(40, 60, 30, 25)]]
    masks, boxes, valid = zip(*[
        ellipse_objects(TINY_CANVAS, size, obj, 3) for size, obj in zip(TINY_SIZES, objects)])
    boxes = np.stack(boxes)
    crops = np.stack([_crops(m, b) for m, b in zip(masks, boxes)])
    batch = dict(images=images, image_sizes=TINY_SIZES, padded_sizes=TINY_PADDED, boxes=boxes,
                 labels=np.asarray([[1, 2, 0], [2, 0, 0]], np.int32), valid=np.stack(valid),
                 masks=np.asarray(crops))

    def loss(params, batch, key):
        total, (losses, _) = compute_losses(model, {**variables, "params": params}, batch, key)
        return total, losses

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return dict(model=model, variables=variables, batch=batch, grad_fn=grad_fn)


def _check_finite(losses, grads):
    for name in LOSS_NAMES:
        assert np.isfinite(float(losses[name])), name
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    return max(float(jnp.max(jnp.abs(g))) for g in leaves)


@pytest.mark.slow
def test_gradients_finite_without_objects(tiny):
    batch = dict(tiny["batch"], valid=np.zeros_like(tiny["batch"]["valid"]))
    (total, losses), grads = tiny["grad_fn"](tiny["variables"]["params"], batch, jax.random.PRNGKey(1))
    assert _check_finite(losses, grads) > 0  # the classifier / objectness still train
    assert np.isfinite(float(total))
    # No positive anywhere: no regression or mask loss (torchvision: 0 and `mask_logits.sum() * 0`).
    for name in ("loss_rpn_box_reg", "loss_box_reg", "loss_mask"):
        assert float(losses[name]) == 0.0
    assert float(losses["loss_objectness"]) > 0 and float(losses["loss_classifier"]) > 0
    assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads["mask_predictor"]))


@pytest.mark.slow
def test_gradients_finite_mixed_batch(tiny):
    # Image 0 without objects, image 1 with one; different keys sample differently.
    valid = tiny["batch"]["valid"].copy()
    valid[0] = False
    batch = dict(tiny["batch"], valid=valid)
    params = tiny["variables"]["params"]
    (total, losses), grads = tiny["grad_fn"](params, batch, jax.random.PRNGKey(2))
    _check_finite(losses, grads)
    for name in LOSS_NAMES:
        assert float(losses[name]) > 0, name
    assert any(np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads["mask_predictor"]))
    (again, _), _ = tiny["grad_fn"](params, batch, jax.random.PRNGKey(2))
    (other, _), _ = tiny["grad_fn"](params, batch, jax.random.PRNGKey(3))
    assert float(again) == float(total)
    assert float(other) != float(total)  # 64 of ~6000 anchors / ~100 RoIs: the key matters


def test_mask_budget_metrics_count_the_dropped_positives(tiny):
    """`mask_positives` / `_max` / `_dropped` (logged by train.py): the sampled positives per
    image and those beyond the `mask_rois_per_image` slots (TINY_MASK_ROIS = 2 here), checked
    against the RoI targets' own positives."""
    from maskrcnn_jax.training.losses import mask_budget_metrics

    model, variables, batch = tiny["model"], tiny["variables"], tiny["batch"]
    outputs, _ = jax.jit(lambda v, b, k: model.apply(
        v, b["images"], b["image_sizes"], b["padded_sizes"],
        {n: b[n] for n in ("boxes", "labels", "valid", "masks")}, k, train=True,
        mutable=["batch_stats"]))(variables, batch, jax.random.PRNGKey(1))
    positives = np.asarray(outputs["roi_targets"]["positive"]).sum(axis=1)
    assert positives.max() > TINY_MASK_ROIS  # the budget binds: something to count
    metrics = {k: float(v) for k, v in mask_budget_metrics(outputs).items()}
    assert metrics["mask_positives"] == positives.mean()
    assert metrics["mask_positives_max"] == positives.max()
    assert metrics["mask_positives_dropped"] == (positives - np.minimum(positives,
                                                                         TINY_MASK_ROIS)).sum()


def test_mask_budget_follows_the_config_keys():
    """`mask_budget`: `mask_rois_per_batch`, then `mask_rois_per_image`, then the default
    `mask_budget_per_image` per image (a batch budget only when fewer than every positive),
    else every positive per image."""
    every = 512 // 4
    assert mask_budget(model_config(), 4) == (every, 64 * 4)
    assert mask_budget(model_config(mask_rois_per_batch=100), 4) == (every, 100)
    assert mask_budget(model_config(mask_rois_per_batch=100, mask_rois_per_image=8), 4) == (
        every, 100)
    assert mask_budget(model_config(mask_rois_per_image=8), 4) == (8, None)
    assert mask_budget(model_config(mask_budget_per_image=0), 4) == (every, None)
    assert mask_budget(model_config(mask_budget_per_image=every), 4) == (every, None)
    assert mask_budget(model_config(box_batch_size_per_image=64), 4) == (16, None)
    for key in ("mask_budget_per_image", "mask_rois_per_image", "mask_rois_per_batch"):
        with pytest.raises(ValueError, match=key):
            model_config(**{key: -1})


_TINY_TERMS = {}


def _tiny_terms(tiny, **overrides):
    """The loss terms of the `tiny` batch (key 1) with model config `overrides`, computed once
    per distinct overrides in this module (each is a compilation)."""
    key = tuple(sorted(overrides.items()))
    if key not in _TINY_TERMS:
        m = MaskRCNN(frozen({**tiny["model"].config.to_dict(), **overrides}))
        _, (terms, _) = jax.jit(lambda v, b, k: compute_losses(m, v, b, k))(
            tiny["variables"], tiny["batch"], jax.random.PRNGKey(1))
        _TINY_TERMS[key] = {k: float(v) for k, v in terms.items()}
    return _TINY_TERMS[key]


def _tiny_mask_logits_shape(tiny, **overrides):
    m = MaskRCNN(frozen({**tiny["model"].config.to_dict(), **overrides}))
    batch = tiny["batch"]
    outputs, _ = jax.eval_shape(lambda: m.apply(
        tiny["variables"], batch["images"], batch["image_sizes"], batch["padded_sizes"],
        {n: batch[n] for n in ("boxes", "labels", "valid", "masks")}, jax.random.PRNGKey(1),
        train=True, mutable=["batch_stats"]))
    return outputs["mask_logits"].shape


def test_default_mask_budget_packs_the_batch(tiny):
    """The default budget (`mask_budget_per_image` slots per image shared by the batch, no
    `mask_rois_per_image`): one packed set of that many slots per image; every positive, the
    per-image losses, while they fit; beyond, a sample (the mask loss changes) with the rest
    counted as dropped."""
    # Default 64 >= 16 possible positives per image (64 x 0.25): every positive, per image.
    every = _tiny_terms(tiny, mask_rois_per_image=None)
    assert _tiny_mask_logits_shape(tiny, mask_rois_per_image=None)[:2] == (2, 16)
    positives = int(round(2 * every["mask_positives"]))
    mean = (positives + 1) // 2
    assert mean < 16
    packed = _tiny_terms(tiny, mask_rois_per_image=None, mask_budget_per_image=mean)
    assert _tiny_mask_logits_shape(tiny, mask_rois_per_image=None,
                                   mask_budget_per_image=mean)[:2] == (1, 2 * mean)
    for name in LOSS_NAMES:
        np.testing.assert_allclose(packed[name], every[name], rtol=1e-6, err_msg=name)
    assert packed["mask_positives_dropped"] == 0
    short = _tiny_terms(tiny, mask_rois_per_image=None, mask_budget_per_image=mean - 1)
    assert short["mask_positives_dropped"] == positives - 2 * (mean - 1)
    assert short["loss_mask"] != every["loss_mask"]


@pytest.mark.slow
def test_crops_path_close_to_full_resolution():
    """Mask loss from pipeline crops vs from full-resolution masks, same RoIs and logits.

    RoIs: every gt box jittered (as positive proposals are: IoU >= 0.5 with their gt), in a
    256 x 320 image with objects of 20..200 px, one cut by the image border."""
    rng = np.random.default_rng(3)
    canvas, image_size = (256, 320), np.asarray([240, 300], np.int32)
    objects = [(60, 80, 45, 55), (285, 225, 40, 30), (150, 40, 12, 10), (180, 150, 100, 70)]
    masks, boxes, valid = ellipse_objects(canvas, image_size, objects, 5)
    num_rois = 64
    matched = rng.integers(0, 4, num_rois).astype(np.int32)
    size = boxes[matched, 2:] - boxes[matched, :2]
    jitter = rng.uniform(-0.12, 0.12, (num_rois, 4)) * np.concatenate([size, size], 1)
    roi_boxes = (boxes[matched] + jitter).astype(np.float32)
    roi_boxes = np.clip(roi_boxes, 0, np.tile(image_size[::-1], 2)).astype(np.float32)
    rois = dict(boxes=roi_boxes, matched_idxs=matched, labels=np.ones(num_rois, np.int32),
                valid=np.arange(num_rois) < num_rois - 4)  # a few padded slots
    crops = _crops(masks, boxes)
    logits = rng.normal(0, 3, (1, num_rois, 28, 28, 2)).astype(np.float32)

    @functools.partial(jax.jit, static_argnums=4)
    def targets_and_loss(m, b, r, s, cropped):
        t = tg.mask_targets(m, b, r, s, 28, cropped)
        return t, mask_loss(logits, r["labels"][None], r["valid"][None], t[None])

    full_t, full_loss = targets_and_loss(masks, boxes, rois, image_size, False)
    crop_t, crop_loss = targets_and_loss(crops, boxes, rois, image_size, True)
    full_t, crop_t = np.asarray(full_t), np.asarray(crop_t)
    keep = rois["valid"]
    mae = np.abs(full_t[keep] - crop_t[keep]).mean()
    rel = abs(float(crop_loss) - float(full_loss)) / float(full_loss)
    print(f"mask targets MAE {mae:.4f}; loss_mask full {float(full_loss):.5f} "
          f"crops {float(crop_loss):.5f} rel diff {rel:.2e}")
    assert not np.any(full_t[~keep]) and not np.any(crop_t[~keep])
    assert full_t[keep].max() > 0.999 and 0.2 < full_t[keep].mean() < 0.9
    assert mae <= 0.02
    assert rel <= 5e-3


def test_full_resolution_targets_match_torchvision_at_image_border():
    """Canvas-sized masks (zero beyond the image) give torchvision's targets for masks of the
    image's own size, also where an object is cut by the image border."""
    from torchvision.ops import roi_align

    canvas, image_size = (96, 128), (70, 90)
    masks, boxes, _ = ellipse_objects(canvas, image_size, [(80, 60, 20, 15), (30, 30, 20, 25)], 2)
    rois = dict(boxes=np.asarray([[60, 45, 90, 70], [65.5, 50.2, 89.7, 69.9], [10, 5, 50, 56]],
                                 np.float32),
                matched_idxs=np.asarray([0, 0, 1], np.int32), labels=np.ones(3, np.int32),
                valid=np.ones(3, bool))
    targets = jax.jit(lambda m, b, r, s: tg.mask_targets(m, b, r, s, 28, False))
    ours = targets(masks, boxes, rois, np.asarray(image_size, np.int32))
    own_size = torch.from_numpy(masks[:, :image_size[0], :image_size[1]].astype(np.float32))
    idx = torch.from_numpy(rois["matched_idxs"].astype(np.float32))[:, None]
    theirs = roi_align(own_size[:, None], torch.cat([idx, torch.from_numpy(rois["boxes"])], 1),
                       (28, 28), 1.0)[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5, rtol=0)
    # Without the border extension the zero padding beyond the image would leak in.
    plain = targets(masks, boxes, rois, np.asarray(canvas, np.int32))
    assert np.abs(np.asarray(plain)[:2] - theirs[:2]).max() > 0.05


# --------------------------------------------------------------------------------------------
# Targets directly: validity masks, sample counts (jit + vmap)
# --------------------------------------------------------------------------------------------


def test_rpn_targets_validity_and_counts():
    rng = np.random.default_rng(7)
    n = 500
    xy = rng.uniform(0, 80, (2, n, 2)).astype(np.float32)
    anchors = np.concatenate([xy, xy + rng.uniform(8, 40, (2, n, 2)).astype(np.float32)], -1)
    anchor_valid = rng.uniform(size=(2, n)) < 0.8
    gt = np.asarray([[[10, 10, 40, 40], [50, 50, 90, 80], [0, 0, 0, 0]]] * 2, np.float32)
    gt_valid = np.asarray([[True, True, False], [False, False, False]])
    fn = jax.jit(jax.vmap(functools.partial(
        tg.rpn_targets, batch_size_per_image=64, positive_fraction=0.5,
        fg_iou_thresh=0.7, bg_iou_thresh=0.3)))
    out = jax.device_get(fn(anchors, anchor_valid, gt, gt_valid, jax.random.split(jax.random.PRNGKey(0), 2)))
    labels, sampled, positive = out["labels"], out["sampled"], out["positive"]
    assert np.all(labels[~anchor_valid] == -1) and not np.any(sampled[~anchor_valid])
    assert np.all(labels[1][anchor_valid[1]] == 0)  # no gt: all background
    for b in range(2):
        num_pos = min(int((labels[b] == 1).sum()), 32)
        assert positive[b].sum() == num_pos and np.all(labels[b][positive[b]] == 1)
        assert sampled[b].sum() == num_pos + min(int((labels[b] == 0).sum()), 64 - num_pos)
        assert np.all(labels[b][sampled[b] & ~positive[b]] == 0)
        assert not np.any(out["box_targets"][b][~(labels[b] == 1)])
    assert positive[0].sum() >= 2  # low-quality matches give each gt an anchor


def test_roi_targets_labels_and_positive_rois():
    rng = np.random.default_rng(8)
    p = 60
    xy = rng.uniform(0, 60, (p, 2)).astype(np.float32)
    proposals = np.concatenate([xy, xy + rng.uniform(10, 40, (p, 2)).astype(np.float32)], -1)
    proposal_valid = np.arange(p) < 50
    gt = np.asarray([[10, 10, 40, 40], [30, 20, 70, 60], [0, 0, 0, 0]], np.float32)
    gt_labels = np.asarray([2, 1, 0], np.int32)
    gt_valid = np.asarray([True, True, False])
    fn = jax.jit(functools.partial(
        tg.roi_targets, batch_size_per_image=32, positive_fraction=0.25, fg_iou_thresh=0.5,
        bg_iou_thresh=0.5, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0)))
    out = jax.device_get(fn(proposals, proposal_valid, gt, gt_labels, gt_valid, jax.random.PRNGKey(0)))
    # NumPy reference of the labels of every candidate (proposals + valid gt).
    cand = np.concatenate([proposals[proposal_valid], gt[gt_valid]]).astype(np.float64)
    g = gt[gt_valid].astype(np.float64)
    lt = np.maximum(g[:, None, :2], cand[None, :, :2])
    rb = np.minimum(g[:, None, 2:], cand[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    iou = inter / (area(g)[:, None] + area(cand)[None] - inter)
    ref_labels = np.where(iou.max(0) >= 0.5, gt_labels[gt_valid][iou.argmax(0)], 0)
    num_pos = min(int((ref_labels > 0).sum()), 8)
    assert out["positive"].sum() == num_pos and np.all(out["positive"][:num_pos])
    assert out["valid"].sum() == num_pos + min(int((ref_labels == 0).sum()), 32 - num_pos)
    assert np.all(out["labels"][:num_pos] > 0) and not np.any(out["labels"][num_pos:])
    assert not np.any(out["boxes"][~out["valid"]])
    # Every sampled RoI is a valid candidate, and positives' targets decode back onto their gt.
    sampled = zip(out["boxes"][out["valid"]], out["labels"], out["matched_idxs"], out["positive"],
                  out["box_targets"])
    for box, label, matched, pos, deltas in sampled:
        assert np.any(np.all(np.isclose(cand, box), -1))
        if pos:
            assert gt_labels[matched] == label and gt_valid[matched]
            decoded = decode_boxes(deltas[None], box[None], (10.0, 10.0, 5.0, 5.0))
            np.testing.assert_allclose(decoded[0], gt[matched], atol=1e-3)
        else:
            assert not np.any(deltas)
    rois = tg.positive_rois(out, 12)
    assert rois["valid"].sum() == num_pos and rois["boxes"].shape == (12, 4)


def test_packed_mask_budget_keeps_all_positives_when_they_fit():
    """`pack_positive_rois` with room for every positive: each one kept once, with its own
    image index and mask target (checked entry by entry against the inputs)."""
    rng = np.random.default_rng(3)
    g, d, m = 3, 6, 4
    valid = rng.random((g, d)) < 0.5
    rois = {"boxes": rng.normal(size=(g, d, 4)).astype(np.float32),
            "labels": rng.integers(1, 5, (g, d)).astype(np.int32),
            "matched_idxs": rng.integers(0, 3, (g, d)).astype(np.int32), "valid": valid}
    targets = rng.random((g, d, m, m)).astype(np.float32)
    for budget in (int(valid.sum()), g * d + 5):
        packed, packed_targets, image = jax.device_get(jax.jit(
            lambda r, t, k, n=budget: tg.pack_positive_rois(r, t, n, k))(
                rois, targets, jax.random.PRNGKey(0)))
        kept = packed["valid"]
        assert kept.shape == (budget,) and kept.sum() == valid.sum()
        expected = sorted((b, tuple(rois["boxes"][b, i])) for b, i in zip(*np.nonzero(valid)))
        assert sorted((int(b), tuple(x)) for b, x in zip(image[kept], packed["boxes"][kept])) \
            == expected
        for slot in np.nonzero(kept)[0]:
            b, i = image[slot], np.nonzero(np.all(rois["boxes"][image[slot]]
                                                  == packed["boxes"][slot], -1))[0][0]
            np.testing.assert_array_equal(packed_targets[slot], targets[b, i])
            assert packed["labels"][slot] == rois["labels"][b, i]


def test_packed_mask_budget_samples_positives_uniformly_across_the_batch():
    """Beyond the budget, every positive is kept with the same probability N / P whichever
    image holds it (3,000 draws; a budget filled in image order would keep the last image's
    positives never, and fails this)."""
    valid = np.zeros((2, 8), bool)
    valid[0, :6] = True  # 6 positives in the first image
    valid[1, :3] = True  # 3 in the second
    rois = {"boxes": np.arange(64, dtype=np.float32).reshape(2, 8, 4),
            "labels": np.ones((2, 8), np.int32), "matched_idxs": np.zeros((2, 8), np.int32),
            "valid": valid}
    targets = np.zeros((2, 8, 2, 2), np.float32)
    budget, draws = 4, 3000
    packed, _, image = jax.device_get(jax.jit(jax.vmap(
        lambda k: tg.pack_positive_rois(rois, targets, budget, k)))(
            jax.random.split(jax.random.PRNGKey(0), draws)))
    assert np.all(packed["valid"].sum(axis=1) == budget)
    # Which positive each slot holds: its first box coordinate / 4 is its flat position.
    held = packed["boxes"][..., 0].astype(int) // 4
    counts = np.bincount(held[packed["valid"]], minlength=16)
    assert not np.any(counts[~valid.reshape(-1)])  # only positives are kept
    rate = budget / valid.sum()
    sigma = np.sqrt(rate * (1 - rate) / draws)
    np.testing.assert_allclose(counts[valid.reshape(-1)] / draws, rate, atol=5 * sigma)
    assert np.all(np.diff(held, axis=1) > 0)  # kept entries stay in image order
    assert set(np.unique(image)) == {0, 1}


def test_grouped_mask_budget_equals_per_image_positives(tiny):
    """`mask_rois_per_batch` split into `mask_budget_groups` = 2 groups of 1 image (what
    train.py sets on 2 devices): with room for every positive, the losses equal those of the
    per-image budget keeping every positive; one slot per image fewer than the busiest image's
    positives drops some, counted by `mask_positives_dropped`."""
    every = _tiny_terms(tiny, mask_rois_per_image=None)
    most = int(every["mask_positives_max"])
    assert most >= 2 and every["mask_positives_dropped"] == 0
    grouped = _tiny_terms(tiny, mask_rois_per_batch=2 * most, mask_budget_groups=2)
    for name in LOSS_NAMES:
        np.testing.assert_allclose(grouped[name], every[name], rtol=1e-6, err_msg=name)
    short = _tiny_terms(tiny, mask_rois_per_batch=2 * (most - 1), mask_budget_groups=2)
    assert short["mask_positives_dropped"] >= 1
    assert short["loss_mask"] != every["loss_mask"]
