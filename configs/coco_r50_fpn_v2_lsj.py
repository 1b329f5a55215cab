"""torchvision's `maskrcnn_resnet50_fpn_v2` recipe (47.4 box / 41.8 mask AP on COCO val2017):
from scratch, synchronised batch norm everywhere, large-scale jitter, 400 epochs.

    python train.py --config=configs/coco_r50_fpn_v2_lsj.py --workdir=DIR \
        --config.data.manual_dir=/path/to/coco

As recorded for torchvision's v2 weights (pytorch/vision PR 5773; references/detection):
`train.py --model maskrcnn_resnet50_fpn_v2 --sync-bn --data-augmentation lsj --epochs 400
--lr 0.1 --lr-steps 352 384 --lr-gamma 0.1 --weight-decay 4e-5` on 32 GPUs x 2 images
(global batch 64), no backbone weights: every ResNet-50 stage trains (torchvision's
`trainable_backbone_layers` is 5 without pretrained weights) and every norm is BatchNorm2d in
train mode with statistics over the global batch (SyncBatchNorm). Large-scale jitter
(`data/lsj.py`): ScaleJitter to 1024x1024 at scale 0.1-2.0, FixedSizeCrop(1024) with the mean
colour as padding, horizontal flip; the 1024x1024 result is the image (torchvision's
`_skip_resize`), one compiled train step. Evaluation resizes to 800 / 1333 as torchvision
evaluates, in the default canvas buckets. Linear warm-up over 1000 steps from 1/1000 (the
reference's first epoch). Steps: 400 epochs of COCO train2017's 117,266 images with
annotations at 64 per step; milestones at epochs 352 and 384.
"""

import ml_collections

from configs import coco_r50_fpn_1x

TRAIN_IMAGES = 117266  # COCO train2017 images with annotations (torchvision's training set)


def epochs_to_steps(epochs: float, batch_size: int) -> int:
    return int(round(epochs * TRAIN_IMAGES / batch_size))


def get_config() -> ml_collections.ConfigDict:
    config = coco_r50_fpn_1x.get_config()
    config.model.update(architecture="v2", backbone_norm="batch_norm", batch_norm="train")
    config.frozen_backbone_stages = 0
    config.init_backbone = ""
    config.data.augmentation = "lsj"
    config.data.lsj_size = 1024
    config.data.lsj_scale_range = (0.1, 2.0)
    batch = 64
    config.data.batch_size = batch
    config.optimizer.learning_rate = 0.1
    config.optimizer.reference_batch_size = batch
    config.optimizer.weight_decay = 4e-5
    config.optimizer.warmup_steps = 1000
    config.optimizer.warmup_factor = 0.001
    config.optimizer.milestones = (epochs_to_steps(352, batch), epochs_to_steps(384, batch))
    config.num_train_steps = epochs_to_steps(400, batch)
    config.checkpoint_every_steps = 5000
    config.eval_every_steps = epochs_to_steps(20, batch)
    return config
