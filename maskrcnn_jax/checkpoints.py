"""Load model weights for inference from either kind of checkpoint directory.

- a converted torchvision checkpoint (`python -m maskrcnn_jax.convert`): `config.json` +
  Orbax `variables/`;
- a train.py workdir (or its `checkpoints/` folder): the latest step's train state and config.
"""

import os


def load_training_checkpoint(directory):
    """(model config, variables, training config dict) of the latest step in a train.py workdir
    (or its `checkpoints/` folder)."""
    import orbax.checkpoint as ocp

    from maskrcnn_jax.config import model_config

    directory = os.path.abspath(directory)
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        directory = os.path.join(directory, "checkpoints")
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint steps found")
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
    state, train_config = restored["state"], dict(restored["config"])
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
    print(f"restored step {step} from {directory}")
    return model_config(**train_config["model"]), variables, train_config


def load_checkpoint(directory):
    """(model config, variables, training config dict or None) of a converted checkpoint or a
    training workdir (see the module docstring)."""
    from maskrcnn_jax import convert

    if os.path.exists(os.path.join(directory, "config.json")):
        config, variables = convert.load(directory)
        return config, variables, None
    return load_training_checkpoint(directory)


