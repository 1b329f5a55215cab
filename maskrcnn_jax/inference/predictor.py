"""`Predictor`: images of any size in, torchvision-style detections out, one compiled function.

    predictor = Predictor(config, variables)
    outputs = predictor([image_a, image_b])   # uint8 (H, W, 3) arrays of any sizes

Images are resized and padded into the config's canvas on the host, run through one jitted
function in fixed-size batches, and mapped back to original-image pixels on the host, so any
image whose resized size fits the canvas reuses the same compiled function. A batch is split over
this process's devices (a `('data',)` mesh of as many of them as divide `batch_size`): on a host
with 4 devices, `batch_size=8` runs 2 images on each.

With `program_cache_dir` (what predict.py passes: its compilation cache folder), each canvas's
network is kept there as a serialized `jax.export` program, keyed by everything it depends on
(the config, the input shapes, the devices, jax's version and maskrcnn_jax's source code), so a
later process loads it instead of tracing and lowering the model again; with JAX's persistent
compilation cache the compiled program is loaded too. The check of the weights against the
config keeps its expected shapes there as well.
"""

import functools
from typing import Optional, Sequence

import numpy as np

from maskrcnn_jax import runtime
from maskrcnn_jax.inference.export import ProgramCache
from maskrcnn_jax.inference.runner import compiled_detector, detect_in_batches
from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen
from maskrcnn_jax.models.variables import check_variables


class Predictor:
    """Jit-compiled Mask R-CNN inference.

    Args:
      config: a model config (`maskrcnn_jax.config.model_config`, or from `from_torchvision`).
      variables: `{'params': ..., 'batch_stats': ...}` of `MaskRCNN(config)`.
      batch_size: images per compiled call; a shorter last batch is padded with blank images, so
        the batch size never changes the compiled shape. Split over
        `runtime.local_mesh(batch_size)`.
      devices: the devices to split batches over (default: this process's, `jax.local_devices`).

    Raises:
      ValueError: `variables` do not fit `config` (e.g. another class count), naming each
        differing parameter and both shapes.
    """

    def __init__(self, config, variables, batch_size: int = 1, devices=None,
                 program_cache_dir: Optional[str] = None):
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._programs = ProgramCache(program_cache_dir) if program_cache_dir else None
        check_variables(config, variables, expected=self._programs.variable_shapes(config)
                        if self._programs else None)
        self.config = frozen(config)
        self.model = MaskRCNN(self.config)
        self.mesh = runtime.local_mesh(self.batch_size, devices)
        self.variables = runtime.replicate(variables, self.mesh)
        self._forward = compiled_detector(self.config, self.mesh)

    def __call__(self, images: Sequence[np.ndarray], paste_masks: bool = True) -> list[dict]:
        """Detect objects in uint8 `(H, W, 3)` RGB images, taken as given (as torchvision: no
        EXIF orientation is applied to an array; `data.images.read_rgb(path,
        exif_transpose=True)` reads a file upright).

        Args:
          images: the images, any sizes.
          paste_masks: False: each detection's `mask_probs (M, M)` on its box instead of
            `masks` pasted into the full image (`runner.detect_in_batches`): what a large
            image needs (predict.py).

        Returns:
          One dict per image, as torchvision's `maskrcnn_resnet50_fpn` in eval mode:
          `boxes (N, 4)` float32 `(x1, y1, x2, y2)` in original-image pixels, `scores (N,)`
          float32 in decreasing order, `labels (N,)` int64 (1-based), `masks (N, 1, H, W)`
          float32 probabilities (or `mask_probs (N, M, M)`, see `paste_masks`).

        Raises:
          ImageError (a ValueError): naming the image's index, for a bad array or a size that
            fits no canvas.
        """
        forward = self._forward if self._programs is None else functools.partial(
            self._programs.run, self._forward, self.config, self.mesh)
        return detect_in_batches(images, self.config, self.batch_size, functools.partial(
            forward, self.variables), paste_masks=paste_masks)
