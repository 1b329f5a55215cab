"""Detect objects in image files; write a picture and COCO-format detections per image.

    python predict.py --checkpoint=DIR --out=DIR IMAGE [IMAGE ...]
        [--score_threshold=0.5] [--class_names=names.txt] [--batch_size=1]
        [--coordinator_address=HOST:PORT --num_processes=N --process_id=I | --distributed]

--checkpoint is a directory written by convert.py (config.json + Orbax variables) or a train.py
workdir. For each image, OUT/<name>.png shows the masks, boxes, labels and scores drawn over it
and OUT/<name>.json holds its detections in COCO results format (bbox as xywh, masks as RLE,
category_id = the 1-based label; image_id = the image's position on the command line).

Outputs never overwrite an input or each other: --out may not be a folder that holds one of
the inputs, and inputs whose names collide (a/img.jpg, b/img.png) get numbered outputs
(img.png, img_1.png, in command-line order). Images that cannot be read are reported and
skipped; the exit status is then 1, after every other image has been processed.

Several processes (hosts) share the work when every one runs the same command with the
multi-process flags (as train.py): process p of P detects its contiguous share of the images
(in command-line order) on its own devices and writes their outputs, so each output is written
once; the output names are those of a single-process run.
"""

import json
import os
import sys

from absl import flags

from maskrcnn_jax import cli

FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "converted checkpoint directory or train.py workdir",
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "output folder (created; may not hold any input image)",
                    flag_values=FLAGS)
flags.DEFINE_float("score_threshold", 0.5, "detections drawn (all are written to the JSON)",
                   flag_values=FLAGS)
flags.DEFINE_string("class_names", None, "text file, one name per line, line 0 = background",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 1, "images per compiled call", lower_bound=1,
                     flag_values=FLAGS)
cli.define_runtime_flags(FLAGS)


def output_stems(paths) -> list[str]:
    """Unique output names for `paths`: each file's stem, numbered `_1`, `_2`, ... when an
    earlier input already took it."""
    stems, used = [], set()
    for path in paths:
        stem = name = os.path.splitext(os.path.basename(path))[0]
        number = 0
        while name in used:
            number += 1
            name = f"{stem}_{number}"
        used.add(name)
        stems.append(name)
    return stems


def check_paths(images, checkpoint, out):
    """Usage errors before anything is loaded or created (message names the path)."""
    if not images:
        raise SystemExit("predict.py: no input images given")
    if not checkpoint:
        raise SystemExit("predict.py: --checkpoint is required")
    if not out:
        raise SystemExit("predict.py: --out is required")
    if not os.path.isdir(checkpoint):
        raise SystemExit(f"predict.py: --checkpoint {checkpoint}: no such directory")
    out_real = os.path.realpath(out)
    for path in images:
        if os.path.realpath(os.path.dirname(os.path.abspath(path))) == out_real:
            raise SystemExit(f"predict.py: --out {out} holds the input {path}; choose another "
                             "folder so that no input can be overwritten")


def predict_files(images, checkpoint, out, score_threshold=0.5, class_names_file=None,
                  batch_size=1, program_cache_dir=None) -> int:
    """Run the model on image files (see the module docstring); returns the exit status.
    With several JAX processes, this process's share of `images` only."""
    import jax
    from PIL import Image

    from maskrcnn_jax.checkpoints import load_weights
    from maskrcnn_jax.data.images import read_rgb
    from maskrcnn_jax.data.eval_shards import shard_bounds
    from maskrcnn_jax.inference.coco_results import detections_to_coco
    from maskrcnn_jax.inference.draw import draw_detections
    from maskrcnn_jax.inference.predictor import Predictor

    check_paths(images, checkpoint, out)
    config, variables, train_config = load_weights(checkpoint)
    class_names = None
    if train_config and train_config.get("data", {}).get("name") == "shapes":
        from maskrcnn_jax.data.shapes import CLASS_NAMES

        class_names = ["background", *CLASS_NAMES]
    if class_names_file:
        with open(class_names_file) as f:
            class_names = [line.strip() for line in f]
    predictor = Predictor(config, variables, batch_size=batch_size,
                          program_cache_dir=program_cache_dir)
    os.makedirs(out, exist_ok=True)
    failed = []
    start, end = shard_bounds(len(images), jax.process_index(), jax.process_count())
    for image_id, (path, stem) in enumerate(zip(images, output_stems(images))):
        if not start <= image_id < end:  # another process's image
            continue
        try:
            image = read_rgb(path)
            detections = predictor([image])[0]
        except ValueError as e:
            print(f"skipped {e}", file=sys.stderr, flush=True)
            failed.append(path)
            continue
        picture = os.path.join(out, stem + ".png")
        Image.fromarray(draw_detections(image, detections, class_names, score_threshold)).save(
            picture)
        labels = detections["labels"]
        with open(os.path.join(out, stem + ".json"), "w") as f:
            json.dump(detections_to_coco(image_id, detections["boxes"], detections["scores"],
                                         labels, detections["masks"],
                                         {int(v): int(v) for v in labels}), f)
        shown = int((detections["scores"] >= score_threshold).sum())
        print(f"{path}: {len(detections['scores'])} detections ({shown} >= {score_threshold}) "
              f"-> {picture}", flush=True)
    if failed:
        print(f"{len(failed)} of {end - start} images could not be read: {', '.join(failed)}",
              file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv=None) -> int:
    images = cli.parse(FLAGS, argv, __doc__, "predict.py")
    check_paths(images, FLAGS.checkpoint, FLAGS.out)
    cli.start_runtime(FLAGS, "predict.py")
    cache = FLAGS.compilation_cache_dir
    return predict_files(images, FLAGS.checkpoint, FLAGS.out, FLAGS.score_threshold,
                         FLAGS.class_names, FLAGS.batch_size,
                         program_cache_dir=None if not cache or cache.lower() == "none" else cache)


if __name__ == "__main__":
    sys.exit(main())
