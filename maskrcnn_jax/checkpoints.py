"""Every on-disk format of maskrcnn_jax, read and written in one place.

- A train.py workdir: `workdir/checkpoints/<step>/` (Orbax) with the train state, the data
  iterator's position and the run config (written and resumed by
  `maskrcnn_jax.training.checkpointing`; its weights read here).
- A converted checkpoint (`convert.py`, `save_converted`): `config.json` + Orbax `variables/`.
- An exported model (`inference.export`, `save_exported` / `read_exported`): the serialized
  program `inference.stablehlo`, `variables.npz` keyed by parameter path
  (`params/backbone/conv1/kernel`), `config.json`.
- torchvision's state dicts (`.pth`, read with torch): a Mask R-CNN's, or an ImageNet ResNet's
  (a backbone to start training from).

`load_weights(path)` reads the weights of any of them (inference, evaluation, fine-tuning).
"""

import json
import logging
import os
from typing import NamedTuple, Optional

import numpy as np

from maskrcnn_jax import files
from maskrcnn_jax.errors import CheckpointError, UsageError

CONFIG_JSON = "config.json"
VARIABLES_DIR = "variables"
EXPORTED_STABLEHLO = "inference.stablehlo"
EXPORTED_VARIABLES = "variables.npz"

log = logging.getLogger(__name__)


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


# ------------------------------------------------------------------------------------------------
# train.py workdirs (saving and resuming a run: `training.checkpointing`)
# ------------------------------------------------------------------------------------------------


def local_restore_target(directory: str, step: int):
    """The saved state's shapes and dtypes on this process's first device: a checkpoint written
    on other devices (another process count, another machine) restores anywhere, in full."""
    import jax

    ocp = _ocp()
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(os.path.join(directory, str(step), "state"))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                        getattr(metadata, "item_metadata", metadata))


# ------------------------------------------------------------------------------------------------
# Converted checkpoints
# ------------------------------------------------------------------------------------------------


def save_converted(directory, config, variables, overwrite: bool = False):
    """Write `variables` as an Orbax checkpoint in `directory/variables` and the config as
    `directory/config.json` (`check_converted_destination` first: a non-empty folder only with
    `overwrite`, which replaces these two and nothing else).

    Each is written under a temporary name and renamed into place once complete: an interrupted
    save leaves the folder as it was."""
    import shutil

    ocp = _ocp()
    check_converted_destination(directory, overwrite)
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, VARIABLES_DIR)
    temporary = os.path.join(directory, f".{VARIABLES_DIR}.{os.getpid()}.tmp")
    replaced = os.path.join(directory, f".{VARIABLES_DIR}.{os.getpid()}.old")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(temporary, variables, force=True)
    if os.path.exists(final):  # --overwrite: the previous conversion's variables
        os.replace(final, replaced)
    os.replace(temporary, final)
    shutil.rmtree(replaced, ignore_errors=True)
    files.write_json(os.path.join(directory, CONFIG_JSON), config.to_dict(), indent=2,
                     sort_keys=True)


def is_train_workdir(directory) -> bool:
    """Whether `directory` is a train.py workdir (its `checkpoints/` or `metrics.jsonl`)."""
    return (os.path.isdir(os.path.join(directory, "checkpoints"))
            or os.path.exists(os.path.join(directory, "metrics.jsonl")))


def check_converted_destination(directory, overwrite: bool = False):
    """Refuse (UsageError naming the folder) a destination where `save_converted` would
    replace or shadow files it did not write: an existing file; a train.py workdir (a
    `config.json` there would take precedence over its training checkpoints) or an exported
    model, even with `overwrite`; any other non-empty folder unless `overwrite`, which then
    replaces its `config.json` and `variables/` only. Creates nothing."""
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        return
    if not os.path.isdir(directory):
        raise UsageError(f"{directory}: exists and is not a folder")
    if is_train_workdir(directory):
        raise UsageError(f"{directory} is a train.py workdir: a converted checkpoint there would "
                         "take the place of its training checkpoints; choose another folder")
    if os.path.exists(os.path.join(directory, EXPORTED_STABLEHLO)):
        raise UsageError(f"{directory} holds an exported model ({EXPORTED_STABLEHLO}); choose "
                         "another folder")
    entries = sorted(os.listdir(directory))
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise UsageError(f"{directory} is not empty ({shown}); choose a new or empty folder, or "
                         f"overwrite (convert.py --overwrite) to replace its {CONFIG_JSON} and "
                         f"{VARIABLES_DIR}/ only")


# ------------------------------------------------------------------------------------------------
# Exported models
# ------------------------------------------------------------------------------------------------


def flatten_by_path(tree, prefix: str = "") -> dict:
    """`{'a/b/c': array}` of a nested dict of arrays."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) or hasattr(value, "items"):
            flat.update(flatten_by_path(value, path + "/"))
        else:
            flat[path] = np.asarray(value)
    return flat


def unflatten_by_path(flat: dict) -> dict:
    """The inverse of `flatten_by_path`."""
    tree = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def save_exported(directory, serialized: bytes, variables, config: dict):
    """Write an exported model: the serialized `jax.export.Exported`, its variables keyed by
    parameter path, and `config` (what host pre/post-processing needs) as JSON; each file
    whole or not at all (`files.atomic_open`)."""
    os.makedirs(directory, exist_ok=True)
    with files.atomic_open(os.path.join(directory, EXPORTED_STABLEHLO), "wb") as f:
        f.write(serialized)
    with files.atomic_open(os.path.join(directory, EXPORTED_VARIABLES), "wb") as f:
        np.savez(f, **flatten_by_path(variables))
    files.write_json(os.path.join(directory, CONFIG_JSON), config, indent=2, sort_keys=True)


def read_exported(directory):
    """(serialized program bytes, variables nested dict, config dict) written by
    `save_exported`."""
    paths = [os.path.join(directory, name)
             for name in (EXPORTED_STABLEHLO, EXPORTED_VARIABLES, CONFIG_JSON)]
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: missing; is {directory} an exported model?")
    with open(paths[0], "rb") as f:
        serialized = f.read()
    with np.load(paths[1]) as data:
        variables = unflatten_by_path({name: data[name] for name in data.files})
    with open(paths[2]) as f:
        config = json.load(f)
    return serialized, variables, config


def _load_training_checkpoint(directory):
    """(model config, variables, training config dict) of the latest step in a train.py workdir
    (or its `checkpoints/` folder)."""
    ocp = _ocp()
    directory = os.path.abspath(directory)
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        directory = os.path.join(directory, "checkpoints")
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"{directory}: no checkpoint step saved yet (a train.py run "
                                  "that stopped before its first checkpoint?)")
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(local_restore_target(directory, step)),
                config=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax / TensorStore raise many kinds
            raise CheckpointError(f"{directory}: step {step} cannot be restored: "
                                  f"{_first_line(e)}") from e
    state, train_config = restored["state"], dict(restored["config"])
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
    log.info("restored step %d from %s", step, directory)
    config = _model_config(train_config.get("model"), f"{directory}/{step}/config")
    return config, variables, train_config


def _load_converted(directory):
    """(config, variables) written by `save_converted`."""
    ocp = _ocp()
    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, CONFIG_JSON)
    variables_path = os.path.join(directory, VARIABLES_DIR)
    config = _model_config(_read_json(config_path), config_path)
    if not os.path.isdir(variables_path):
        raise CheckpointError(f"{variables_path}: missing; {directory} has a {CONFIG_JSON} but no "
                              "variables (an interrupted conversion?)")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            variables = checkpointer.restore(variables_path)
    except Exception as e:  # Orbax / TensorStore raise many kinds
        raise CheckpointError(f"{variables_path}: cannot be restored: {_first_line(e)}") from e
    return config, variables


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None


def _model_config(values, where: str):
    """`model_config(**values)`, a CheckpointError naming `where` if they do not make one."""
    from maskrcnn_jax.config import model_config

    if not isinstance(values, dict):
        raise CheckpointError(f"{where}: expected a JSON object of model settings, got "
                              f"{type(values).__name__}")
    try:
        return model_config(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: not a valid model config: {e}") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


# ------------------------------------------------------------------------------------------------
# Weights in any format
# ------------------------------------------------------------------------------------------------


class Weights(NamedTuple):
    """What `load_weights` reads: the model config (None for a backbone alone), the variables
    `{'params', 'batch_stats'}`, and a train.py workdir's run config (else None)."""

    config: Optional[object]
    variables: dict
    train_config: Optional[dict]


def load_weights(path, config=None) -> Weights:
    """The weights at `path`, in any format (the module docstring):
      * a converted checkpoint folder (`config.json` + `variables/`);
      * a train.py workdir (or its `checkpoints/` folder): its latest step, with the run config;
      * an exported model folder (`inference.stablehlo`): its variables and config;
      * a torchvision state dict file (`.pth` / `.pt`; needs torch): a Mask R-CNN's, converted
        (`from_torchvision`, with `config.frozen_bn_eps` when `config` is given), or an ImageNet
        ResNet's: config None and the backbone's variables `{'params': {'backbone': ...},
        'batch_stats': {'backbone': ...}}`.

    Args:
      path: a file or folder as above.
      config: the model config the weights are for (used to convert a `.pth`); the caller
        checks the variables against it (`models.variables.check_variables`, or
        `finetune.adapt_variables` for another class count).

    Raises:
      FileNotFoundError: naming `path` when it does not exist (nothing is created).
      CheckpointError: naming the file or folder when `path` holds none of these formats, or
        one that cannot be read (invalid JSON, an unknown config key, damaged variables, a
        truncated `.pth`, both a train.py run and a converted checkpoint).
    """
    path = os.path.expanduser(str(path))
    if os.path.isfile(path) and path.endswith((".pth", ".pt")):
        return _load_state_dict_file(path, config)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory or .pth file")
    has = {name: os.path.exists(os.path.join(path, name))
           for name in (EXPORTED_STABLEHLO, CONFIG_JSON, "checkpoints")}
    if has[EXPORTED_STABLEHLO]:
        _, variables, values = _read_exported_checked(path)
        values = {k: v for k, v in values.items() if k != "export_batch_size"}
        return Weights(_model_config(values, os.path.join(path, CONFIG_JSON)), variables, None)
    if has[CONFIG_JSON] and has["checkpoints"]:
        raise CheckpointError(
            f"{path} holds both a train.py run (checkpoints/) and a converted checkpoint "
            f"({CONFIG_JSON}, {VARIABLES_DIR}/): move one of them to a folder of its own")
    if has[CONFIG_JSON]:
        return Weights(*_load_converted(path), None)
    if has["checkpoints"] or any(name.isdigit() for name in os.listdir(path)):
        return Weights(*_load_training_checkpoint(path))
    raise CheckpointError(
        f"{path}: not a checkpoint: no {CONFIG_JSON} (convert.py), checkpoints/ (a train.py "
        f"workdir) or {EXPORTED_STABLEHLO} (an exported model)")


def _read_exported_checked(path):
    try:
        return read_exported(path)
    except (OSError, ValueError) as e:  # a missing file, bad JSON, a damaged npz
        raise CheckpointError(f"{path}: exported model cannot be read: {_first_line(e)}") from e


def _load_state_dict_file(path: str, config) -> Weights:
    from maskrcnn_jax.config import STATIC_DEFAULTS
    from maskrcnn_jax.torchvision.convert import (
        backbone_from_torchvision_resnet,
        from_torchvision,
        load_state_dict,
    )

    state_dict = load_state_dict(path)
    try:
        if not any(k.startswith("backbone.") for k in state_dict):  # an ImageNet classifier
            backbone = backbone_from_torchvision_resnet(state_dict)
            return Weights(None, {k: {"backbone": v} for k, v in backbone.items()}, None)
        eps = STATIC_DEFAULTS["frozen_bn_eps"] if config is None else config.frozen_bn_eps
        return Weights(*from_torchvision(state_dict, frozen_bn_eps=eps), None)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: not a torchvision Mask R-CNN or ResNet state dict: "
                              f"{_first_line(e)}") from e
