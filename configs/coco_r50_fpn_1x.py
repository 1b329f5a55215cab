"""Mask R-CNN R50-FPN on COCO, torchvision's / detectron2's 1x recipe: the base config every
other config here derives from.

    python train.py --config=configs/coco_r50_fpn_1x.py --workdir=DIR \
        --config.data.manual_dir=/path/to/coco --config.init_backbone=/path/to/resnet50.pth

`manual_dir` holds `annotations/instances_{train,val}2017.json` and the `train2017/`, `val2017/`
image folders. `init_backbone`: a torchvision ImageNet ResNet-50 state dict (e.g.
`resnet50-0676ba61.pth`). Global batch 16 (2 images per device on 8 devices), lr 0.02, 90k steps
with decay at 60k and 80k, linear warmup over 1000 steps from 1/1000, weight decay 1e-4,
momentum 0.9, stem and layer1 frozen (torchvision's trainable_backbone_layers=3), as
torchvision's references/detection `train.py` defaults for `maskrcnn_resnet50_fpn`.
"""

import ml_collections

from maskrcnn_jax.config import model_settings


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Every keyword of `maskrcnn_jax.config.model_config` (torchvision's names and defaults).
    # No canvas_size: the canvas buckets of min_size / max_size (800x800, 800x1088, 1088x800,
    # 800x1344, 1344x800); each global batch is of one bucket (aspect-ratio grouping), one
    # compiled train step per bucket. The mask head's default budget: 64 RoIs per image shared
    # by each device's images (`model.mask_budget_per_image`), every positive while they fit, as
    # torchvision; `--config.model.mask_budget_per_image=0` reserves a slot for every possible
    # positive (128 per image).
    config.model = model_settings(backbone="resnet50", num_classes=91, min_size=800,
                                  max_size=1333)

    config.data = ml_collections.ConfigDict()
    config.data.name = "coco_instances"
    config.data.data_dir = "~/tensorflow_datasets"
    config.data.manual_dir = ""  # the COCO folder (coco_instances)
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    # The synthetic shapes set's options (data.name='shapes', configs/shapes.py).
    config.data.shapes = dict(num_train=1000, num_validation=200, seed=0)
    config.data.batch_size = 16  # global, over all devices and processes
    config.data.eval_batch_size = 8  # per device
    config.data.max_instances = 100  # ground-truth slots per image
    config.data.mask_crop_size = 112
    config.data.min_sizes = (800,)  # scale jitter when several; evaluation uses the last
    config.data.flip_probability = 0.5
    # Training augmentation: 'resize' (to min_sizes, as above: torchvision's default) or 'lsj'
    # (large-scale jitter into one lsj_size square: torchvision's v2 recipe, data/lsj.py).
    config.data.augmentation = "resize"
    config.data.lsj_size = 1024
    config.data.lsj_scale_range = (0.1, 2.0)
    config.data.worker_count = 8

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.02  # for reference_batch_size images, scaled linearly
    config.optimizer.reference_batch_size = 16
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.optimizer.b1 = 0.9  # adamw only
    config.optimizer.b2 = 0.999
    config.optimizer.warmup_steps = 1000
    config.optimizer.warmup_factor = 0.001
    config.optimizer.milestones = (60000, 80000)
    config.optimizer.gamma = 0.1
    config.optimizer.grad_clip_norm = 0.0  # 0: no clipping

    config.num_train_steps = 90000
    config.log_every_steps = 50
    config.checkpoint_every_steps = 2000
    config.keep_checkpoints = 3
    config.eval_every_steps = 10000  # 0: no evaluation during training
    config.final_eval = True  # COCO bbox/segm AP on the eval split at the end
    config.seed = 0
    config.init_backbone = ""  # torchvision ImageNet ResNet .pth to start the backbone from
    # A whole trained model to start from (fine-tuning): a converted checkpoint (convert.py), a
    # train.py workdir or a torchvision .pth; class-dependent layers are re-initialised when
    # num_classes differs (maskrcnn_jax.training.finetune).
    config.init_from = ""
    config.frozen_backbone_stages = 2  # 5 - torchvision's trainable_backbone_layers
    config.distributed = False  # jax.distributed.initialize() auto-detects a multi-host run
    return config
