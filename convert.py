"""Convert a torchvision Mask R-CNN checkpoint (.pth) into a maskrcnn_jax checkpoint directory.

    python convert.py MODEL.pth --out=DIR [--num_classes=91] [--min_size=800] ...
    python convert.py maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --out=DIR --frozen_bn_eps=0.0
    python convert.py MODEL.pth --out=DIR --compare=a.jpg,b.jpg   # + a stage-by-stage report

DIR gets `config.json` and Orbax `variables/` (read back by `maskrcnn_jax.checkpoints.load_weights`,
`predict.py`, `eval.py`). The architecture (backbone depth, class count, FPN and head widths) is
read from the state dict; the other flags take torchvision's keyword names and defaults (values
as JSON: --canvas_size=[800,1344]). The written checkpoint is loaded back and checked against
its config before success is reported. Needs torch (`pip install -e '.[torch]'`).

--compare runs torchvision's model with the same state dict beside the converted one on each
image and prints, per stage (backbone, FPN, RPN, proposals, box head on torchvision's
proposals, detections, masks), the max absolute and relative difference.
"""

import json
import sys

import numpy as np
from absl import flags

from maskrcnn_jax import cli
from maskrcnn_jax.config import STATIC_DEFAULTS, TORCHVISION_DEFAULTS

FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "output directory", flag_values=FLAGS)
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


def _parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def convert_file(path, out, frozen_bn_eps=STATIC_DEFAULTS["frozen_bn_eps"], compare=(),
                 **overrides) -> int:
    """Convert `path` into `out` (see the module docstring); returns the exit status."""
    from maskrcnn_jax import checkpoints
    from maskrcnn_jax.models.maskrcnn import check_variables
    from maskrcnn_jax.torchvision.convert import from_torchvision, load_state_dict

    state_dict = load_state_dict(path)
    config, variables = from_torchvision(state_dict, frozen_bn_eps=frozen_bn_eps, **overrides)
    checkpoints.save_converted(out, config, variables)
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
    cli.enable_compilation_cache(FLAGS.compilation_cache_dir)
    if len(args) != 1:
        raise SystemExit(f"convert.py: expected one .pth file, got {args}; see --help")
    if not FLAGS.out:
        raise SystemExit("convert.py: --out is required")
    overrides = {k: _parse_value(FLAGS[k].value) for k in _SETTINGS if FLAGS[k].value is not None}
    return convert_file(args[0], FLAGS.out, FLAGS.frozen_bn_eps, FLAGS.compare, **overrides)


if __name__ == "__main__":
    sys.exit(main())
