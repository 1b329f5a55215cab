"""torchvision checkpoints <-> maskrcnn_jax (config, variables).

    from maskrcnn_jax.torchvision.convert import from_torchvision, to_torchvision
    config, variables = from_torchvision(torch.load(path, weights_only=True), num_classes=91)
    # torchvision's official COCO_V1 checkpoint runs with eps 0 (overwrite_eps(model, 0.0)):
    # from_torchvision(torch.load("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"), frozen_bn_eps=0.0)
    state_dict = to_torchvision(config, variables)  # the inverse (e.g. for a trained model)

The command-line tool is `convert.py` at the repository root.
"""

import re

from maskrcnn_jax.config import STATIC_DEFAULTS, model_config
from maskrcnn_jax.errors import CheckpointError
from maskrcnn_jax.models.norm import fit_norm_layout
from maskrcnn_jax.models.variables import variable_shapes
from maskrcnn_jax.torchvision.flax_to_state_dict import flax_to_torchvision
from maskrcnn_jax.torchvision.state_dict_to_flax import (
    is_v2,
    resnet_to_flax,
    torchvision_to_flax,
)

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
    """A torchvision state dict from a `.pth` file (a training checkpoint's 'model' entry too).

    Raises:
      CheckpointError: naming the file, when torch cannot read it (truncated, not a torch
        file, pickled objects beyond tensors) or it holds no state dict.
    """
    torch = import_torch()
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint "
                              f"({type(e).__name__}: {reason})") from e
    if isinstance(state_dict, dict) and "model" in state_dict and not any(
            k.startswith("backbone.") for k in state_dict):
        state_dict = state_dict["model"]
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise CheckpointError(f"{path}: holds an object of type {type(state_dict).__name__}, "
                              "not a state dict (parameter names to tensors)")
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


def architecture_of(state_dict) -> dict:
    """The config keys a torchvision Mask R-CNN state dict fixes: v1 or v2, backbone depth, class
    count, FPN and head widths.

    Raises:
      KeyError for a key every Mask R-CNN has; ValueError for a v2-style box head other than
      `maskrcnn_resnet50_fpn_v2`'s (four `fpn_channels`-wide convs, one Linear).
    """
    v2 = is_v2(state_dict)
    fpn_channels = int(state_dict["backbone.fpn.layer_blocks.0.0.weight"].shape[0])
    head = "roi_heads.box_head."
    if v2:
        convs = [int(state_dict[f"{head}{i}.0.weight"].shape[0]) for i in range(
            sum(1 for k in state_dict if re.fullmatch(re.escape(head) + r"\d+\.0\.weight", k)))]
        linears = [k for k in state_dict if re.fullmatch(re.escape(head) + r"\d+\.weight", k)]
        if convs != [fpn_channels] * 4 or len(linears) != 1:
            raise ValueError(f"box head with convs {convs} and {len(linears)} Linear layers: "
                             f"maskrcnn_resnet50_fpn_v2 has 4 convs of {fpn_channels} and 1 Linear")
        representation = int(state_dict[linears[0]].shape[0])
    else:
        representation = int(state_dict[head + "fc7.weight"].shape[0])
    mask_conv = re.compile(r"roi_heads\.mask_head\.(\d+)\.0\.weight$")
    return {
        "architecture": "v2" if v2 else "v1",
        "backbone": _backbone_name(state_dict),
        # BatchNorm2d layers count their batches; FrozenBatchNorm2d (pretrained v1) has none.
        "backbone_norm": ("batch_norm" if "backbone.body.bn1.num_batches_tracked" in state_dict
                          else "frozen_bn"),
        "num_classes": int(state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0]),
        "fpn_channels": fpn_channels,
        "box_representation_size": representation,
        "mask_head_layers": tuple(
            int(v.shape[0]) for k, v in sorted(
                ((k, v) for k, v in state_dict.items() if mask_conv.match(k)),
                key=lambda kv: int(mask_conv.match(kv[0]).group(1)))),
        "mask_dim_reduced": int(
            state_dict["roi_heads.mask_predictor.conv5_mask.weight"].shape[1]),
    }


def from_torchvision(state_dict, frozen_bn_eps=STATIC_DEFAULTS["frozen_bn_eps"], **kwargs):
    """(config, variables) reproducing torchvision's `maskrcnn_resnet50_fpn(**kwargs)` (or
    `maskrcnn_resnet50_fpn_v2(**kwargs)`, recognised from the keys) with this state dict.

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

    The architecture (v1 or v2, backbone depth, `num_classes`, FPN and head widths) is read from
    the state dict (`architecture_of`), and so is the backbone's norm: FrozenBatchNorm2d
    (pretrained v1: `backbone_norm='frozen_bn'`, eps `frozen_bn_eps`) or BatchNorm2d (v2's, and
    a v1 built without pretrained weights: 'batch_norm'); a keyword that disagrees with it (e.g.
    `architecture="v2"` for a v1 state dict) is an error. BatchNorm2d layers (v2's backbone,
    FPN and heads) run with their running statistics in inference, as torchvision in eval mode,
    and in training as torchvision in train mode (`batch_norm='train'`, the default) or frozen
    (`batch_norm='frozen'`); their `num_batches_tracked` is kept.

    Raises:
      ValueError: if a keyword disagrees with the state dict's architecture (naming both
        values), or for keys or shapes that are not a torchvision Mask R-CNN (naming the key).
    """
    try:
        found = architecture_of(state_dict)
    except KeyError as e:
        raise ValueError(f"not a torchvision Mask R-CNN state dict: no key {e}") from None
    for key, value in found.items():
        if key in kwargs:
            given = tuple(kwargs[key]) if key == "mask_head_layers" else kwargs[key]
            if given != value:
                raise ValueError(f"{key}={given!r} given, but the state dict has {value!r}")
    kwargs.update(found)
    config = model_config(frozen_bn_eps=frozen_bn_eps, **kwargs)
    variables = torchvision_to_flax(state_dict, num_classes=found["num_classes"])
    return config, fit_norm_layout(variables, variable_shapes(config))


def check_torchvision_architecture(config):
    """Raise ValueError if torchvision has no counterpart of the config's backbone: a ResNet
    18/34/50/101 with FrozenBatchNorm2d or BatchNorm2d (not GroupNorm, not the test-only
    'tiny')."""
    norm = config.get("backbone_norm", "frozen_bn")
    if norm not in ("frozen_bn", "batch_norm"):
        raise ValueError(f"backbone_norm {norm!r} has no torchvision counterpart (frozen_bn or "
                         "batch_norm)")
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
    for key, value in architecture_of(state_dict).items():
        if key == "backbone_norm":  # frozen batch norms carry no counter: either is fine
            continue
        expected = (tuple(config[key]) if key == "mask_head_layers" else
                    config.get("architecture", "v1") if key == "architecture" else config[key])
        if value != expected:
            raise ValueError(f"config {key}={expected!r} but the variables have {value!r}")
    return {k: torch.from_numpy(v) for k, v in state_dict.items()}


def backbone_from_torchvision_resnet(state_dict):
    """Backbone variables `{'params': ..., 'batch_stats': ...}` from a torchvision ImageNet
    ResNet state dict (e.g. `resnet50(weights=...)`), to initialize training."""
    return resnet_to_flax(state_dict)
