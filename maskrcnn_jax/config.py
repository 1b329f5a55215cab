"""Model configuration: torchvision's `maskrcnn_resnet50_fpn` keyword arguments and their defaults.

`model_config(**kwargs)` takes the keyword names of torchvision's `maskrcnn_resnet50_fpn` /
`MaskRCNN` / `FasterRCNN` constructors with the same defaults, plus the static-shape settings that
torchvision does not need (`canvas_size`, `box_pre_nms_top_n`, ...). The result is an
`ml_collections.ConfigDict` that is stored with checkpoints.
"""

from typing import Any

import ml_collections

from maskrcnn_jax.canvas import default_canvas_buckets, default_canvas_size

# torchvision's defaults (models/detection/faster_rcnn.py, mask_rcnn.py, rpn.py).
TORCHVISION_DEFAULTS: dict[str, Any] = dict(
    num_classes=91,
    min_size=800,
    max_size=1333,
    image_mean=(0.485, 0.456, 0.406),
    image_std=(0.229, 0.224, 0.225),
    rpn_pre_nms_top_n_train=2000,
    rpn_pre_nms_top_n_test=1000,
    rpn_post_nms_top_n_train=2000,
    rpn_post_nms_top_n_test=1000,
    rpn_nms_thresh=0.7,
    rpn_fg_iou_thresh=0.7,
    rpn_bg_iou_thresh=0.3,
    rpn_batch_size_per_image=256,
    rpn_positive_fraction=0.5,
    rpn_score_thresh=0.0,
    box_score_thresh=0.05,
    box_nms_thresh=0.5,
    box_detections_per_img=100,
    box_fg_iou_thresh=0.5,
    box_bg_iou_thresh=0.5,
    box_batch_size_per_image=512,
    box_positive_fraction=0.25,
    bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
)

# Settings of maskrcnn_jax that torchvision does not have.
STATIC_DEFAULTS: dict[str, Any] = dict(
    # torchvision's 'v1' (`maskrcnn_resnet50_fpn`) or 'v2' (`maskrcnn_resnet50_fpn_v2`: batch
    # norm in the FPN and heads, a 2-conv RPN head, `FastRCNNConvFCHead` as box head with
    # `fpn_channels`-wide convs and `box_representation_size` fc; norms frozen, see models.heads).
    architecture="v1",
    backbone="resnet50",
    # Backbone normalisation: torchvision's FrozenBatchNorm2d ('frozen_bn': pretrained v1
    # weights), its BatchNorm2d ('batch_norm': a ResNet built without pretrained weights, and
    # v2's) or 'group_norm' (trainable, masked to each image; does not convert to torchvision).
    backbone_norm="frozen_bn",
    # How torchvision's BatchNorm2d layers (a 'batch_norm' backbone; v2's FPN and heads) train:
    # 'train' as torchvision in train mode (batch statistics over the global batch, running
    # statistics updated: SyncBatchNorm), or 'frozen' (running statistics, never updated; the
    # affine map not trained, as FrozenBatchNorm2d).
    batch_norm="train",
    # eps of the backbone's FrozenBatchNorm2d: torchvision's default 1e-5, but torchvision's
    # weights builder for the official COCO_V1 checkpoint calls `overwrite_eps(model, 0.0)`, and
    # pretrained ResNets have near-dead channels (running_var ~1e-7) where 1e-5 vs 0 changes the
    # detections: convert that checkpoint with 0.0.
    frozen_bn_eps=1e-5,
    # Fixed (height, width) every resized image is padded into; None: a square of the largest
    # resized side rounded up to 32, so every image fits in either orientation.
    canvas_size=None,
    # Inference canvases ((height, width) multiples of 32): each image goes to the smallest that
    # holds it after resizing, one compiled function per canvas used. None: `canvas_size` alone
    # when it is given, else `default_canvas_buckets(min_size, max_size)`.
    canvas_buckets=None,
    size_divisible=32,
    # Per-class NMS of the detections runs on the top `box_pre_nms_top_n` (class, box) candidates
    # above `box_score_thresh`; torchvision keeps all of them (up to 1000 x 90).
    box_pre_nms_top_n=5000,
    rpn_min_size=1e-3,
    mask_size=28,
    compute_dtype="float32",
    # Head widths (torchvision's values; smaller ones make fast CPU configs, not convertible).
    fpn_channels=256,
    box_representation_size=1024,
    mask_head_layers=(256, 256, 256, 256),
    mask_dim_reduced=256,
    # Training only: the mask head's static RoI slots (`MaskRCNN.training_outputs`,
    # `models.maskrcnn.mask_budget`). torchvision's mask head takes every sampled positive RoI,
    # at most `box_batch_size_per_image * box_positive_fraction` (128) per image. The first set of
    #   mask_rois_per_batch: slots for the whole batch;
    #   mask_rois_per_image: slots per image (an image's positives beyond them are dropped);
    #   mask_budget_per_image (> 0, the default): a batch budget of this many slots per image
    #     (at most that 128), sized from torchvision's positives with a trained RPN
    #     (bench/train.py --trained; BENCHMARKS.md "Mask-head budget");
    #   none of them (mask_budget_per_image 0): a slot for every possible positive.
    # A batch budget is shared by `mask_budget_groups` groups of consecutive images (train.py:
    # one per device): each group keeps all its positives while they fit (torchvision's loss)
    # and a uniform sample of them beyond; train.py logs `mask_positives_dropped`.
    mask_budget_per_image=64,
    mask_rois_per_image=None,
    mask_rois_per_batch=None,
    mask_budget_groups=1,
    # Training only: images padded together, as torchvision pads each batch tensor (one per
    # GPU: 2 images in its reference recipe) to its largest image. Each group of this many
    # consecutive images of the global batch trains on the group's padded extent: anchors,
    # features and RoI pooling over it, the other images' padding being (easy) RPN negatives.
    # 1: each image as if alone (inference's semantics). With `backbone_norm="group_norm"` the
    # norms' region in training is the group's extent too.
    train_padding_group=2,
    # Ground-truth masks given as 'crops' on their boxes (the input pipeline's) or 'full'
    # canvas-sized masks; None decides by shape (masks the canvas size are full).
    gt_mask_format=None,
    # RoIAlign grid bound for full-resolution gt masks (None: exact; see targets.mask_targets).
    max_mask_sampling_grid=None,
)

ARCHITECTURES = ("v1", "v2")
BACKBONE_NORMS = ("frozen_bn", "batch_norm", "group_norm")
BATCH_NORM_MODES = ("train", "frozen")
GT_MASK_FORMATS = (None, "crops", "full")

_TORCHVISION_ONLY = {"weights", "progress", "weights_backbone", "trainable_backbone_layers"}


def model_config(**kwargs) -> ml_collections.ConfigDict:
    """A model config from torchvision keyword arguments (and maskrcnn_jax's static settings).

    Raises:
      TypeError: for a keyword neither torchvision's detector nor maskrcnn_jax knows.
    """
    unknown = set(kwargs) - set(TORCHVISION_DEFAULTS) - set(STATIC_DEFAULTS) - _TORCHVISION_ONLY
    if unknown:
        raise TypeError(f"model_config() got unknown keyword arguments: {sorted(unknown)}")
    values = {**TORCHVISION_DEFAULTS, **STATIC_DEFAULTS}
    values.update({k: v for k, v in kwargs.items() if k not in _TORCHVISION_ONLY})
    for key in ("image_mean", "image_std", "bbox_reg_weights"):
        values[key] = tuple(float(v) for v in values[key])
    values["mask_head_layers"] = tuple(int(v) for v in values["mask_head_layers"])
    if values["architecture"] not in ARCHITECTURES:
        raise ValueError(f"architecture {values['architecture']!r}: choose from {ARCHITECTURES}")
    for key, allowed in (("backbone_norm", BACKBONE_NORMS), ("batch_norm", BATCH_NORM_MODES)):
        if values[key] not in allowed:
            raise ValueError(f"{key} {values[key]!r}: choose from {allowed}")
    if values["gt_mask_format"] not in GT_MASK_FORMATS:
        raise ValueError(f"gt_mask_format {values['gt_mask_format']!r}: choose from "
                         f"{GT_MASK_FORMATS}")
    for key, least in (("mask_budget_per_image", 0), ("mask_rois_per_image", 1),
                       ("mask_rois_per_batch", 1)):
        if values[key] is not None and int(values[key]) < least:
            raise ValueError(f"{key} {values[key]} must be >= {least}")
    if int(values["train_padding_group"]) < 1:
        raise ValueError(f"train_padding_group {values['train_padding_group']} must be >= 1")
    values["frozen_bn_eps"] = float(values["frozen_bn_eps"])
    if values["frozen_bn_eps"] < 0:
        raise ValueError(f"frozen_bn_eps {values['frozen_bn_eps']} must be >= 0")
    if values["canvas_buckets"] is None:
        values["canvas_buckets"] = (
            (values["canvas_size"],) if values["canvas_size"] is not None else
            default_canvas_buckets(values["min_size"], values["max_size"],
                                   values["size_divisible"]))
    if values["canvas_size"] is None:
        values["canvas_size"] = default_canvas_size(values["min_size"], values["max_size"],
                                                    values["size_divisible"])
    values["canvas_size"] = tuple(int(v) for v in values["canvas_size"])
    values["canvas_buckets"] = tuple(sorted(
        {tuple(int(v) for v in b) for b in values["canvas_buckets"]}, key=lambda b: (b[0] * b[1], b)))
    for canvas in (values["canvas_size"], *values["canvas_buckets"]):
        if len(canvas) != 2 or canvas[0] % 32 or canvas[1] % 32:
            raise ValueError(f"canvas {canvas} must be (height, width), multiples of 32")
    return ml_collections.ConfigDict(values)


# Types of the keys whose default is None, so that a training config's `model` can hold them as
# typed placeholders that the command line can set (`--config.model.canvas_size='(512, 512)'`).
_NONE_DEFAULT_TYPES = {"canvas_size": tuple, "canvas_buckets": tuple, "mask_rois_per_image": int,
                       "mask_rois_per_batch": int, "gt_mask_format": str,
                       "max_mask_sampling_grid": int}


def model_settings(**kwargs) -> ml_collections.ConfigDict:
    """Every `model_config` keyword with its default, `kwargs` applied, as a training config's
    `model` field (`configs/`): each can be overridden on the command line
    (`--config.model.box_score_thresh=0.0`); keys whose value is None are typed placeholders.
    `model_config(**settings.to_dict())` makes the model config of it.

    Raises:
      TypeError: for a keyword `model_config` does not know.
    """
    model_config(**kwargs)  # the same checks
    values = {**TORCHVISION_DEFAULTS, **STATIC_DEFAULTS, **kwargs}
    return ml_collections.ConfigDict({
        k: ml_collections.config_dict.placeholder(_NONE_DEFAULT_TYPES[k]) if v is None else v
        for k, v in values.items()})
