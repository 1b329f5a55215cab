"""Fine-tune torchvision's COCO Mask R-CNN on your own COCO-format data (K classes).

    python convert.py maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --out=/ckpt/r50_v1 --frozen_bn_eps=0.0
    python train.py --config=configs/finetune.py --workdir=DIR --config.init_from=/ckpt/r50_v1 \
        --config.data.manual_dir=/path/to/data --config.model.num_classes=K+1

`--config=configs/finetune.py:v2` for `maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth` (converted
the same way, without `--frozen_bn_eps`). `manual_dir` holds `annotations/instances_{train,val}.json` with the images in
`train/` and `val/` (see `maskrcnn_jax.data.coco`). Every weight is loaded; with
`num_classes` != 91 the box predictor and the mask predictor's last layer start afresh, as
torchvision's fine-tuning tutorial does (`maskrcnn_jax.training.finetune`). Stem and layer1
stay frozen (torchvision's `trainable_backbone_layers=3`, its default with pretrained weights);
v2's batch norms train as torchvision's in train mode (synchronised over the global batch;
`--config.model.batch_norm=frozen` keeps COCO's statistics instead). SGD at lr 0.01 for a global batch of 8 (torchvision's
0.02 per 16), warm-up 100 steps, 4000 steps with a 10x decay at 3000: set `num_train_steps`
to a few epochs of your data.
"""

from configs import coco_r50_fpn_1x


def get_config(architecture: str = "v1"):
    if architecture not in ("v1", "v2"):
        raise ValueError(f"configs/finetune.py:ARCH takes v1 or v2, got {architecture!r}")
    config = coco_r50_fpn_1x.get_config()
    # The official v1 COCO_V1 weights run with FrozenBatchNorm2d of eps 0 (torchvision's
    # overwrite_eps); v2's norms are BatchNorm2d, trained in train mode as torchvision does when
    # it fine-tunes v2 (batch statistics, running statistics updated, in the frozen stages too).
    if architecture == "v1":
        config.model.update(architecture="v1", frozen_bn_eps=0.0)
    else:
        config.model.update(architecture="v2", backbone_norm="batch_norm", batch_norm="train")
    config.init_from = ""  # required: a converted checkpoint, a train.py workdir or a .pth
    config.init_backbone = ""
    config.frozen_backbone_stages = 2
    config.data.batch_size = 8
    config.data.worker_count = 4
    config.optimizer.learning_rate = 0.01
    config.optimizer.reference_batch_size = 8
    config.optimizer.warmup_steps = 100
    config.optimizer.milestones = (3000,)
    config.num_train_steps = 4000
    config.checkpoint_every_steps = 500
    config.eval_every_steps = 1000
    return config
