"""A train.py run's resumable state in its workdir: `workdir/checkpoints/<step>/` (Orbax, saved
asynchronously, the last N kept) holding the train state, the data iterator's position and the
run config; restored into a target's shardings, falling back past damaged steps (the same step
on every process), with a one-line error when the requested model config does not fit.
(Weights for inference and fine-tuning: `maskrcnn_jax.checkpoints.load_weights`.)
"""

import json
import logging
import os
from typing import Optional

from maskrcnn_jax import runtime
from maskrcnn_jax.checkpoints import local_restore_target
from maskrcnn_jax.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


def _ocp():
    import orbax.checkpoint as ocp  # imported on use: Orbax starts threads at import

    return ocp


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
    and the reason, and the previous step is tried; with several processes, a step that fails
    in any of them is skipped by all, so that all resume from the same step. When `model_config` (the requested model
    config as a dict) differs from the one saved with a step, the differing keys are logged; if
    that step's arrays then do not fit `target`, a ConfigError lists them (before any restore,
    instead of Orbax's tree dump).
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
                if not _shapes_fit(manager.directory, step, abstract):
                    # Told before Orbax tries (and fails) to restore into the wrong shapes,
                    # which leaves its asynchronous readers failing at interpreter exit.
                    raise _config_mismatch(manager.directory, step, differences)
        restored, error = None, None
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax / TensorStore raise many kinds
            error = e
        # Every process resumes from the same step: one that fails anywhere is skipped by all.
        if not runtime.all_processes_agree(error is None):
            if error is not None and differences:
                raise _config_mismatch(manager.directory, step, differences) from None
            if error is None:
                reason = "another process could not restore it"
            else:
                text = str(error).strip()
                reason = (f"{type(error).__name__}: "
                          f"{text.splitlines()[0][:300] if text else ''}")
            log.warning("checkpoint step %d in %s cannot be restored (%s); trying the "
                        "previous step", step, manager.directory, reason)
            failures.append(step)
            continue
        if failures:
            log.warning("resumed from step %d; steps %s could not be restored", step, failures)
        return restored.state, json.dumps(restored.data).encode(), step
    if failures:
        raise CheckpointError(f"{manager.directory}: no checkpoint step restores (tried "
                              f"{failures}); move the folder away to start afresh")
    return None


def _config_mismatch(directory, step: int, differences: list[str]) -> ConfigError:
    return ConfigError(f"{directory}: checkpoint step {step} does not fit the requested model "
                       "config, which differs from the saved one in:\n  "
                       + "\n  ".join(differences))


def _shapes_fit(directory, step: int, abstract) -> bool:
    """Whether the arrays saved at `step` have the shapes and dtypes of `abstract`'s leaves
    (as multisets: Orbax's metadata tree names containers differently from the train state).
    A step whose metadata cannot be read counts as fitting (its restore reports it)."""
    import jax

    try:
        saved = local_restore_target(os.fspath(directory), step)
    except Exception:  # a damaged step: its restore is tried and reported
        return True

    def signature(tree):
        return sorted((tuple(leaf.shape), str(leaf.dtype)) for leaf in jax.tree.leaves(tree))

    return signature(saved) == signature(abstract)


def delete_step(manager, step: int):
    """Remove a saved step (after `wait_until_finished`)."""
    manager.wait_until_finished()
    if step in manager.all_steps():
        manager.delete(step)
