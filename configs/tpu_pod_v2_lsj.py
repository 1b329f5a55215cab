"""torchvision's v2 recipe (`configs/coco_r50_fpn_v2_lsj.py`) on a TPU pod slice: global batch
256, bfloat16 compute, the learning rate scaled linearly (0.1 per 64 -> 0.4), the same 400
epochs and milestones (epochs 352 and 384) in steps of 256 images.

    python train.py --config=configs/tpu_pod_v2_lsj.py --workdir=gs://bucket/run \
        --config.data.manual_dir=/path/to/coco

Run the same command on every host. Batch-norm statistics are over the global batch of 256
(all devices of all hosts), as the recipe's SyncBatchNorm over its 64.
"""

from configs import coco_r50_fpn_v2_lsj


def get_config():
    config = coco_r50_fpn_v2_lsj.get_config()
    config.distributed = True
    config.model.compute_dtype = "bfloat16"
    batch = 256
    config.data.batch_size = batch
    config.data.worker_count = 16
    config.optimizer.reference_batch_size = 64  # lr 0.1 at 64, scaled linearly to 0.4
    steps = coco_r50_fpn_v2_lsj.epochs_to_steps
    config.optimizer.warmup_steps = 500
    config.optimizer.milestones = (steps(352, batch), steps(384, batch))
    config.num_train_steps = steps(400, batch)
    config.checkpoint_every_steps = 2000
    config.eval_every_steps = steps(20, batch)
    return config
