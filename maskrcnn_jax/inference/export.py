"""Export the inference function as serialized StableHLO (`jax.export`), and run it back.

    from maskrcnn_jax.inference.export import export_inference, load_exported
    export_inference(config, variables, "exported/", batch_size=1)
    predict = load_exported("exported/")          # runs without importing the model code
    outputs = predict([image])                    # same dicts as Predictor

The directory holds `inference.stablehlo` (the serialized `jax.export.Exported` of the jitted
network: canvas images -> padded detections), `variables.npz` (its parameters keyed by path,
`params/backbone/conv1/kernel`) and `config.json` (what host pre/post-processing needs); see
`maskrcnn_jax.checkpoints`. Platforms: the exporting backend by default; pass
`platforms=("cpu", "cuda", "tpu")` for a portable one.

`ProgramCache` keeps exported networks in a folder for `Predictor` (predict.py passes its
compilation cache folder), keyed by everything they depend on (the config, the input shapes,
the devices, jax's version and maskrcnn_jax's source code), so a later process loads a network
instead of tracing and lowering the model again; with JAX's persistent compilation cache the
compiled program is loaded too. The check of the weights against the config keeps its
expected shapes there as well.
"""

import functools
import hashlib
import json
import logging
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np

from maskrcnn_jax import checkpoints, runtime
from maskrcnn_jax.inference.runner import detect_in_batches

log = logging.getLogger(__name__)


def export_inference(config, variables, directory, batch_size: int = 1,
                     platforms: Sequence[str] | None = None) -> str:
    """Serialize `MaskRCNN(config).apply` for a batch of `batch_size` images in
    `config.canvas_size` (one canvas: the loader puts every image there).

    Returns the directory written.
    """
    from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen

    config = frozen(config)
    model = MaskRCNN(config)

    def inference(variables, images, image_sizes, padded_sizes):
        return model.apply(variables, images, image_sizes, padded_sizes)

    height, width = config.canvas_size
    specs = (
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), variables),
        jax.ShapeDtypeStruct((batch_size, height, width, 3), np.float32),
        jax.ShapeDtypeStruct((batch_size, 2), np.int32),
        jax.ShapeDtypeStruct((batch_size, 2), np.int32),
    )
    exported = jax.export.export(jax.jit(inference), platforms=platforms)(*specs)
    # The exported function takes one canvas: the loader must not bucket into others.
    host_config = {**config.to_dict(), "canvas_buckets": [list(config.canvas_size)],
                   "export_batch_size": batch_size}
    checkpoints.save_exported(directory, exported.serialize(), variables, host_config)
    return directory


class ExportedPredictor:
    """Runs an exported model on uint8 `(H, W, 3)` images; returns `Predictor`-style dicts."""

    def __init__(self, directory):
        serialized, variables, values = checkpoints.read_exported(directory)
        self.exported = jax.export.deserialize(bytearray(serialized))
        self.batch_size = int(values.pop("export_batch_size"))
        self.config = ml_collections.ConfigDict(values)
        expected = self.exported.in_tree.children()[0].children()[0]
        if jax.tree_util.tree_structure(variables) != expected:
            raise ValueError(f"{directory}: the parameters in {checkpoints.EXPORTED_VARIABLES} do "
                             "not have the paths the exported function takes")
        self.variables = jax.device_put(variables)

    def __call__(self, images):
        return detect_in_batches(images, self.config, self.batch_size, functools.partial(
            self.exported.call, self.variables))


def load_exported(directory) -> ExportedPredictor:
    """An `ExportedPredictor` for a directory written by `export_inference`."""
    return ExportedPredictor(directory)


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


class ProgramCache:
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
        from maskrcnn_jax.models.variables import variable_shapes

        path = self._path("shapes", config.to_dict())
        try:
            with open(path) as f:
                return {k: tuple(v) for k, v in json.load(f).items()}
        except (OSError, ValueError):
            shapes = variable_shapes(config)
            self._write(path, json.dumps(shapes).encode())
            return shapes

    def run(self, jitted, config, mesh, variables, images, image_sizes, padded_sizes):
        """`jitted(variables, images, ...)` (`runner.compiled_detector`) through the cached
        program of these shapes: exported and written the first time, read back later."""
        args = (variables, images, image_sizes, padded_sizes)
        specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            np.shape(x), x.dtype if hasattr(x, "dtype") else np.result_type(x)), args)
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
            self._loaded[key] = runtime.compiled("exported", [path, mesh], lambda: jax.jit(
                exported.call, out_shardings=runtime.split(mesh),
                in_shardings=(runtime.replicated(mesh), *[runtime.split(mesh)] * 3)))
        return self._loaded[key](*args)
