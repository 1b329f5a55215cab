"""The main job (`configs/shapes.py`) with the field's from-scratch recipe: trainable batch norm
in the backbone (torchvision's ResNet without pretrained weights: BatchNorm2d, statistics over
the global batch) and large-scale jitter scaled to the shapes canvas (160 x 160 squares). Same
steps, schedule and heads as the main job.

The scale range is 0.5-2.0 (TF Model Garden's for ResNet), not torchvision's 0.1-2.0: the shapes
(15-90 px across) would shrink to 1.5-9 px at 0.1, far under the smallest anchor (32 px), and in
1,600 steps the region proposals never recover from it (measured: BENCHMARKS.md, "Batch norm +
large-scale jitter on the shapes set").

    python train.py --config=configs/shapes_bn_lsj.py --workdir=/tmp/shapes_bn_lsj

`tests/training/test_shapes_bn_lsj.py` (manual, ~45 minutes on 2 cores) trains it and the main
job and compares their mask AP. In the main job's 1,600 steps this recipe does not leave the
plateau every from-scratch run starts on, and neither does torchvision's own loop of it
(`python bench/train_agreement.py --recipe bn_lsj --sides torchvision --steps 1600`), while
batch norm alone and LSJ alone each leave it (BENCHMARKS.md, "Batch norm + large-scale jitter on
the shapes set: torchvision's loop").
"""

from configs import shapes


def get_config():
    config = shapes.get_config()
    config.model.backbone_norm = "batch_norm"
    config.model.batch_norm = "train"
    config.data.augmentation = "lsj"
    config.data.lsj_size = 160
    config.data.lsj_scale_range = (0.5, 2.0)
    return config
