"""A tiny randomly initialised model (the `tiny` backbone, 128x128 canvas) for fast tests."""

import numpy as np


def tiny_model(num_classes: int = 3, **overrides):
    """(model config, host variables) of a tiny Mask R-CNN with random weights (seed 0)."""
    import jax

    from maskrcnn_jax.config import model_config
    from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen

    kwargs = dict(backbone="tiny", num_classes=num_classes, min_size=96, max_size=128,
                  canvas_size=(128, 128), rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=30,
                  box_detections_per_img=10, box_score_thresh=0.0)
    config = model_config(**{**kwargs, **overrides})
    model = MaskRCNN(frozen(config))
    height, width = config.canvas_size
    images = np.zeros((1, height, width, 3), np.float32)
    sizes = np.array([[height, width]], np.int32)
    variables = model.init(jax.random.key(0), images, sizes, sizes)
    return config, jax.device_get(variables)
