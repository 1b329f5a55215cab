"""A tiny CPU training run for tests and smoke runs: the `tiny` backbone in a 64x64 canvas on a
16-image shapes set, batch 8, 20 steps, checkpoints every 2 steps, no final evaluation.

    python train.py --config=configs/tiny.py --workdir=DIR --config.data.data_dir=TFDS_DIR
"""

from configs import shapes


def get_config():
    config = shapes.get_config()
    config.model.update(dict(
        backbone="tiny", min_size=64, max_size=64, canvas_size=(64, 64),
        rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
        rpn_batch_size_per_image=64, box_batch_size_per_image=32, mask_rois_per_image=4))
    config.data.shapes = dict(num_train=16, num_validation=4, seed=0)
    config.data.batch_size = 8
    config.data.min_sizes = (56, 64)
    config.data.mask_crop_size = 28
    config.optimizer.warmup_steps = 2
    config.optimizer.milestones = ()  # no decay: the short runs of the tests take any length
    config.optimizer.learning_rate = 0.02  # at batch 8: independent of the shapes recipe
    config.optimizer.reference_batch_size = 8
    config.num_train_steps = 20
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.final_eval = False
    return config
