"""Start training from a trained Mask R-CNN (torchvision's COCO weights, a train.py run) on
another set of classes: the fine-tuning workflow of torchvision's tutorial and detectron2.

    python train.py --config=configs/finetune.py --workdir=DIR \\
        --config.init_from=CONVERTED_DIR --config.model.num_classes=K+1 ...

or, in a notebook, `variables = finetune.load_pretrained(CONVERTED_DIR, model_cfg)`.

Every weight of the pretrained model is loaded. Three layers depend on the number of classes:
the box predictor's `cls_score` and `bbox_pred` and the mask predictor's last layer,
`mask_fcn_logits`. When `num_classes` differs they are re-initialised as torchvision
initialises a fresh `FastRCNNPredictor` / `MaskRCNNPredictor` (what its tutorial does by
replacing them), and the log names them and says why; `mask_predictor/conv5_mask` (class
independent) is kept. Any other difference in shape or in the set of layers is an error naming
the layer and both shapes: another backbone, FPN width, head layout or architecture (v1 / v2)
is not a fine-tuning of these weights.

Which backbone stages train is the training config's `frozen_backbone_stages`
(`5 - trainable_backbone_layers`: torchvision's default with pretrained weights is
`trainable_backbone_layers=3`, i.e. 2 here). Batch norms train as the config says
(`batch_norm`): v2's as torchvision's in train mode by default (batch statistics, running
statistics updated, also in the frozen stages), or frozen.
"""

import logging
import os
from typing import Dict, List, Tuple

import jax
import numpy as np

from maskrcnn_jax import checkpoints
from maskrcnn_jax.models.norm import fit_norm_layout
from maskrcnn_jax.models.variables import variable_shapes

log = logging.getLogger(__name__)

# The layers whose output size is the number of classes (times the per-class width) and how
# torchvision initialises them.
CLASS_LAYERS = {
    "params/box_predictor/cls_score": ("linear", 1),
    "params/box_predictor/bbox_pred": ("linear", 4),
    "params/mask_predictor/mask_fcn_logits": ("mask_logits", 1),
}


def torchvision_linear_init(key, kernel_shape) -> Dict[str, np.ndarray]:
    """torch.nn.Linear's default initialisation (FastRCNNPredictor's layers): kernel and bias
    uniform in +-1/sqrt(fan_in) (`kaiming_uniform_(a=sqrt(5))`). `kernel_shape` (in, out), Flax
    layout."""
    fan_in, out = kernel_shape
    bound = 1.0 / np.sqrt(fan_in)
    k_kernel, k_bias = jax.random.split(key)
    return {"kernel": np.asarray(jax.random.uniform(k_kernel, kernel_shape, minval=-bound,
                                                    maxval=bound)),
            "bias": np.asarray(jax.random.uniform(k_bias, (out,), minval=-bound, maxval=bound))}


def torchvision_mask_logits_init(key, kernel_shape) -> Dict[str, np.ndarray]:
    """MaskRCNNPredictor's initialisation of `mask_fcn_logits`: kernel
    `kaiming_normal_(mode='fan_out', nonlinearity='relu')` (std sqrt(2 / (out * kh * kw))); the
    bias keeps torch.nn.Conv2d's default, uniform in +-1/sqrt(fan_in) (torchvision's zero-bias
    line is commented out). `kernel_shape` (kh, kw, in, out), Flax layout."""
    kh, kw, fan_in, out = kernel_shape
    std = np.sqrt(2.0 / (out * kh * kw))
    bound = 1.0 / np.sqrt(fan_in * kh * kw)
    k_kernel, k_bias = jax.random.split(key)
    return {"kernel": np.asarray(std * jax.random.normal(k_kernel, kernel_shape)),
            "bias": np.asarray(jax.random.uniform(k_bias, (out,), minval=-bound, maxval=bound))}


_INITIALIZERS = {"linear": torchvision_linear_init, "mask_logits": torchvision_mask_logits_init}


def _layer_of(path: str):
    layer = path.rsplit("/", 1)[0]
    return layer if layer in CLASS_LAYERS else None


def _num_classes(shape, per_class: int):
    return shape[-1] // per_class


def adapt_variables(config, pretrained, key, source: str = "pretrained weights"
                    ) -> Tuple[dict, List[str]]:
    """`pretrained` variables made to fit `MaskRCNN(config)`.

    Args:
      config: the model config to train (its `num_classes` may differ from the weights').
      pretrained: `{'params', 'batch_stats'}` of a trained Mask R-CNN (host or device arrays).
      key: PRNG key for the re-initialised layers.
      source: names the weights in messages (e.g. their directory).

    Returns:
      (variables as nested dicts of float32 numpy arrays, the re-initialised layers as
      'params/box_predictor/cls_score' etc.; empty when the class count is the same).

    Raises:
      ValueError: a layer missing on either side or a shape that differs other than by the
        class count, naming every such layer and both shapes.
    """
    expected = variable_shapes(config)
    # Batch norms in the layout this config trains them in (trainable or frozen).
    given = checkpoints.flatten_by_path(fit_norm_layout(pretrained, expected))
    # Missing or extra layers are named once per layer (all of a layer's leaves go together).
    def order(layer):  # parameters first
        return not layer.startswith("params/"), layer

    missing = sorted({p.rsplit("/", 1)[0] for p in expected if p not in given}, key=order)
    extra = sorted({p.rsplit("/", 1)[0] for p in given if p not in expected}, key=order)
    problems = [f"{layer}: missing from {source}" for layer in missing]
    problems += [f"{layer}: in {source} but not in the model" for layer in extra]
    reinit = {}
    for path, shape in expected.items():
        if path not in given or given[path].shape == shape:
            continue
        theirs = given[path].shape
        layer = _layer_of(path)
        per_class = CLASS_LAYERS[layer][1] if layer else 1
        if (layer is None or theirs[:-1] != shape[:-1] or theirs[-1] % per_class
                or shape[-1] % per_class):
            problems.append(f"{path}: shape {theirs} in {source}, the config expects {shape} "
                            "(not a class-count change)")
            continue
        reinit[layer] = (_num_classes(theirs, per_class), _num_classes(shape, per_class))
    if problems:
        shown = "\n  ".join(problems[:30]) + (f"\n  ... {len(problems) - 30} more"
                                              if len(problems) > 30 else "")
        raise ValueError(f"{source} do not fit the model to train (only the class-dependent "
                         f"layers {sorted(CLASS_LAYERS)} may differ, by num_classes):\n  {shown}")
    flat = {p: np.asarray(v, np.float32) if np.issubdtype(v.dtype, np.floating) else
            np.asarray(v) for p, v in given.items()}  # counters stay integers
    for i, (layer, (old, new)) in enumerate(sorted(reinit.items())):
        kind = CLASS_LAYERS[layer][0]
        fresh = _INITIALIZERS[kind](jax.random.fold_in(key, i), expected[f"{layer}/kernel"])
        for name, value in fresh.items():
            flat[f"{layer}/{name}"] = value.astype(np.float32)
        log.info("re-initialised %s (%s init): %s has %d classes, the config num_classes=%d",
                 layer.removeprefix("params/"),
                 "torch.nn.Linear" if kind == "linear" else "kaiming_normal fan_out", source,
                 old, new)
    return checkpoints.unflatten_by_path(flat), sorted(reinit)


def load_pretrained(path: str, config, key=None) -> dict:
    """Variables to start training `MaskRCNN(config)` from, read from `path`: a converted
    checkpoint (`convert.py`), a train.py workdir (its latest step), or a torchvision state
    dict file (`.pth` / `.pt`, converted here; needs torch). See `adapt_variables`; `key`
    (default `PRNGKey(0)`) draws the re-initialised layers.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: as `adapt_variables`, or weights of another architecture than
        `config.architecture` (naming both).
    """
    path = os.path.expanduser(path)
    pretrained_config, pretrained, _ = checkpoints.load_weights(path, config)
    if pretrained_config is None:
        raise ValueError(f"{path} holds a backbone (an ImageNet ResNet), not a whole Mask R-CNN: "
                         "start from it with init_backbone")
    theirs = pretrained_config.get("architecture", "v1")
    ours = config.get("architecture", "v1")
    if theirs != ours:
        raise ValueError(f"{path} holds a torchvision {theirs} Mask R-CNN, the config "
                         f"architecture={ours!r}: set --config.model.architecture={theirs}")
    if pretrained_config.frozen_bn_eps != config.frozen_bn_eps:
        log.warning("%s was converted with frozen_bn_eps=%g, the config has %g: the backbone's "
                    "frozen norms compute differently (set model.frozen_bn_eps=%g to keep the "
                    "pretrained model's outputs)", path, pretrained_config.frozen_bn_eps,
                    config.frozen_bn_eps, pretrained_config.frozen_bn_eps)
    variables, _ = adapt_variables(config, pretrained, key if key is not None
                                   else jax.random.PRNGKey(0), source=path)
    log.info("initialised every weight from %s", path)
    return variables
