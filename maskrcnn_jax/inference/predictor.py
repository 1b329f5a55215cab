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

import collections
import functools
import hashlib
import json
import logging
import os
import weakref
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maskrcnn_jax.data.transform import detect_in_batches
from maskrcnn_jax.models.maskrcnn import MaskRCNN, check_variables, frozen

# Jitted networks by (config values, mesh): those a live Predictor holds, and the 8 most recent.
_LIVE_FORWARDS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_RECENT_FORWARDS: "collections.OrderedDict" = collections.OrderedDict()


def _compiled_forward(config, mesh: Mesh):
    """One jitted network per (frozen) config and mesh, shared by every Predictor of them while
    one is alive (and kept for the 8 most recent pairs even when none is): variables replicated,
    images and detections split on 'data'."""
    # Keyed by the config's values, not its hash: a FrozenConfigDict's hash follows its own
    # ConfigDict (`as_configdict()`, mutable), so a stored key's hash can change.
    key = (json.dumps(config.to_dict(), sort_keys=True, default=str), mesh)
    forward = _LIVE_FORWARDS.get(key)
    if forward is None:
        forward = _RECENT_FORWARDS.get(key)
    if forward is None:
        replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        forward = jax.jit(MaskRCNN(config).apply, in_shardings=(replicated, data, data, data),
                          out_shardings=data)
    _LIVE_FORWARDS[key] = _RECENT_FORWARDS[key] = forward
    _RECENT_FORWARDS.move_to_end(key)
    while len(_RECENT_FORWARDS) > 8:
        _RECENT_FORWARDS.popitem(last=False)
    return forward


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

    def __init__(self, config, variables, batch_size: int = 1, devices=None,
                 program_cache_dir: Optional[str] = None):
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._programs = _ProgramCache(program_cache_dir) if program_cache_dir else None
        check_variables(config, variables, expected=self._programs.variable_shapes(config)
                        if self._programs else None)
        self.config = frozen(config)
        self.model = MaskRCNN(self.config)
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
        forward = self._forward if self._programs is None else functools.partial(
            self._programs.run, self._forward, self.config, self.mesh)
        return detect_in_batches(images, self.config, self.batch_size, functools.partial(
            forward, self.variables))


log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 of maskrcnn_jax's Python sources: a cached program is only reused by this code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


class _ProgramCache:
    """Serialized `jax.export` programs (and variable shapes) in a folder, keyed by a digest
    of what they depend on; a file that cannot be read is replaced, with a warning."""

    def __init__(self, directory: str):
        self.directory = os.path.join(os.path.expanduser(directory), "maskrcnn_jax_programs")
        self._loaded: dict = {}

    def _path(self, kind: str, *parts) -> str:
        key = json.dumps([kind, jax.__version__, source_digest(), *parts], sort_keys=True,
                         default=str)
        return os.path.join(self.directory, f"{kind}-{hashlib.sha256(key.encode()).hexdigest()}")

    def _write(self, path: str, data: bytes):
        os.makedirs(self.directory, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one

    def variable_shapes(self, config) -> dict:
        from maskrcnn_jax.models.maskrcnn import variable_shapes

        path = self._path("shapes", config.to_dict())
        try:
            with open(path) as f:
                return {k: tuple(v) for k, v in json.load(f).items()}
        except (OSError, ValueError):
            shapes = variable_shapes(config)
            self._write(path, json.dumps(shapes).encode())
            return shapes

    def run(self, jitted, config, mesh, variables, images, image_sizes, padded_sizes):
        """`jitted(variables, images, ...)` through the cached program of these shapes."""
        args = (variables, images, image_sizes, padded_sizes)
        specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.result_type(x)), args)
        shapes = [(s.shape, str(s.dtype)) for s in jax.tree.leaves(specs)]
        devices = [(d.platform, d.device_kind) for d in mesh.devices.flat]
        key = json.dumps([shapes, devices], default=str)
        if key not in self._loaded:
            path = self._path("program", config.to_dict(), shapes, devices)
            exported = None
            if os.path.exists(path):
                try:
                    with open(path, "rb") as f:
                        exported = jax.export.deserialize(bytearray(f.read()))
                except Exception as e:  # a damaged or foreign file: export again
                    log.warning("cached program %s unreadable (%s): exporting again", path, e)
            if exported is None:
                exported = jax.export.export(jitted)(*specs)
                self._write(path, exported.serialize())
            replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
            self._loaded[key] = jax.jit(exported.call,
                                        in_shardings=(replicated, data, data, data),
                                        out_shardings=data)
        return self._loaded[key](*args)
