"""Mask R-CNN on the synthetic `shapes` set (the README's main job): trains and evaluates on a
2-core CPU in about 20 minutes. The COCO recipe (`configs/coco_r50_fpn_1x.py`) scaled down.

    python train.py --config=configs/shapes.py --workdir=/tmp/shapes_run

A ResNet-18 FPN from scratch (no pretrained weights, so nothing is frozen) on 96..160 px images
resized to a short side of 96..128 (long side <= 160) in a 160x160 canvas, with fewer proposals
and sampled RoIs than torchvision's defaults and narrower heads, for speed. Override any value
on the command line, e.g. `--config.num_train_steps=100 --config.optimizer.milestones=80` (the
learning-rate milestones must lie within the run: `maskrcnn_jax.training.config_checks`).
"""

import ml_collections

from configs import coco_r50_fpn_1x
from maskrcnn_jax.config import model_settings


def get_config() -> ml_collections.ConfigDict:
    config = coco_r50_fpn_1x.get_config()
    config.model = model_settings(
        backbone="resnet18",
        num_classes=5,  # 4 shapes + background
        min_size=128,
        max_size=160,
        canvas_size=(160, 160),
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=256,
        box_batch_size_per_image=64,
        box_detections_per_img=50,
        compute_dtype="float32",
        # Narrower heads than torchvision's (256 / 1024 / 4x256): the mask head dominates the
        # step time on a CPU.
        fpn_channels=128,
        box_representation_size=256,
        mask_head_layers=(128, 128),
        mask_dim_reduced=128,
        # Mask-head RoIs per image: box_batch_size_per_image * 0.25 = 16 would keep every
        # positive, as torchvision does. The images have <= 6 objects: keep a random 8 of the
        # positives (the sampler's come in random order), a cheaper mask head.
        mask_rois_per_image=8,
        # torchvision trains the batch of 4 as one padded tensor (one process, one device).
        train_padding_group=4,
    )

    config.data.name = "shapes"
    config.data.shapes = dict(num_train=1000, num_validation=200, seed=0)
    config.data.batch_size = 4
    config.data.eval_batch_size = 8
    config.data.max_instances = 8
    # Ground-truth masks as crops of the canvas size (160, the largest image side): the mask
    # targets equal torchvision's full-resolution ones. Smaller crops (e.g. 56) are cheaper but
    # blur the targets, and a from-scratch run leaves its plateau later (BENCHMARKS.md, "Whole-run
    # agreement with full-resolution mask targets").
    config.data.mask_crop_size = 160
    config.data.min_sizes = (96, 112, 128)
    config.data.worker_count = 0

    config.optimizer.learning_rate = 0.03
    config.optimizer.reference_batch_size = 4  # 0.03 at batch 4
    config.optimizer.warmup_steps = 100
    config.optimizer.milestones = (1350,)
    config.optimizer.grad_clip_norm = 10.0

    config.num_train_steps = 1600
    config.log_every_steps = 25
    config.checkpoint_every_steps = 50
    config.eval_every_steps = 0
    config.frozen_backbone_stages = 0  # from scratch: every stage trains
    return config
