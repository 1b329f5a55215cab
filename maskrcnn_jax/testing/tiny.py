"""A tiny randomly initialised model (the `tiny` backbone, 128x128 canvas) for fast tests."""

import functools

import numpy as np


@functools.lru_cache(maxsize=8)
def _jitted_init(config):
    """One compiled `init` per (frozen) config: eager initialisation runs the whole forward
    op by op, which costs more than compiling it once."""
    import jax

    from maskrcnn_jax.models.maskrcnn import MaskRCNN

    return jax.jit(MaskRCNN(config).init)


def tiny_model(num_classes: int = 3, **overrides):
    """(model config, host variables) of a tiny Mask R-CNN with random weights (seed 0)."""
    import jax

    from maskrcnn_jax.config import model_config
    from maskrcnn_jax.models.maskrcnn import frozen

    kwargs = dict(backbone="tiny", num_classes=num_classes, min_size=96, max_size=128,
                  canvas_size=(128, 128), rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=30,
                  box_detections_per_img=10, box_score_thresh=0.0)
    config = model_config(**{**kwargs, **overrides})
    height, width = config.canvas_size
    images = np.zeros((1, height, width, 3), np.float32)
    sizes = np.array([[height, width]], np.int32)
    variables = _jitted_init(frozen(config))(jax.random.key(0), images, sizes, sizes)
    return config, jax.device_get(variables)
