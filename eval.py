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

from maskrcnn_jax.checkpoints import load_checkpoint  # noqa: F401  (re-exported for callers)


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
