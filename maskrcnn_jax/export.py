"""Export the inference function as serialized StableHLO (`jax.export`), and run it back.

    from maskrcnn_jax.export import export_inference, load_exported
    export_inference(config, variables, "exported/", batch_size=1)
    predict = load_exported("exported/")          # needs jax + numpy, not the model code
    outputs = predict([image])                    # same dicts as Predictor

The directory holds `inference.stablehlo` (the serialized `jax.export.Exported` of the jitted
network: canvas images -> padded detections), `variables.npz` (its parameters, in the exported
function's argument order) and `config.json` (what host pre/post-processing needs). Platforms:
the exporting backend by default; pass `platforms=("cpu", "cuda", "tpu")` for a portable one.
"""

import functools
import json
import os
from typing import Sequence

import numpy as np

STABLEHLO = "inference.stablehlo"
VARIABLES = "variables.npz"
CONFIG = "config.json"


def export_inference(config, variables, directory, batch_size: int = 1,
                     platforms: Sequence[str] | None = None) -> str:
    """Serialize `MaskRCNN(config).apply` for a batch of `batch_size` canvas images.

    Returns the directory written.
    """
    import jax

    from maskrcnn_jax.model import MaskRCNN, frozen

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
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, STABLEHLO), "wb") as f:
        f.write(exported.serialize())
    leaves = jax.tree_util.tree_leaves(variables)
    np.savez(os.path.join(directory, VARIABLES), *[np.asarray(leaf) for leaf in leaves])
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump({**config.to_dict(), "export_batch_size": batch_size}, f, indent=2, sort_keys=True)
    return directory


class ExportedPredictor:
    """Runs an exported model on uint8 `(H, W, 3)` images; returns `Predictor`-style dicts."""

    def __init__(self, directory):
        import jax
        import ml_collections

        with open(os.path.join(directory, STABLEHLO), "rb") as f:
            self.exported = jax.export.deserialize(bytearray(f.read()))
        with open(os.path.join(directory, CONFIG)) as f:
            values = json.load(f)
        self.batch_size = int(values.pop("export_batch_size"))
        self.config = ml_collections.ConfigDict(values)
        with np.load(os.path.join(directory, VARIABLES)) as data:
            leaves = [data[f"arr_{i}"] for i in range(len(data.files))]
        variables_tree = jax.tree_util.tree_unflatten(self.exported.in_tree, [None] * len(self.exported.in_avals))
        treedef = jax.tree_util.tree_structure(variables_tree[0][0], is_leaf=lambda x: x is None)
        if treedef.num_leaves != len(leaves):
            raise ValueError(f"{directory}: {VARIABLES} has {len(leaves)} arrays, the exported "
                             f"function takes {treedef.num_leaves}")
        self.variables = jax.device_put(jax.tree_util.tree_unflatten(treedef, leaves))

    def __call__(self, images):
        from maskrcnn_jax.transform import detect_in_batches

        return detect_in_batches(images, self.config, self.batch_size, functools.partial(
            self.exported.call, self.variables))


def load_exported(directory) -> ExportedPredictor:
    """An `ExportedPredictor` for a directory written by `export_inference`."""
    return ExportedPredictor(directory)
