"""The main job (`configs/shapes.py`) with the field's from-scratch recipe: trainable batch norm
in the backbone (torchvision's ResNet without pretrained weights: BatchNorm2d, statistics over
the global batch) and large-scale jitter scaled to the shapes canvas (160 x 160 squares, scale
0.1-2.0, as torchvision's v2 recipe into 1024). Same steps, schedule and heads as the main job.

    python train.py --config=configs/shapes_bn_lsj.py --workdir=/tmp/shapes_bn_lsj

`tests/training/test_shapes_bn_lsj.py` (manual, ~45 minutes on 2 cores) trains it and the main
job and compares their mask AP.
"""

from configs import shapes


def get_config():
    config = shapes.get_config()
    config.model.backbone_norm = "batch_norm"
    config.model.batch_norm = "train"
    config.data.augmentation = "lsj"
    config.data.lsj_size = 160
    config.data.lsj_scale_range = (0.1, 2.0)
    return config
