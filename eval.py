"""COCO evaluation (box and mask AP) of a checkpoint on a data set split.

    python eval.py --checkpoint=DIR [--data=shapes|coco_instances] [--data_dir=~/tensorflow_datasets]
                   [--split=validation] [--manual_dir=COCO_FOLDER] [--workdir=OUT] [--batch_size=8]
                   [--coco_eval=pycocotools|faster_coco_eval]
                   [--coordinator_address=HOST:PORT --num_processes=N --process_id=I
                    | --distributed]

DIR is either
  (a) a converted checkpoint (convert.py: `config.json` + `variables/`), or
  (b) a train.py workdir (`checkpoints/<step>/{state,config,data}`): the latest step's
      parameters and batch statistics are evaluated with the model config saved beside them, and
      the data set defaults to the one it was trained on (its eval split).
Prints the 12-line COCO summaries and writes detections.json and metrics.json into --workdir
(default: DIR), each whole (a temporary file renamed into place) and only after an evaluation
of at least one image succeeded: a failed run leaves an earlier run's files as they were.
Usage errors (a --checkpoint that does not exist, an unknown split, --max_images < 1, ...) are
one line on stderr with exit status 2 and create nothing; a checkpoint or data set that cannot
be used exits 1, also in one line (--verbose adds the traceback).

Several processes (hosts) evaluate together when every one runs the same command with the
multi-process flags (as train.py): each reads its share of the split on its own devices, process
0 runs COCOeval and writes the files, and the metrics equal a single-process run's.
"""

import os
import sys

from absl import flags

from maskrcnn_jax import cli, runtime

FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "converted checkpoint directory or train.py workdir",
                    flag_values=FLAGS)
flags.DEFINE_enum("data", None, ["shapes", "coco_instances"],
                  "data set (default: the training config's, else shapes)", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "TFDS data directory", flag_values=FLAGS)
flags.DEFINE_string("split", None, "split (default: the training config's eval split, else "
                    "validation)", flag_values=FLAGS)
flags.DEFINE_string("manual_dir", None, "COCO folder (coco_instances)", flag_values=FLAGS)
flags.DEFINE_string("data_config", None, "builder config name (e.g. a shapes config such as "
                    "n2000_200_seed0)", flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "output directory (default: --checkpoint)",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "images per compiled call", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("max_images", None, "evaluate the first N (>= 1) images only",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=FLAGS)
flags.DEFINE_enum("coco_eval", "pycocotools", ["pycocotools", "faster_coco_eval"],
                  "COCOeval implementation: pycocotools, or faster-coco-eval's C++ one (the same "
                  "stats, several times faster; pip install faster-coco-eval)", flag_values=FLAGS)
cli.define_runtime_flags(FLAGS)


def load_source(train_config, data=None, data_dir=None, split=None, manual_dir=None,
                data_config=None):
    """The data source of the requested split; unset values default from the training config
    (a train.py workdir's), else shapes / ~/tensorflow_datasets / validation."""
    from maskrcnn_jax.data import builders

    data_cfg = (train_config or {}).get("data", {})
    name = data or data_cfg.get("name", "shapes")
    data_dir = os.path.expanduser(data_dir or data_cfg.get("data_dir") or "~/tensorflow_datasets")
    split = split or data_cfg.get("eval_split", "validation")
    manual_dir = manual_dir or data_cfg.get("manual_dir") or None
    if name == "shapes":
        options = data_cfg.get("shapes") if data_cfg.get("name") == "shapes" else None
        config = data_config or (builders.shapes_config(**options) if options else None)
        return builders.load("shapes", data_dir, split, config=config)
    return builders.load(name, data_dir, split,
                         manual_dir=os.path.expanduser(manual_dir) if manual_dir else None)


def main(argv=None) -> int:
    args = cli.parse(FLAGS, argv, __doc__, "eval.py")
    if args:
        cli.fail("eval.py", f"unexpected arguments {args} (see --help)")
    if not FLAGS.checkpoint:
        cli.fail("eval.py", "--checkpoint is required")
    checkpoint = os.path.expanduser(FLAGS.checkpoint)
    if not os.path.isdir(checkpoint):
        cli.fail("eval.py", f"--checkpoint {checkpoint}: no such directory")
    workdir = os.path.expanduser(FLAGS.workdir or checkpoint)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        cli.fail("eval.py", f"--workdir {workdir}: exists and is not a folder")
    with cli.reporting("eval.py", FLAGS.verbose):
        cli.start_runtime(FLAGS, "eval.py")

        from maskrcnn_jax.checkpoints import load_weights
        from maskrcnn_jax.errors import CheckpointError
        from maskrcnn_jax.inference.evaluation import evaluate
        from maskrcnn_jax.models.variables import check_variables

        config, variables, train_config = load_weights(checkpoint)
        try:
            check_variables(config, variables, where=f"{checkpoint}: the weights")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        source = load_source(train_config, FLAGS.data, FLAGS.data_dir, FLAGS.split,
                             FLAGS.manual_dir, FLAGS.data_config)
        metrics = evaluate(config, variables, source, batch_size=FLAGS.batch_size,
                           workdir=workdir, max_images=FLAGS.max_images,
                           progress=FLAGS.progress, coco_backend=FLAGS.coco_eval)
    if runtime.is_main_process():
        print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                       if k.endswith(("/AP", "/AP50"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
