"""The fine-tuning workflow end to end on the shapes set (`configs/shapes.py`'s model).

    # 1. a model that knows two of the four classes (circle, square)
    python train.py --config=configs/finetune_shapes.py:pretrain --workdir=/tmp/ft_pre
    # 2. saved in torchvision's format, as a COCO user's weights come
    python -c "import torch; from maskrcnn_jax import checkpoints; \
      from maskrcnn_jax.torchvision.convert import to_torchvision; \
      c, v, _ = checkpoints.load_weights('/tmp/ft_pre'); \
      torch.save(to_torchvision(c, v), '/tmp/ft_pre.pth')"
    # 3. all four classes from those weights (`init_from` converts the .pth), or from scratch
    python train.py --config=configs/finetune_shapes.py:finetune --workdir=/tmp/ft \
        --config.init_from=/tmp/ft_pre.pth
    python train.py --config=configs/finetune_shapes.py:scratch --workdir=/tmp/ft_scratch

`tests/training/test_finetune_shapes.py` runs these stages (about 20 minutes on a 2-core CPU, so
it is marked `manual`, outside the CI suite) and checks that the fine-tuned model's mask AP beats
the same schedule from scratch, and starts with a lower loss (figures in BENCHMARKS.md).
Fine-tuning freezes the stages torchvision freezes for pretrained weights
(`trainable_backbone_layers=3`: stem and layer1); pretraining and the from-scratch run freeze
nothing.
"""

from configs import shapes

STAGES = ("pretrain", "finetune", "scratch")
# The pretraining classes: the first two shapes (circle, square) of the four.
PRETRAIN_CLASSES = 2


def get_config(stage: str = "finetune"):
    if stage not in STAGES:
        raise ValueError(f"configs/finetune_shapes.py:STAGE takes one of {STAGES}, got {stage!r}")
    config = shapes.get_config()
    classes = PRETRAIN_CLASSES if stage == "pretrain" else 4
    config.model["num_classes"] = classes + 1
    config.data.shapes = dict(num_train=600, num_validation=64, seed=0, num_classes=classes)
    config.num_train_steps = 500 if stage == "pretrain" else 200
    config.optimizer.warmup_steps = config.num_train_steps // 10
    config.optimizer.milestones = (int(config.num_train_steps * 0.8),)
    config.checkpoint_every_steps = 100
    config.final_eval = True
    config.frozen_backbone_stages = 2 if stage == "finetune" else 0
    return config
