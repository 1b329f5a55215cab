"""The COCO R50-FPN recipe on a TPU pod slice (multi-host): bf16 compute, global batch 256.

    python train.py --config=configs/tpu_pod.py --workdir=gs://bucket/run \
        --config.data.manual_dir=/path/to/coco --config.init_backbone=/path/to/resnet50.pth

Run the same command on every host. The learning rate scales linearly with the global batch
(0.02 per 16 images -> 0.32) with a longer warmup; steps shrink so the run sees the same number of
epochs as the 1x schedule (90k x 16 = 5,625 x 256).
"""

from configs import coco_r50_fpn_1x


def get_config():
    config = coco_r50_fpn_1x.get_config()
    config.distributed = True
    config.model["compute_dtype"] = "bfloat16"
    config.model["canvas_size"] = (1024, 1024)
    config.model["max_size"] = 1024
    config.data.batch_size = 256
    config.data.worker_count = 16
    config.optimizer.warmup_steps = 500
    config.optimizer.milestones = (3750, 5000)
    config.num_train_steps = 5625
    config.checkpoint_every_steps = 500
    config.eval_every_steps = 1000
    return config
