"""Mask R-CNN R50-FPN on COCO, torchvision's / detectron2's 1x recipe.

    python train.py --config=configs/coco_r50_fpn_1x.py --workdir=DIR \
        --config.data.manual_dir=/path/to/coco --config.init_backbone=/path/to/resnet50.pth

`manual_dir` holds `annotations/instances_{train,val}2017.json` and the `train2017/`, `val2017/`
image folders. `init_backbone`: a torchvision ImageNet ResNet-50 state dict (e.g.
`resnet50-0676ba61.pth`). Global batch 16 (2 images per device on 8 devices), lr 0.02, 90k steps
with decay at 60k and 80k, linear warmup over 1000 steps from 1/1000, weight decay 1e-4,
momentum 0.9, stem and layer1 frozen (torchvision's trainable_backbone_layers=3).
"""

from configs import shapes


def get_config():
    config = shapes.get_config()
    config.model = dict(
        backbone="resnet50",
        num_classes=91,
        min_size=800,
        max_size=1333,
        # No canvas_size: the canvas buckets of min_size / max_size (800x800, 800x1088,
        # 1088x800, 800x1344, 1344x800); each global batch is of one bucket (aspect-ratio
        # grouping), one compiled train step per bucket, where one 1344x1344 canvas would
        # convolve ~1.7x the pixels.
        compute_dtype="float32",
    )
    config.data.name = "coco_instances"
    config.data.data_dir = "~/tensorflow_datasets"
    config.data.manual_dir = ""
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.batch_size = 16
    config.data.eval_batch_size = 8
    config.data.max_instances = 100
    config.data.mask_crop_size = 112
    config.data.min_sizes = (800,)
    config.data.worker_count = 8

    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.02
    config.optimizer.reference_batch_size = 16
    config.optimizer.warmup_steps = 1000
    config.optimizer.warmup_factor = 0.001
    config.optimizer.milestones = (60000, 80000)
    config.optimizer.gamma = 0.1
    config.optimizer.grad_clip_norm = 0.0

    config.num_train_steps = 90000
    config.mask_rois_per_image = None
    config.log_every_steps = 50
    config.checkpoint_every_steps = 2000
    config.keep_checkpoints = 3
    config.eval_every_steps = 10000
    config.frozen_backbone_stages = 2
    return config
