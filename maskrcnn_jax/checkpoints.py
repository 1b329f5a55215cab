"""Every on-disk format of maskrcnn_jax, read and written in one place.

- A train.py workdir: `workdir/checkpoints/<step>/` (Orbax) with the train state, the data
  iterator's position and the run config (`checkpoint_manager`, `save_train_state`,
  `restore_train_state`; `load_training_checkpoint` for inference).
- A converted checkpoint (`convert.py`, `save_converted`): `config.json` + Orbax `variables/`.
- An exported model (`inference.export`): `inference.stablehlo`, `variables.npz` keyed by
  parameter path (`params/backbone/conv1/kernel`), `config.json`.

`load_checkpoint(directory)` reads either of the first two for inference.
"""

import json
import logging
import os
from typing import Optional

import numpy as np

CONFIG_JSON = "config.json"
VARIABLES_DIR = "variables"
EXPORTED_STABLEHLO = "inference.stablehlo"
EXPORTED_VARIABLES = "variables.npz"

log = logging.getLogger(__name__)


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


# ------------------------------------------------------------------------------------------------
# train.py workdirs
# ------------------------------------------------------------------------------------------------


def checkpoint_manager(workdir: str, keep: int):
    """Asynchronous Orbax manager in `workdir/checkpoints` keeping the last `keep` steps."""
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


def save_train_state(manager, step: int, state, data_state: bytes, config) -> bool:
    """Start saving the state, the data iterator's position (grain `get_state()`, JSON) and
    the run config at `step`; returns whether a save started (False if it already exists)."""
    ocp = _ocp()
    if step in manager.all_steps():
        return False
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(json.loads(data_state)),
        config=ocp.args.JsonSave(config.to_dict())))


def config_differences(saved: dict, requested: dict, prefix: str = "") -> list[str]:
    """`key: saved X, requested Y` for every (nested) key whose values differ."""
    lines = []
    for key in sorted(set(saved) | set(requested)):
        name = f"{prefix}{key}"
        a, b = saved.get(key, "<absent>"), requested.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_differences(a, b, name + ".")
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (
                list(b) if isinstance(b, (list, tuple)) else b):
            lines.append(f"{name}: saved {a!r}, requested {b!r}")
    return lines


def restore_train_state(manager, target, model_config: Optional[dict] = None):
    """(state, data_state bytes, step) of the newest checkpoint that restores, with the
    shardings of `target`; None when there is none.

    A step that cannot be restored (a damaged or partly deleted folder) is logged with the step
    and the reason, and the previous step is tried. When `model_config` (the requested model
    config as a dict) differs from the one saved with a step, the differing keys are logged; if
    that step then does not fit `target`, a ValueError lists them instead of Orbax's tree dump.
    """
    import jax

    ocp = _ocp()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        differences = []
        if model_config is not None:
            try:
                saved = manager.restore(step, args=ocp.args.Composite(
                    config=ocp.args.JsonRestore())).config
                differences = config_differences(dict(saved).get("model", {}), model_config)
            except Exception:  # a damaged step: reported below, when its state fails
                differences = []
            if differences:
                log.warning("checkpoint step %d was written with another model config:\n  %s",
                            step, "\n  ".join(differences))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax / TensorStore raise many kinds
            if differences:
                raise ValueError(
                    f"{manager.directory}: checkpoint step {step} does not fit the requested "
                    "model config, which differs from the saved one in:\n  "
                    + "\n  ".join(differences)) from None
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            log.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying the "
                        "previous step", step, manager.directory, type(e).__name__, reason)
            failures.append(step)
            continue
        if failures:
            log.warning("resumed from step %d; steps %s could not be restored", step, failures)
        return restored.state, json.dumps(restored.data).encode(), step
    if failures:
        raise RuntimeError(f"{manager.directory}: no checkpoint step restores (tried "
                           f"{failures}); move the folder away to start afresh")
    return None


def delete_step(manager, step: int):
    """Remove a saved step (after `wait_until_finished`)."""
    manager.wait_until_finished()
    if step in manager.all_steps():
        manager.delete(step)


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


def load_training_checkpoint(directory):
    """(model config, variables, training config dict) of the latest step in a train.py workdir
    (or its `checkpoints/` folder)."""
    from maskrcnn_jax.config import model_config

    ocp = _ocp()
    directory = os.path.abspath(directory)
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        directory = os.path.join(directory, "checkpoints")
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint steps found")
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(local_restore_target(directory, step)),
            config=ocp.args.JsonRestore()))
    state, train_config = restored["state"], dict(restored["config"])
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
    print(f"restored step {step} from {directory}")
    return model_config(**train_config["model"]), variables, train_config


# ------------------------------------------------------------------------------------------------
# Converted checkpoints
# ------------------------------------------------------------------------------------------------


def save_converted(directory, config, variables):
    """Write `variables` as an Orbax checkpoint in `directory/variables` and the config as
    `directory/config.json`."""
    ocp = _ocp()
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, VARIABLES_DIR), variables, force=True)
    with open(os.path.join(directory, CONFIG_JSON), "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)


def load_converted(directory):
    """(config, variables) written by `save_converted`."""
    from maskrcnn_jax.config import model_config

    ocp = _ocp()
    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, CONFIG_JSON)
    if not os.path.exists(config_path):
        raise FileNotFoundError(
            f"{config_path}: no config.json; is {directory} a converted checkpoint?")
    with open(config_path) as f:
        config = model_config(**json.load(f))
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(os.path.join(directory, VARIABLES_DIR))
    return config, variables


def load_checkpoint(directory):
    """(model config, variables, training config dict or None) of a converted checkpoint or a
    train.py workdir (see the module docstring).

    Raises:
      FileNotFoundError: naming `directory` when it does not exist (nothing is created).
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    if os.path.exists(os.path.join(directory, CONFIG_JSON)):
        config, variables = load_converted(directory)
        return config, variables, None
    return load_training_checkpoint(directory)


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
    parameter path, and `config` (what host pre/post-processing needs) as JSON."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, EXPORTED_STABLEHLO), "wb") as f:
        f.write(serialized)
    np.savez(os.path.join(directory, EXPORTED_VARIABLES), **flatten_by_path(variables))
    with open(os.path.join(directory, CONFIG_JSON), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_exported(directory):
    """(serialized bytes, variables nested dict, config dict) written by `save_exported`."""
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
