"""torchvision checkpoints <-> maskrcnn_jax (config, variables), and the conversion CLI.

    from maskrcnn_jax.convert import from_torchvision, to_torchvision
    config, variables = from_torchvision(torch.load(path, weights_only=True), num_classes=91)
    # torchvision's official COCO_V1 checkpoint runs with eps 0 (overwrite_eps(model, 0.0)):
    # from_torchvision(torch.load("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"), frozen_bn_eps=0.0)
    state_dict = to_torchvision(config, variables)  # the inverse (e.g. for a trained model)

CLI (writes an Orbax checkpoint of the variables and the config as JSON):

    python -m maskrcnn_jax.convert model.pth --out DIR [--num-classes 91] [--min-size 800] ...
    python -m maskrcnn_jax.convert maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --out DIR \
        --frozen-bn-eps 0.0
"""

import argparse
import json
import os
import re
import sys

import numpy as np

from maskrcnn_jax.config import STATIC_DEFAULTS, TORCHVISION_DEFAULTS, model_config
from maskrcnn_jax.convert_weights import flax_to_torchvision, resnet_to_flax, torchvision_to_flax

_RESNET_DEPTHS = {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}


def import_torch():
    """`torch`, or an ImportError naming the extra that installs it (reading or writing a `.pth`
    needs torch; nothing else in maskrcnn_jax does)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading or writing torchvision checkpoints (.pth) needs torch: "
                          "pip install -e '.[torch]'") from e
    return torch


def load_state_dict(path):
    """A torchvision state dict from a `.pth` file (a training checkpoint's 'model' entry too)."""
    torch = import_torch()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, dict) and "model" in state_dict and not any(
            k.startswith("backbone.") for k in state_dict):
        state_dict = state_dict["model"]
    return state_dict


def _backbone_name(state_dict, prefix="backbone.body."):
    """resnet18/34/50/101 from the block counts (and block type) in a state dict."""
    counts = []
    for stage in range(1, 5):
        pattern = re.compile(re.escape(prefix) + rf"layer{stage}\.(\d+)\.conv1\.weight$")
        counts.append(len({m.group(1) for k in state_dict if (m := pattern.match(k))}))
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state_dict
    if tuple(counts) == (3, 4, 6, 3):
        return "resnet50" if bottleneck else "resnet34"
    name = _RESNET_DEPTHS.get(tuple(counts))
    if name is None:
        raise ValueError(f"state dict has ResNet stage sizes {counts}, not a known torchvision ResNet")
    return name


def from_torchvision(state_dict, frozen_bn_eps=STATIC_DEFAULTS["frozen_bn_eps"], **kwargs):
    """(config, variables) reproducing torchvision's `maskrcnn_resnet50_fpn(**kwargs)` with this
    state dict.

    Args:
      state_dict: a torchvision Mask R-CNN state dict (torch tensors or arrays).
      frozen_bn_eps: eps of the backbone's FrozenBatchNorm2d, stored in the config. torchvision's
        default is 1e-5, but `maskrcnn_resnet50_fpn(weights=COCO_V1)` calls
        `overwrite_eps(model, 0.0)`: pass 0.0 for that official checkpoint
        (`maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth`), whose near-dead channels (tiny
        running_var) make 1e-5 change the detections.
      **kwargs: torchvision's keyword names and defaults (num_classes, min_size, max_size,
        box_score_thresh, box_nms_thresh, box_detections_per_img, rpn_pre_nms_top_n_test, ...),
        plus maskrcnn_jax's static settings (canvas_size, box_pre_nms_top_n, compute_dtype).

    Raises:
      ValueError: if `num_classes` disagrees with the state dict's predictor, or for keys or
        shapes that are not a torchvision Mask R-CNN (the message names the key).
    """
    kwargs.setdefault("backbone", _backbone_name(state_dict))
    num_classes = kwargs.get("num_classes", TORCHVISION_DEFAULTS["num_classes"])
    variables = torchvision_to_flax(state_dict, num_classes=num_classes)
    return model_config(frozen_bn_eps=frozen_bn_eps, **kwargs), variables


def check_torchvision_architecture(config):
    """Raise ValueError if torchvision has no counterpart of the config's backbone: a ResNet
    18/34/50/101 with FrozenBatchNorm2d (not GroupNorm, not the test-only 'tiny')."""
    norm = config.get("backbone_norm", "frozen_bn")
    if norm != "frozen_bn":
        raise ValueError(f"backbone_norm {norm!r} has no torchvision counterpart (frozen_bn only)")
    if config.backbone not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        raise ValueError(f"backbone {config.backbone!r} has no torchvision counterpart")


def to_torchvision(config, variables):
    """torchvision state dict (torch float32 tensors) of a maskrcnn_jax model: the inverse of
    `from_torchvision`, for a torchvision `MaskRCNN` built with the config's architecture
    (`maskrcnn_jax.testing.torch_models.torchvision_maskrcnn(config)`: ResNet with
    FrozenBatchNorm2d of eps `frozen_bn_eps`, `fpn_channels`, head widths, `num_classes`). A
    state dict holds no eps: a torch model built otherwise must be given the config's.

    `from_torchvision(to_torchvision(config, v), **config)` gives `v` back bit for bit.

    Raises:
      ValueError: if the config has no torchvision counterpart (a GroupNorm backbone, the test
        'tiny' backbone) or disagrees with the variables (backbone depth, widths, classes).
    """
    torch = import_torch()
    check_torchvision_architecture(config)
    state_dict = flax_to_torchvision(variables)
    found = {
        "backbone": _backbone_name(state_dict),
        "num_classes": state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0],
        "fpn_channels": state_dict["backbone.fpn.layer_blocks.0.0.weight"].shape[0],
        "box_representation_size": state_dict["roi_heads.box_head.fc7.weight"].shape[0],
        "mask_head_layers": tuple(
            v.shape[0] for k, v in state_dict.items()
            if k.startswith("roi_heads.mask_head.") and k.endswith(".weight")),
        "mask_dim_reduced": state_dict["roi_heads.mask_predictor.conv5_mask.weight"].shape[1],
    }
    for key, value in found.items():
        expected = tuple(config[key]) if key == "mask_head_layers" else config[key]
        if value != expected:
            raise ValueError(f"config {key}={expected!r} but the variables have {value!r}")
    return {k: torch.from_numpy(v) for k, v in state_dict.items()}


def backbone_from_torchvision_resnet(state_dict):
    """Backbone variables `{'params': ..., 'batch_stats': ...}` from a torchvision ImageNet
    ResNet state dict (e.g. `resnet50(weights=...)`), to initialize training."""
    return resnet_to_flax(state_dict)


def save(directory, config, variables):
    """Write `variables` as an Orbax checkpoint in `directory/variables` and the config as
    `directory/config.json`."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, "variables"), variables, force=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)


def load(directory):
    """(config, variables) written by `save` / the CLI."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: no config.json; is {directory} a converted checkpoint?")
    with open(config_path) as f:
        config = model_config(**json.load(f))
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(os.path.join(directory, "variables"))
    return config, variables


def _parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert a torchvision Mask R-CNN checkpoint to a maskrcnn_jax checkpoint.")
    parser.add_argument("checkpoint", help="torchvision state dict (.pth), or a dict with 'model'")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--frozen-bn-eps", dest="frozen_bn_eps", type=float,
        default=STATIC_DEFAULTS["frozen_bn_eps"],
        help="eps of the backbone's FrozenBatchNorm2d (default: %(default)s); 0.0 for "
             "torchvision's official COCO_V1 checkpoint, which torchvision runs with "
             "overwrite_eps(model, 0.0)")
    for key, default in {**TORCHVISION_DEFAULTS, **STATIC_DEFAULTS}.items():
        if key == "frozen_bn_eps":
            continue  # added above, as a float with its own help
        parser.add_argument("--" + key.replace("_", "-"), dest=key, type=_parse_value, default=None,
                            help=f"default: {default}")
    args = parser.parse_args(argv)
    state_dict = load_state_dict(args.checkpoint)
    overrides = {k: v for k, v in vars(args).items() if k not in ("checkpoint", "out") and v is not None}
    config, variables = from_torchvision(state_dict, **overrides)
    save(args.out, config, variables)
    num_params = sum(int(np.size(v)) for v in _leaves(variables))
    print(f"wrote {args.out}: {config.backbone}, {config.num_classes} classes, {num_params:,} values")
    return 0


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


if __name__ == "__main__":
    sys.exit(main())
