"""Convert a torchvision Mask R-CNN checkpoint (.pth) into a maskrcnn_jax checkpoint directory.

    python convert.py MODEL.pth --out=DIR [--num_classes=91] [--min_size=800] ...
    python convert.py maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --out=DIR --frozen_bn_eps=0.0
    python convert.py MODEL.pth --out=DIR --compare=a.jpg,b.jpg   # + a stage-by-stage report

DIR gets `config.json` and Orbax `variables/` (read back by `maskrcnn_jax.checkpoints.load_weights`,
`predict.py`, `eval.py`). The architecture (backbone depth, class count, FPN and head widths) is
read from the state dict; the other flags take torchvision's keyword names and defaults (values
as JSON: --canvas_size=[800,1344]). The written checkpoint is loaded back and checked against
its config before success is reported. Needs torch (`pip install -e '.[torch]'`).

DIR must be new or empty: a non-empty folder is refused unless --overwrite, which replaces its
`config.json` and `variables/` and nothing else; a train.py workdir or an exported model is
always refused (a `config.json` there would take the place of its own weights). Both are
written under temporary names and renamed into place, so an interrupted run leaves DIR as it
was. Usage errors are one line on stderr (exit status 2; 1 for a .pth that cannot be read);
--verbose adds the traceback.

--compare runs torchvision's model with the same state dict beside the converted one on each
image and prints, per stage (backbone, FPN, RPN, proposals, box head on torchvision's
proposals, detections, masks), the max absolute and relative difference.
"""

import json
import os
import sys

import numpy as np
from absl import flags

from maskrcnn_jax import cli
from maskrcnn_jax.config import STATIC_DEFAULTS, TORCHVISION_DEFAULTS
from maskrcnn_jax.errors import UsageError

FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "output directory (new or empty)", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "--out may be a non-empty folder: its config.json and "
                  "variables/ are replaced, nothing else (never a train.py workdir)",
                  flag_values=FLAGS)
flags.DEFINE_float(
    "frozen_bn_eps", STATIC_DEFAULTS["frozen_bn_eps"],
    "eps of the backbone's FrozenBatchNorm2d; 0.0 for torchvision's official COCO_V1 checkpoint, "
    "which torchvision runs with overwrite_eps(model, 0.0)", flag_values=FLAGS)
flags.DEFINE_list("compare", [], "image files: print a stage-by-stage parity report against "
                  "torchvision on each (needs torchvision)", flag_values=FLAGS)
_SETTINGS = [k for k in {**TORCHVISION_DEFAULTS, **STATIC_DEFAULTS} if k != "frozen_bn_eps"]
for _key in _SETTINGS:
    _default = {**TORCHVISION_DEFAULTS, **STATIC_DEFAULTS}[_key]
    flags.DEFINE_string(_key, None, f"JSON value (default: {json.dumps(_default)})",
                        flag_values=FLAGS)
cli.define_compilation_cache_flag(FLAGS)
cli.define_verbose_flag(FLAGS)


def _parse_value(key, text):
    """The JSON value of `--key=text`; a UsageError naming the flag when it is not of the
    default's kind (a number, a list, a string)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    default = {**TORCHVISION_DEFAULTS, **STATIC_DEFAULTS}[key]
    number = (int, float)
    if isinstance(default, number) and not isinstance(default, bool):
        expected, allowed = "a number", number
    elif isinstance(default, (tuple, list)):
        expected, allowed = "a JSON list", list
    else:
        return value
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise UsageError(f"--{key}={text}: expected {expected} (default {json.dumps(default)})")
    return value


def convert_file(path, out, frozen_bn_eps=STATIC_DEFAULTS["frozen_bn_eps"], compare=(),
                 overwrite=False, **overrides) -> int:
    """Convert `path` into `out` (see the module docstring); returns the exit status.

    Raises:
      UsageError: `out` may not be written (`checkpoints.check_converted_destination`), or a
        setting contradicts the state dict (naming both values).
      CheckpointError: `path` is not a readable torchvision Mask R-CNN state dict.
    """
    from maskrcnn_jax import checkpoints
    from maskrcnn_jax.models.variables import check_variables
    from maskrcnn_jax.torchvision.convert import from_torchvision, load_state_dict

    checkpoints.check_converted_destination(out, overwrite)  # before the long load
    state_dict = load_state_dict(path)
    try:
        config, variables = from_torchvision(state_dict, frozen_bn_eps=frozen_bn_eps,
                                             **overrides)
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path}: {e}") from e
    checkpoints.save_converted(out, config, variables, overwrite=overwrite)
    config, variables, _ = checkpoints.load_weights(out)
    check_variables(config, variables, where=f"{out}: the written variables")
    num_values = sum(int(np.size(v)) for v in checkpoints.flatten_by_path(variables).values())
    print(f"wrote {out}: {config.backbone}, {config.num_classes} classes, {num_values:,} values")
    if compare:
        _compare(state_dict, config, variables, compare)
    return 0


def _compare(state_dict, config, variables, image_paths):
    from maskrcnn_jax.data.images import read_rgb
    from maskrcnn_jax.inference.predictor import Predictor
    from maskrcnn_jax.testing.torch_models import torchvision_maskrcnn
    from maskrcnn_jax.torchvision.compare import compare_image, format_rows

    model = torchvision_maskrcnn(config)
    model.load_state_dict(state_dict)
    model.eval()
    predictor = Predictor(config, variables)
    for path in image_paths:
        image = read_rgb(path)
        print(f"\n{path} ({image.shape[0]}x{image.shape[1]})")
        print(format_rows(compare_image(model, predictor, image)))


def main(argv=None) -> int:
    args = cli.parse(FLAGS, argv, __doc__, "convert.py")
    if len(args) != 1:
        cli.fail("convert.py", f"expected one .pth file, got {args or 'none'} (see --help)")
    if not FLAGS.out:
        cli.fail("convert.py", "--out is required")
    if not os.path.isfile(args[0]):
        cli.fail("convert.py", f"{args[0]}: no such file")
    for image in FLAGS.compare:
        if not os.path.isfile(image):
            cli.fail("convert.py", f"--compare {image}: no such file")
    cli.enable_compilation_cache(FLAGS.compilation_cache_dir)
    with cli.reporting("convert.py", FLAGS.verbose):
        overrides = {k: _parse_value(k, FLAGS[k].value) for k in _SETTINGS
                     if FLAGS[k].value is not None}
        return convert_file(args[0], FLAGS.out, FLAGS.frozen_bn_eps, FLAGS.compare,
                            overwrite=FLAGS.overwrite, **overrides)


if __name__ == "__main__":
    sys.exit(main())
