"""Checks of a training config (`configs/*.py`) before a run creates anything.

    check_config(config)
    # ConfigError: config.optimizer.learning_rate = -1.0: must be a finite number > 0.0

A value that cannot run, or would run to a wrong result without a word (a negative learning
rate trains by gradient ascent; a milestone beyond the last step never decays), is an error
naming the key, the value and what is allowed; so is a key that nothing reads (a typo in a
config file: ml_collections rejects unknown keys only on the command line). `train.py` calls it
at start-up, before the workdir, the data or the runtime exist, and `train_and_evaluate` calls
it again for callers that build configs in code.
"""

import math
import os
from numbers import Integral, Real

from maskrcnn_jax.config import STATIC_DEFAULTS, TORCHVISION_DEFAULTS, model_config
from maskrcnn_jax.errors import ConfigError

# The keys train.py reads, by section ('' is the top level); `model` holds `model_config`'s.
KNOWN_KEYS = {
    "": {"model", "data", "optimizer", "num_train_steps", "log_every_steps",
         "checkpoint_every_steps", "keep_checkpoints", "eval_every_steps", "final_eval", "seed",
         "init_backbone", "init_from", "frozen_backbone_stages", "distributed"},
    "data": {"name", "data_dir", "manual_dir", "train_split", "eval_split", "shapes",
             "batch_size", "eval_batch_size", "max_instances", "mask_crop_size", "min_sizes",
             "flip_probability", "worker_count", "augmentation", "lsj_size", "lsj_scale_range"},
    "optimizer": {"name", "learning_rate", "reference_batch_size", "momentum", "weight_decay",
                  "b1", "b2", "warmup_steps", "warmup_factor", "milestones", "gamma",
                  "grad_clip_norm"},
    "model": set(TORCHVISION_DEFAULTS) | set(STATIC_DEFAULTS),
}
DATA_SETS = ("shapes", "coco_instances")
AUGMENTATIONS = ("resize", "lsj")
OPTIMIZERS = ("sgd", "adamw")
BACKBONE_STAGES = 5  # frozen_backbone_stages: 0 (train all) .. 5 (the whole backbone)


def _error(key: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"config.{key} = {value!r}: {allowed}")


def _integer(config, key: str, minimum: int):
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise _error(key, value, f"must be an integer >= {minimum}")
    return int(value)


def _number(config, key: str, minimum: float, inclusive: bool = True, maximum=None):
    value = _get(config, key)
    ok = (isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= minimum if inclusive else value > minimum)
          and (maximum is None or value <= maximum))
    if not ok:
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise _error(key, value, f"must be a finite number {bound}"
                     + (f" and <= {maximum}" if maximum is not None else ""))
    return float(value)


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def check_keys(config):
    """Every key is one train.py reads (`KNOWN_KEYS`)."""
    for section, known in KNOWN_KEYS.items():
        node = config if not section else config[section]
        for key in node.keys():
            if key not in known:
                name = f"{section}.{key}" if section else key
                raise ConfigError(f"config.{name}: unknown key (known in "
                                  f"config{'.' + section if section else ''}: "
                                  f"{', '.join(sorted(known))})")


def check_config(config):
    """Raise ConfigError (one line: the key, its value, what is allowed) for the first value of
    a training config that cannot run as meant. Checks: known keys; learning rate, batch sizes,
    step counts and intervals; milestones increasing, after the warmup and within the run;
    the data set name and its folder; the model config (`model_config`'s own checks, canvases
    multiples of `size_divisible`)."""
    check_keys(config)
    steps = _integer(config, "num_train_steps", 1)
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _integer(config, key, 1)
    _integer(config, "eval_every_steps", 0)
    stages = _integer(config, "frozen_backbone_stages", 0)
    if stages > BACKBONE_STAGES:
        raise _error("frozen_backbone_stages", stages, f"must be 0..{BACKBONE_STAGES}")
    _check_data(config)
    _check_optimizer(config, steps)
    _check_model(config)


def _check_data(config):
    name = config.data.name
    if name not in DATA_SETS:
        raise _error("data.name", name, f"must be one of {', '.join(DATA_SETS)}")
    if name == "coco_instances" and not os.path.isdir(
            os.path.expanduser(config.data.manual_dir or "")):
        raise _error("data.manual_dir", config.data.manual_dir,
                     "coco_instances needs an existing COCO folder (--config.data.manual_dir=DIR)")
    for key in ("batch_size", "eval_batch_size", "max_instances", "mask_crop_size"):
        _integer(config, f"data.{key}", 1)
    _integer(config, "data.worker_count", 0)
    _number(config, "data.flip_probability", 0.0, maximum=1.0)
    sizes = config.data.min_sizes
    if (not isinstance(sizes, (tuple, list)) or not sizes
            or any(isinstance(s, bool) or not isinstance(s, Integral) or s < 1 for s in sizes)):
        raise _error("data.min_sizes", sizes, "must be a non-empty tuple of integers >= 1")
    augmentation = config.data.get("augmentation", "resize")
    if augmentation not in AUGMENTATIONS:
        raise _error("data.augmentation", augmentation,
                     f"must be one of {', '.join(AUGMENTATIONS)}")
    if augmentation == "lsj":
        size = _integer(config, "data.lsj_size", 32)
        divisible = int(config.model.get("size_divisible", 32))
        if size % divisible:
            raise _error("data.lsj_size", size, f"must be a multiple of model.size_divisible "
                                                f"({divisible})")
        scales = config.data.lsj_scale_range
        if (not isinstance(scales, (tuple, list)) or len(scales) != 2
                or not all(isinstance(s, Real) and 0 < s for s in scales)
                or scales[0] > scales[1]):
            raise _error("data.lsj_scale_range", scales, "must be (low, high) with 0 < low <= "
                                                         "high")


def _check_optimizer(config, steps: int):
    opt = config.optimizer
    if opt.name not in OPTIMIZERS:
        raise _error("optimizer.name", opt.name, f"must be one of {', '.join(OPTIMIZERS)}")
    _number(config, "optimizer.learning_rate", 0.0, inclusive=False)
    _integer(config, "optimizer.reference_batch_size", 1)
    for key in ("momentum", "weight_decay", "grad_clip_norm"):
        _number(config, f"optimizer.{key}", 0.0)
    for key in ("b1", "b2"):
        _number(config, f"optimizer.{key}", 0.0, maximum=1.0)
    _number(config, "optimizer.gamma", 0.0, inclusive=False)
    _number(config, "optimizer.warmup_factor", 0.0, inclusive=False, maximum=1.0)
    warmup = _integer(config, "optimizer.warmup_steps", 0)
    milestones = opt.milestones
    if not isinstance(milestones, (tuple, list)) or any(
            isinstance(m, bool) or not isinstance(m, Integral) for m in milestones):
        raise _error("optimizer.milestones", milestones, "must be a tuple of step numbers")
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise _error("optimizer.milestones", tuple(milestones), "must be increasing")
    for m in milestones:
        if not warmup < m <= steps:
            raise _error("optimizer.milestones", tuple(milestones),
                         f"each must be after the warmup and within the run: "
                         f"optimizer.warmup_steps ({warmup}) < milestone <= num_train_steps "
                         f"({steps})")


def _check_model(config):
    values = config.model.to_dict()
    for key in ("min_size", "max_size", "size_divisible"):
        _integer(config, f"model.{key}", 1)
    _integer(config, "model.num_classes", 2)  # the background and at least one class
    divisible = int(values["size_divisible"])
    for key, canvases in (("canvas_size", [values.get("canvas_size")]),
                          ("canvas_buckets", list(values.get("canvas_buckets") or []))):
        for canvas in canvases:
            if canvas is not None and (len(canvas) != 2 or any(
                    int(v) < 1 or int(v) % divisible for v in canvas)):
                raise _error(f"model.{key}", values[key], "every canvas must be (height, "
                             f"width), multiples of model.size_divisible ({divisible})")
    try:
        model_config(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None
