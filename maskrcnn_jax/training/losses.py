"""Mask R-CNN training losses with torchvision's assignment and normalisation, in static shapes.

The losses are pure functions of the training outputs of `MaskRCNN.__call__(..., train=True)`
(head outputs with their targets from `maskrcnn_jax.layers.targets`): `maskrcnn_losses(outputs)`.
`compute_losses(model, variables, batch, key)` applies the model in training mode and returns
them: torchvision's `MaskRCNN.forward` in training mode (models/detection/rpn.py `compute_loss`,
roi_heads.py `fastrcnn_loss`, `maskrcnn_loss`), for a batch already in the model's canvas. The
losses normalise over the whole batch as torchvision does:
  * `loss_objectness`: BCE-with-logits, mean over all sampled anchors of the batch;
  * `loss_rpn_box_reg`: smooth-L1 (beta 1/9) summed over sampled positive anchors / number of
    sampled anchors of the batch;
  * `loss_classifier`: cross-entropy, mean over all sampled RoIs of the batch;
  * `loss_box_reg`: smooth-L1 (beta 1/9) of the gt-class deltas summed over positive RoIs /
    number of sampled RoIs of the batch;
  * `loss_mask`: BCE-with-logits of the gt-class mask logits, mean over all pixels of all
    positive RoIs of the batch; 0 (with zero, finite gradients) when there is none.
Padded / invalid entries enter every sum with weight 0 (never as NaN: see `_masked_sum`).
"""

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")


def smooth_l1(diff: jnp.ndarray, beta: float) -> jnp.ndarray:
    """Elementwise `F.smooth_l1_loss(reduction='none')` of `input - target = diff`."""
    abs_diff = jnp.abs(diff)
    return jnp.where(abs_diff < beta, 0.5 * diff * diff / beta, abs_diff - 0.5 * beta)


def bce_with_logits(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Elementwise `F.binary_cross_entropy_with_logits(reduction='none')`, stable form."""
    return jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def _masked_sum(values: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Sum of `values` where `mask`; `where` (not a product) so masked infs/NaNs cannot leak."""
    return jnp.sum(jnp.where(mask, values, 0.0))


def _mean_over(total: jnp.ndarray, count: jnp.ndarray) -> jnp.ndarray:
    # torchvision divides by the count; a count of 0 (nothing sampled) would give NaN there,
    # here a loss of 0 (the numerator is then 0 too).
    return total / jnp.maximum(count, 1).astype(jnp.float32)


def rpn_losses(objectness, deltas, targets) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """`RegionProposalNetwork.compute_loss` over the batch.

    Args:
      objectness: `(B, N)` float logits of all anchors (levels concatenated).
      deltas: `(B, N, 4)` float predicted deltas.
      targets: `rpn_targets` outputs stacked over the batch (`labels`, `sampled`, `positive`,
        `box_targets`, each with a leading B).

    Returns:
      (loss_objectness, loss_rpn_box_reg) float32 scalars.
    """
    sampled, positive = targets["sampled"], targets["positive"]
    num_sampled = jnp.sum(sampled)
    bce = bce_with_logits(objectness.astype(jnp.float32), jnp.maximum(targets["labels"], 0.0))
    loss_objectness = _mean_over(_masked_sum(bce, sampled), num_sampled)
    l1 = smooth_l1(deltas.astype(jnp.float32) - targets["box_targets"], 1.0 / 9).sum(-1)
    loss_box = _mean_over(_masked_sum(l1, positive), num_sampled)
    return loss_objectness, loss_box


def fastrcnn_losses(class_logits, box_regression, targets) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """`fastrcnn_loss` over the batch.

    Args:
      class_logits: `(B, S, K)` float logits of the sampled RoIs.
      box_regression: `(B, S, 4K)` float class-specific deltas.
      targets: `roi_targets` outputs stacked over the batch (`labels`, `valid`, `positive`,
        `box_targets`).

    Returns:
      (loss_classifier, loss_box_reg) float32 scalars.
    """
    valid, positive, labels = targets["valid"], targets["positive"], targets["labels"]
    num_sampled = jnp.sum(valid)
    log_probs = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    loss_classifier = _mean_over(_masked_sum(nll, valid), num_sampled)
    b, s = labels.shape
    per_class = box_regression.astype(jnp.float32).reshape(b, s, -1, 4)
    chosen = jnp.take_along_axis(per_class, labels[..., None, None], axis=2)[:, :, 0]
    l1 = smooth_l1(chosen - targets["box_targets"], 1.0 / 9).sum(-1)
    loss_box = _mean_over(_masked_sum(l1, positive), num_sampled)
    return loss_classifier, loss_box


def mask_loss(mask_logits, labels, valid, mask_targets) -> jnp.ndarray:
    """`maskrcnn_loss` over the batch.

    Args:
      mask_logits: `(B, D, M, M, K)` float logits of the positive RoIs.
      labels: `(B, D)` int32 gt class of each RoI.
      valid: `(B, D)` bool, False for padding slots.
      mask_targets: `(B, D, M, M)` float32 targets in [0, 1].

    Returns:
      float32 scalar: mean BCE over all valid RoIs' pixels; 0 when there is none.
    """
    chosen = jnp.take_along_axis(
        mask_logits.astype(jnp.float32), labels[:, :, None, None, None], axis=-1)[..., 0]
    bce = bce_with_logits(chosen, mask_targets)
    pixels = valid[:, :, None, None] & jnp.ones(bce.shape, bool)
    return _mean_over(_masked_sum(bce, pixels), jnp.sum(pixels))


def maskrcnn_losses(outputs: Dict[str, Any]) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
    """The five torchvision losses of `MaskRCNN.__call__(..., train=True)`'s outputs.

    Args:
      outputs: the training-outputs dict (`objectness`, `rpn_deltas`, `rpn_targets`,
        `class_logits`, `box_regression`, `roi_targets`, `mask_logits`, `mask_rois`,
        `mask_targets`; see `MaskRCNN.training_outputs`).

    Returns:
      (total_loss, {name: loss}) with the names of `LOSS_NAMES`, float32 scalars; total_loss is
      their sum.
    """
    loss_objectness, loss_rpn_box_reg = rpn_losses(
        outputs["objectness"], outputs["rpn_deltas"], outputs["rpn_targets"])
    loss_classifier, loss_box_reg = fastrcnn_losses(
        outputs["class_logits"], outputs["box_regression"], outputs["roi_targets"])
    rois = outputs["mask_rois"]
    loss_mask = mask_loss(outputs["mask_logits"], rois["labels"], rois["valid"],
                          outputs["mask_targets"])
    losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg,
              "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg,
              "loss_mask": loss_mask}
    total = sum(losses[name] for name in LOSS_NAMES)
    return total, losses


def compute_losses(model, variables, batch: Dict[str, jnp.ndarray], key: jax.Array
                   ) -> Tuple[jnp.ndarray, Tuple[Dict[str, jnp.ndarray], Any]]:
    """Mask R-CNN training losses of a batch (torchvision's training forward), jit/grad-able:
    `jax.value_and_grad(compute_losses, has_aux=True)` with respect to `variables['params']`.

    Args:
      model: a `maskrcnn_jax.models.maskrcnn.MaskRCNN`; its `config` gives the sampling
        settings (`rpn_batch_size_per_image`, `rpn_positive_fraction`, `rpn_fg_iou_thresh`,
        `rpn_bg_iou_thresh`, `box_batch_size_per_image`, `box_positive_fraction`,
        `box_fg_iou_thresh`, `box_bg_iou_thresh`, `bbox_reg_weights`, `mask_size`, the RPN's
        train top-n), the mask head's static budget and gt mask format
        (`MaskRCNN.training_outputs`) and how batch norms train (`batch_norm`).
      variables: `{'params': ..., 'batch_stats': ...}`.
      batch: dict with `images (B, H, W, 3)` float32 canvas, `image_sizes`, `padded_sizes`
        `(B, 2)` int32, `boxes (B, G, 4)` float32 xyxy resized pixels, `labels (B, G)` int32
        `1..K-1`, `valid (B, G)` bool, `masks` `(B, G, S, S)` crops on the gt boxes or
        `(B, G, H, W)` canvas-sized full-resolution masks (any numeric dtype, 0/1).
      key: PRNG key; the only randomness (anchor and RoI sampling).

    Returns:
      `(total_loss, (terms, batch_stats))`: the sum of the five torchvision losses; `terms`, the
      five losses by name (`LOSS_NAMES`) and the mask budget's counts (`mask_budget_metrics`),
      float32 scalars; the `'batch_stats'` after the forward pass (batch norms in training
      update their running statistics, as torchvision's in train mode; others come back
      unchanged).
    """
    targets = {name: batch[name] for name in ("boxes", "labels", "valid", "masks")}
    outputs, updated = model.apply(variables, batch["images"], batch["image_sizes"],
                                   batch["padded_sizes"], targets, key, train=True,
                                   mutable=["batch_stats"])
    total, losses = maskrcnn_losses(outputs)
    terms = {**losses, **mask_budget_metrics(outputs)}
    return total, (terms, updated.get("batch_stats", variables.get("batch_stats", {})))


def mask_budget_metrics(outputs: Dict[str, Any]) -> Dict[str, jnp.ndarray]:
    """How the mask head's static budget met the batch's positives (training outputs):
    `mask_positives` the mean sampled positives per image, `mask_positives_max` the most in one
    image, `mask_positives_dropped` those of the batch beyond the budget (no mask loss), float32
    scalars. Positives dropped mean the budget binds: torchvision would have used them all."""
    positives = outputs["mask_positives"].astype(jnp.float32)
    return {"mask_positives": jnp.mean(positives), "mask_positives_max": jnp.max(positives),
            "mask_positives_dropped": jnp.sum(positives)
            - outputs["mask_rois_kept"].astype(jnp.float32)}
