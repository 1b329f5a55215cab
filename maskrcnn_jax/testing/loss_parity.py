"""Shared set-up of the training-loss parity tests (tests/training/test_losses.py,
tests/training/test_gradient_parity.py).

A torchvision Mask R-CNN (ResNet-50 FPN, FrozenBatchNorm2d as with loaded weights, stem and layer1
frozen as with `trainable_backbone_layers=3`, BN buffers and biases randomised, objectness /
classifier / mask logits sharpened so that every loss depends strongly on its targets) and its
`from_torchvision` conversion, with the same preprocessed images (`maskrcnn_jax.data.transform.
preprocess`; torchvision gets the same float tensor cropped to the two images' largest padded
size, its batch tensor, bypassing its transform which would resize again) and the same targets (boxes, labels,
full-resolution masks, one object cut by the image border). Sampling is made deterministic in
both by sample counts above the number of candidates and positive fraction 1 (every positive and
every negative is taken).
"""

import functools

import numpy as np

from maskrcnn_jax.testing.images import ellipse_image

PARITY_KWARGS = dict(
    num_classes=5, min_size=200, max_size=300,
    rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=1000, rpn_nms_thresh=0.9,
    # More than the 16125 anchors / 300 + G RoI candidates, fraction 1: all are sampled.
    rpn_batch_size_per_image=20000, rpn_positive_fraction=1.0,
    box_batch_size_per_image=1024, box_positive_fraction=1.0,
)
# Larger than the images' padded size (224, 288): anchors and features beyond it are invalid.
PARITY_CANVAS = (256, 320)
# Original sizes resizing to (200, 260) and (200, 263): both pad to (224, 288) as torchvision
# pads the batch, so its batch padding equals each image's own.
ORIGINAL_SHAPES = [(200, 260), (190, 250)]
MASK_ROIS = 32
# torchvision's `_resnet_fpn_extractor(body, TRAINABLE_LAYERS)`: conv1 and layer1 are frozen
# (requires_grad False), i.e. `frozen_backbone_stages = 5 - TRAINABLE_LAYERS` here.
TRAINABLE_LAYERS = 3


def image(rng, h, w):
    """A smooth uint8 RGB image with four bright ellipses."""
    return ellipse_image(rng, h, w, num_ellipses=4)


def ellipse_objects(canvas, image_size, ellipses, num_slots):
    """Masks `(num_slots, H, W)` uint8 of filled ellipses `(cx, cy, rx, ry)` cut to the image,
    their tight boxes (x2, y2 exclusive pixel edges) and validity; extra slots padded."""
    height, width = canvas
    h, w = image_size
    yy, xx = np.mgrid[:height, :width] + 0.5
    masks = np.zeros((num_slots, height, width), np.uint8)
    boxes = np.zeros((num_slots, 4), np.float32)
    for i, (cx, cy, rx, ry) in enumerate(ellipses):
        m = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1) & (yy < h) & (xx < w)
        ys, xs = np.nonzero(m)
        masks[i] = m
        boxes[i] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    valid = np.arange(num_slots) < len(ellipses)
    return masks, boxes, valid


def randomize(model, seed):
    """FrozenBN buffers to a non-identity affine map, non-zero biases, sharpened logits."""
    import torch

    from maskrcnn_jax.testing.torch_models import randomize_frozen_bn_and_biases

    with torch.no_grad():
        randomize_frozen_bn_and_biases(model, seed)
        # Randomised BN makes the features large: scale the predictors to O(1) logits, where
        # every loss depends on its targets, and RPN deltas small so that proposals stay near
        # the anchors (some overlap the gt at IoU >= 0.5 and become positive RoIs besides the
        # gt boxes).
        model.rpn.head.cls_logits.weight.mul_(0.3)
        model.rpn.head.bbox_pred.weight.mul_(0.01)
        model.rpn.head.bbox_pred.bias.mul_(0.01)
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.02)
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(0.003)


@functools.lru_cache(maxsize=2)
def build(backbone: str = "resnet50", original_shapes=tuple(ORIGINAL_SHAPES)):
    """The models and inputs of both sides, built once per process (shared by the test modules:
    callers must not modify them; `.grad` of the torch parameters excepted): torchvision's
    `maskrcnn_resnet50_fpn` (or another `backbone`) with FrozenBatchNorm2d and its conversion.

    `original_shapes`: the two images' sizes before resizing (default: both pad to (224, 288)).
    torchvision gets them as one batch tensor padded to their largest padded size, as its
    transform batches them (maskrcnn_jax: `train_padding_group` 2, the default).

    Returns a dict:
      torch_model: the torchvision MaskRCNN in train mode;
      config, variables: its `from_torchvision` conversion (NumPy leaves);
      jax_batch: the `compute_losses` batch (canvas images, full-resolution masks);
      image_list, torch_targets: torchvision's inputs after its transform (the same tensors).
    """
    import torch
    import torchvision
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops.misc import FrozenBatchNorm2d

    from maskrcnn_jax.data.transform import preprocess
    from maskrcnn_jax.torchvision.convert import from_torchvision

    kwargs = dict(PARITY_KWARGS)
    torch.manual_seed(0)
    body = getattr(torchvision.models, backbone)(weights=None, norm_layer=FrozenBatchNorm2d)
    torch_model = torchvision.models.detection.MaskRCNN(
        _resnet_fpn_extractor(body, TRAINABLE_LAYERS), **kwargs)
    randomize(torch_model, seed=1)
    # The torch model's norms are FrozenBatchNorm2d: ours frozen too (`batch_norm='frozen'`).
    config, variables = from_torchvision(
        torch_model.state_dict(), canvas_size=PARITY_CANVAS, batch_norm="frozen", **kwargs)

    rng = np.random.default_rng(0)
    batch = preprocess([image(rng, h, w) for h, w in original_shapes], config)
    objects = [
        # One ellipse cut by the bottom-right image border, one inside, one small.
        [(60, 80, 45, 55), (245, 185, 40, 30), (120, 40, 18, 15)],
        [(110, 110, 80, 70), (30, 25, 22, 18)],
    ]
    labels = np.asarray([[1, 4, 2], [3, 1, 0]], np.int32)
    masks, boxes, valid = zip(*[
        ellipse_objects(PARITY_CANVAS, size, obj, 3)
        for size, obj in zip(batch.image_sizes, objects)
    ])
    jax_batch = dict(images=batch.images, image_sizes=batch.image_sizes,
                     padded_sizes=batch.padded_sizes, boxes=np.stack(boxes),
                     labels=labels, valid=np.stack(valid), masks=np.stack(masks))

    # torchvision's training forward without its transform: the batch tensor is exactly the
    # region it would have padded to (the largest padded size of the two).
    ph, pw = batch.padded_sizes.max(axis=0)
    tensor = torch.from_numpy(np.ascontiguousarray(batch.images[:, :ph, :pw].transpose(0, 3, 1, 2)))
    image_list = ImageList(tensor, [tuple(int(v) for v in s) for s in batch.image_sizes])
    torch_targets = []
    for b, (h, w) in enumerate(batch.image_sizes):
        keep = jax_batch["valid"][b]
        torch_targets.append({
            "boxes": torch.from_numpy(jax_batch["boxes"][b][keep]),
            "labels": torch.from_numpy(labels[b][keep].astype(np.int64)),
            "masks": torch.from_numpy(jax_batch["masks"][b][keep][:, :h, :w]),
        })
    torch_model.train()
    return dict(torch_model=torch_model, config=config, variables=variables, batch=batch,
                jax_batch=jax_batch, image_list=image_list, torch_targets=torch_targets)


def torch_losses(setup):
    """torchvision's training losses `{name: scalar tensor}` (grad-enabled as the caller's
    context is): `MaskRCNN.forward` after its transform (backbone, rpn, roi_heads)."""
    m, image_list, targets = setup["torch_model"], setup["image_list"], setup["torch_targets"]
    features = m.backbone(image_list.tensors)
    proposals, losses = m.rpn(image_list, features, targets)
    _, roi_losses = m.roi_heads(features, proposals, image_list.image_sizes, targets)
    losses.update(roi_losses)
    return losses
