"""Export the inference function as serialized StableHLO (`jax.export`), and run it back.

    from maskrcnn_jax.inference.export import export_inference, load_exported
    export_inference(config, variables, "exported/", batch_size=1)
    predict = load_exported("exported/")          # needs jax + numpy, not the model code
    outputs = predict([image])                    # same dicts as Predictor

The directory holds `inference.stablehlo` (the serialized `jax.export.Exported` of the jitted
network: canvas images -> padded detections), `variables.npz` (its parameters keyed by path,
`params/backbone/conv1/kernel`) and `config.json` (what host pre/post-processing needs); see
`maskrcnn_jax.checkpoints`. Platforms: the exporting backend by default; pass
`platforms=("cpu", "cuda", "tpu")` for a portable one.
"""

import functools
from typing import Sequence

import numpy as np

from maskrcnn_jax import checkpoints


def export_inference(config, variables, directory, batch_size: int = 1,
                     platforms: Sequence[str] | None = None) -> str:
    """Serialize `MaskRCNN(config).apply` for a batch of `batch_size` images in
    `config.canvas_size` (one canvas: the loader puts every image there).

    Returns the directory written.
    """
    import jax

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
        import jax
        import ml_collections

        serialized, variables, values = checkpoints.load_exported(directory)
        self.exported = jax.export.deserialize(bytearray(serialized))
        self.batch_size = int(values.pop("export_batch_size"))
        self.config = ml_collections.ConfigDict(values)
        expected = self.exported.in_tree.children()[0].children()[0]
        if jax.tree_util.tree_structure(variables) != expected:
            raise ValueError(f"{directory}: the parameters in {checkpoints.EXPORTED_VARIABLES} do "
                             "not have the paths the exported function takes")
        self.variables = jax.device_put(variables)

    def __call__(self, images):
        from maskrcnn_jax.data.transform import detect_in_batches

        return detect_in_batches(images, self.config, self.batch_size, functools.partial(
            self.exported.call, self.variables))


def load_exported(directory) -> ExportedPredictor:
    """An `ExportedPredictor` for a directory written by `export_inference`."""
    return ExportedPredictor(directory)
