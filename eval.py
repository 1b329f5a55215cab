"""COCO evaluation (box and mask AP) of a checkpoint on a data set split.

    python eval.py --checkpoint DIR [--data shapes|coco_instances] [--data_dir ~/tensorflow_datasets]
                   [--split validation] [--manual_dir COCO_FOLDER] [--workdir OUT] [--batch_size 8]

DIR is either
  (a) a converted checkpoint (`python -m maskrcnn_jax.convert`: `config.json` + `variables/`), or
  (b) a training workdir of train.py (`checkpoints/<step>/{state,config,data}`): the latest step's
      parameters and batch statistics are evaluated with the model config saved beside them, and
      the data set defaults to the one it was trained on (its eval split).
Prints the 12-line COCO summaries and writes detections.json and metrics.json into --workdir
(default: DIR).
"""

import argparse
import os
import sys


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


def load_source(args, train_config):
    """The data source of the requested split; defaults from the training config if any."""
    from maskrcnn_jax.data import builders

    data_cfg = (train_config or {}).get("data", {})
    name = args.data or data_cfg.get("name", "shapes")
    data_dir = os.path.expanduser(args.data_dir or data_cfg.get("data_dir") or "~/tensorflow_datasets")
    split = args.split or data_cfg.get("eval_split", "validation")
    manual_dir = args.manual_dir or data_cfg.get("manual_dir") or None
    if name == "shapes":
        options = data_cfg.get("shapes") if data_cfg.get("name") == "shapes" else None
        config = args.data_config or (builders.shapes_config(**options) if options else None)
        return builders.load("shapes", data_dir, split, config=config)
    return builders.load(name, data_dir, split,
                         manual_dir=os.path.expanduser(manual_dir) if manual_dir else None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="converted checkpoint directory or train.py workdir")
    parser.add_argument("--data", choices=["shapes", "coco_instances"], default=None,
                        help="data set (default: the training config's, else shapes)")
    parser.add_argument("--data_dir", default=None, help="TFDS data directory")
    parser.add_argument("--split", default=None, help="split (default: validation)")
    parser.add_argument("--manual_dir", default=None, help="COCO folder (coco_instances)")
    parser.add_argument("--data_config", default=None,
                        help="builder config name (e.g. a shapes config such as n2000_200_seed0)")
    parser.add_argument("--workdir", default=None, help="output directory (default: --checkpoint)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_images", type=int, default=None)
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)

    from maskrcnn_jax.evaluation import evaluate

    config, variables, train_config = load_checkpoint(os.path.expanduser(args.checkpoint))
    source = load_source(args, train_config)
    metrics = evaluate(config, variables, source, batch_size=args.batch_size,
                       workdir=args.workdir or args.checkpoint, max_images=args.max_images,
                       progress=not args.no_progress)
    print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.endswith(("/AP", "/AP50"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
