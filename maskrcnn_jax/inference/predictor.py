"""`Predictor`: images of any size in, torchvision-style detections out, one compiled function.

    predictor = Predictor(config, variables)
    outputs = predictor([image_a, image_b])   # uint8 (H, W, 3) arrays of any sizes

Images are resized and padded into the config's canvas on the host, run through one jitted
function in fixed-size batches, and mapped back to original-image pixels on the host, so any
image whose resized size fits the canvas reuses the same compiled function. A batch is split over
this process's devices (a `('data',)` mesh of as many of them as divide `batch_size`): on a host
with 4 devices, `batch_size=8` runs 2 images on each.
"""

import functools
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maskrcnn_jax.data.transform import detect_in_batches
from maskrcnn_jax.models.maskrcnn import MaskRCNN, check_variables, frozen


@functools.lru_cache(maxsize=8)
def _compiled_forward(config, mesh: Mesh):
    """One jitted network per (hashable, frozen) config and mesh, shared by every Predictor of
    them: variables replicated, images and detections split on 'data'."""
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(MaskRCNN(config).apply, in_shardings=(replicated, data, data, data),
                   out_shardings=data)


def local_mesh(batch_size: int, devices=None) -> Mesh:
    """A `('data',)` mesh of the most devices of `devices` (default this process's) that
    divides `batch_size` (batch 1: one device; 8 on 4 devices: all 4)."""
    devices = list(jax.local_devices() if devices is None else devices)
    count = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    return Mesh(np.asarray(devices[:count]), ("data",))


class Predictor:
    """Jit-compiled Mask R-CNN inference.

    Args:
      config: a model config (`maskrcnn_jax.config.model_config`, or from `from_torchvision`).
      variables: `{'params': ..., 'batch_stats': ...}` of `MaskRCNN(config)`.
      batch_size: images per compiled call; a shorter last batch is padded with blank images, so
        the batch size never changes the compiled shape. Split over `local_mesh(batch_size)`.
      devices: the devices to split batches over (default: this process's, `jax.local_devices`).

    Raises:
      ValueError: `variables` do not fit `config` (e.g. another class count), naming each
        differing parameter and both shapes.
    """

    def __init__(self, config, variables, batch_size: int = 1, devices=None):
        check_variables(config, variables)
        self.config = frozen(config)
        self.model = MaskRCNN(self.config)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.mesh = local_mesh(self.batch_size, devices)
        self.variables = jax.device_put(variables, NamedSharding(self.mesh, P()))
        self._forward = _compiled_forward(self.config, self.mesh)

    def __call__(self, images: Sequence[np.ndarray]) -> list[dict]:
        """Detect objects in uint8 `(H, W, 3)` RGB images.

        Returns:
          One dict per image, as torchvision's `maskrcnn_resnet50_fpn` in eval mode:
          `boxes (N, 4)` float32 `(x1, y1, x2, y2)` in original-image pixels, `scores (N,)`
          float32 in decreasing order, `labels (N,)` int64 (1-based), `masks (N, 1, H, W)`
          float32 probabilities.
        """
        return detect_in_batches(images, self.config, self.batch_size, functools.partial(
            self._forward, self.variables))
