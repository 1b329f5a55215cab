"""Mask R-CNN on the synthetic `shapes` set: trains and evaluates on a 2-core CPU in ~20 minutes.

    python train.py --config=configs/shapes.py --workdir=/tmp/shapes_run

A ResNet-18 FPN from scratch (no pretrained weights, so nothing is frozen) on 96..160 px images
resized to a short side of 96..128 (long side <= 160) in a 160x160 canvas, with fewer proposals
and sampled RoIs than torchvision's defaults for speed. Override any value on the command line, e.g.
`--config.num_train_steps=100 --config.data.batch_size=4`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Keyword arguments of `maskrcnn_jax.config.model_config` (torchvision's names).
    config.model = dict(
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
    )

    config.data = ml_collections.ConfigDict()
    config.data.name = "shapes"
    config.data.data_dir = "~/tensorflow_datasets"
    config.data.manual_dir = ""  # coco_instances only
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.shapes = dict(num_train=1000, num_validation=200, seed=0)
    config.data.batch_size = 4  # global, over all devices and processes
    config.data.eval_batch_size = 8
    config.data.max_instances = 8
    config.data.mask_crop_size = 56
    config.data.min_sizes = (96, 112, 128)  # scale jitter; evaluation uses the last
    config.data.flip_probability = 0.5
    config.data.worker_count = 0

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.03  # for reference_batch_size images, scaled linearly
    config.optimizer.reference_batch_size = 4  # 0.03 at batch 4
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.optimizer.b1 = 0.9  # adamw only
    config.optimizer.b2 = 0.999
    config.optimizer.warmup_steps = 100
    config.optimizer.warmup_factor = 0.001
    config.optimizer.milestones = (1350,)
    config.optimizer.gamma = 0.1
    config.optimizer.grad_clip_norm = 10.0

    config.num_train_steps = 1600  # the README's main job: about 17 min on a 2-core CPU
    # Mask-head RoIs per image: box_batch_size_per_image * 0.25 = 16 would keep every positive,
    # as torchvision does (None means that bound). The head is ~30% of the step here, so keep a
    # random 8 of them (the sampler's positives come in random order): the images have <= 6
    # objects, and the saved time buys more steps.
    config.mask_rois_per_image = 8
    # Or a batch-wide budget: the positives of all images packed into this many mask-head RoIs
    # (exact while they fit; None: per image, as above).
    config.mask_rois_per_batch = None
    config.log_every_steps = 25
    config.checkpoint_every_steps = 50
    config.keep_checkpoints = 3
    config.eval_every_steps = 0  # 0: no evaluation during training
    config.final_eval = True  # COCO bbox/segm AP on the eval split at the end
    config.seed = 0
    config.init_backbone = ""  # torchvision ImageNet ResNet .pth to start the backbone from
    # A whole trained model to start from (fine-tuning): a converted checkpoint (convert.py), a
    # train.py workdir or a torchvision .pth; class-dependent layers are re-initialised when
    # num_classes differs (maskrcnn_jax.training.finetune).
    config.init_from = ""
    config.frozen_backbone_stages = 0  # 5 - torchvision's trainable_backbone_layers
    config.distributed = False  # jax.distributed.initialize() for multi-host runs
    return config
