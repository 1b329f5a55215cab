"""Detect objects in image files; write a picture and COCO-format detections per image.

    python predict.py --checkpoint=DIR --out=DIR IMAGE [IMAGE ...]
        [--score_threshold=0.5] [--class_names=names.txt] [--batch_size=1]
        [--exif_transpose=true] [--max_pixels=120000000]
        [--coordinator_address=HOST:PORT --num_processes=N --process_id=I | --distributed]

--checkpoint is a directory written by convert.py (config.json + Orbax variables) or a train.py
workdir. For each image, OUT/<name>.png shows the masks, boxes, labels and scores drawn over it
and OUT/<name>.json holds its detections in COCO results format (bbox as xywh, masks as RLE,
category_id = the 1-based label; image_id = the image's position on the command line). Each
output is written under a temporary name and renamed into place once complete.

EXIF orientation: a photo stored sideways with an EXIF orientation tag (phones do this) is
turned upright first (--exif_transpose, on by default), so the boxes, masks and the PNG match
what an image viewer shows; --exif_transpose=false detects on the stored pixels, as
torchvision's `decode_image` and PIL's `Image.open` give them (the `Predictor` API takes arrays
as given).

Memory: masks are pasted one box extent at a time (never a full-image array per detection) and
the image is normalised only where the resize reads it, so the peak memory is a few times the
decoded image (see BENCHMARKS.md); an image of more than --max_pixels pixels is skipped with a
message naming it and its size (raise the limit to run it).

Outputs never overwrite an input or each other: --out may not be a folder that holds one of
the inputs (symlinks resolved), no output may be the same file as an input (symlinks and hard
links compared, `os.path.samefile`), and inputs whose names collide (a/img.jpg, b/img.png) get
numbered outputs (img.png, img_1.png, in command-line order). Images that cannot be read or
used (too large, an extreme aspect ratio) are reported with their path and reason and skipped;
the exit status is then 1, after every other image has been processed. Usage errors are one
line on stderr with exit status 2, before anything is loaded or created (--verbose adds the
traceback).

Several processes (hosts) share the work when every one runs the same command with the
multi-process flags (as train.py): process p of P detects its contiguous share of the images
(in command-line order) on its own devices and writes their outputs, so each output is written
once; the output names are those of a single-process run.
"""

import os
import sys

from absl import flags

from maskrcnn_jax import cli, files

# Images above this many pixels are skipped (--max_pixels): about 12000 x 10000. Predict's peak
# memory grows with the image (BENCHMARKS.md); PIL refuses twice its own 89.5M limit anyway.
DEFAULT_MAX_PIXELS = 120_000_000

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
flags.DEFINE_bool("exif_transpose", True, "turn each image upright by its EXIF orientation tag "
                  "before detection (boxes then match what a viewer shows); false: detect on "
                  "the stored pixels, as torchvision's decode_image", flag_values=FLAGS)
flags.DEFINE_integer("max_pixels", DEFAULT_MAX_PIXELS, "images with more pixels (height x "
                     "width) are skipped, with a message", lower_bound=1, flag_values=FLAGS)
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


def output_paths(images, out) -> list[tuple[str, str]]:
    """`(picture, detections)` output paths of each image, in `out`."""
    return [(os.path.join(out, stem + ".png"), os.path.join(out, stem + ".json"))
            for stem in output_stems(images)]


def check_paths(images, checkpoint, out, class_names_file=None):
    """Usage errors before anything is loaded or created (`UsageError` naming the path): no
    images, no checkpoint folder, an `out` that is a file, an `out` that holds an input (after
    resolving symlinks), or an output that is the same file as an input (a symlink or hard
    link to it, `os.path.samefile`)."""
    from maskrcnn_jax.errors import UsageError

    if not images:
        raise UsageError("no input images given")
    if not checkpoint:
        raise UsageError("--checkpoint is required")
    if not out:
        raise UsageError("--out is required")
    if not os.path.isdir(checkpoint):
        raise UsageError(f"--checkpoint {checkpoint}: no such directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a folder")
    if class_names_file and not os.path.isfile(class_names_file):
        raise UsageError(f"--class_names {class_names_file}: no such file")
    out_real = os.path.realpath(out)
    for path in images:
        for folder in (os.path.dirname(os.path.abspath(path)),
                       os.path.dirname(os.path.realpath(path))):
            if os.path.realpath(folder) == out_real:
                raise UsageError(f"--out {out} holds the input {path}; choose another folder so "
                                 "that no input can be overwritten")
    inputs = {}
    for path in images:
        identity = files.file_identity(path)
        if identity is not None:
            inputs.setdefault(identity, path)
    for outputs in output_paths(images, out):
        for output in outputs:
            identity = files.file_identity(output)
            if identity in inputs:
                raise UsageError(f"the output {output} is the input {inputs[identity]} (a link "
                                 "to the same file); choose another --out so that no input "
                                 "can be overwritten")


def predict_files(images, checkpoint, out, score_threshold=0.5, class_names_file=None,
                  batch_size=1, program_cache_dir=None, exif_transpose=True,
                  max_pixels=DEFAULT_MAX_PIXELS) -> int:
    """Run the model on image files (see the module docstring); returns the exit status.
    With several JAX processes, this process's share of `images` only.

    Raises:
      UsageError: see `check_paths`. CheckpointError: the checkpoint cannot be read, or its
        weights do not fit its config.
    """
    import jax
    from PIL import Image

    from maskrcnn_jax.checkpoints import load_weights
    from maskrcnn_jax.data.eval_shards import shard_bounds
    from maskrcnn_jax.data.images import read_rgb
    from maskrcnn_jax.errors import CheckpointError, ImageError
    from maskrcnn_jax.inference.coco_results import detections_to_coco, pasted_mask_rles
    from maskrcnn_jax.inference.draw import detections_picture
    from maskrcnn_jax.inference.predictor import Predictor

    check_paths(images, checkpoint, out, class_names_file)
    config, variables, train_config = load_weights(checkpoint)
    class_names = None
    if train_config and train_config.get("data", {}).get("name") == "shapes":
        from maskrcnn_jax.data.shapes import CLASS_NAMES

        class_names = ["background", *CLASS_NAMES]
    if class_names_file:
        with open(class_names_file) as f:
            class_names = [line.strip() for line in f]
    try:
        predictor = Predictor(config, variables, batch_size=batch_size,
                              program_cache_dir=program_cache_dir)
    except ValueError as e:  # the weights do not fit the config (e.g. another class count)
        raise CheckpointError(f"{checkpoint}: {e}") from None
    if Image.MAX_IMAGE_PIXELS is not None:  # PIL refuses above twice its limit: ours decides
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS, max_pixels)
    os.makedirs(out, exist_ok=True)
    skipped = []
    start, end = shard_bounds(len(images), jax.process_index(), jax.process_count())
    for image_id, (path, (picture, json_path)) in enumerate(zip(images,
                                                                  output_paths(images, out))):
        if not start <= image_id < end:  # another process's image
            continue
        try:
            image = read_rgb(path, exif_transpose=exif_transpose, max_pixels=max_pixels)
            # Mask probabilities on their boxes: pasted one box extent at a time below.
            detections = predictor([image], paste_masks=False)[0]
        except ImageError as e:
            print(f"skipped {path}: {e.reason}", file=sys.stderr, flush=True)
            skipped.append(path)
            continue
        drawn = detections_picture(image, detections, class_names, score_threshold)
        with files.atomic_open(picture, "wb") as f:
            drawn.save(f, format="PNG")
        del drawn
        labels = detections["labels"]
        results = detections_to_coco(image_id, detections["boxes"], detections["scores"], labels,
                                     None, {int(v): int(v) for v in labels})
        rles = pasted_mask_rles(detections["mask_probs"], detections["boxes"], image.shape[:2])
        for result, rle in zip(results, rles):
            result["segmentation"] = rle
        files.write_json(json_path, results)
        shown = int((detections["scores"] >= score_threshold).sum())
        print(f"{path}: {len(detections['scores'])} detections ({shown} >= {score_threshold}) "
              f"-> {picture}", flush=True)
    if skipped:
        print(f"{len(skipped)} of {end - start} images skipped: {', '.join(skipped)}",
              file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv=None) -> int:
    images = cli.parse(FLAGS, argv, __doc__, "predict.py")
    with cli.reporting("predict.py", FLAGS.verbose):
        check_paths(images, FLAGS.checkpoint, FLAGS.out, FLAGS.class_names)
        cli.start_runtime(FLAGS, "predict.py")
        cache = FLAGS.compilation_cache_dir
        return predict_files(
            images, FLAGS.checkpoint, FLAGS.out, FLAGS.score_threshold, FLAGS.class_names,
            FLAGS.batch_size,
            program_cache_dir=None if not cache or cache.lower() == "none" else cache,
            exif_transpose=FLAGS.exif_transpose, max_pixels=FLAGS.max_pixels)


if __name__ == "__main__":
    sys.exit(main())
