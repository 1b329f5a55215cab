"""The variable tree of `MaskRCNN(config)`: its paths and shapes without initialising it
(`variable_shapes`), and a check of given variables against it (`check_variables`)."""

import functools
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen


def variable_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """`{'params/backbone/conv1/kernel': shape, ...}` of `MaskRCNN(config)`'s variables (traced
    on a small canvas, with `MaskRCNN.create_parameters`: parameter shapes depend on neither)."""
    small = ml_collections.ConfigDict(dict(config))
    small.canvas_size = (64, 64)
    return dict(_variable_shapes(frozen(small)))


@functools.lru_cache(maxsize=16)
def _variable_shapes(small):
    images = jnp.zeros((1, 64, 64, 3), jnp.float32)
    sizes = jnp.full((1, 2), 64, jnp.int32)
    shapes = jax.eval_shape(functools.partial(MaskRCNN(small).init,
                                              method=MaskRCNN.create_parameters),
                            jax.random.key(0), images, sizes)
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def check_variables(config, variables, where: str = "variables", expected=None):
    """Raise a ValueError listing every parameter of `variables` that `MaskRCNN(config)` does not
    have, lacks, or has with another shape (both shapes named); a class-count mismatch says so
    (config `num_classes` vs the weights'). `expected`: `variable_shapes(config)` if known."""
    expected = variable_shapes(config) if expected is None else expected
    given = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(jnp.shape(leaf))
             for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
    problems = [f"{p}: missing (config expects {expected[p]})" for p in expected if p not in given]
    problems += [f"{p}: not in the model (shape {given[p]})" for p in given if p not in expected]
    problems += [f"{p}: shape {given[p]}, config expects {expected[p]}"
                 for p in expected if p in given and given[p] != expected[p]]
    if not problems:
        return
    hint = ""
    cls = "params/box_predictor/cls_score/kernel"
    if cls in given and cls in expected and given[cls] != expected[cls]:
        hint = (f" (the config has num_classes={config.num_classes}, the weights "
                f"{given[cls][-1]}: set num_classes to match)")
    shown = "\n  ".join(problems[:10]) + (f"\n  ... {len(problems) - 10} more"
                                          if len(problems) > 10 else "")
    raise ValueError(f"{where} do not match the model config{hint}:\n  {shown}")
