"""Peak memory (max RSS) of `predict.py` on large photos, measured with `/usr/bin/time -v`.

Run:  python bench/predict_memory.py [--sizes 4032x3024,12000x9000] [--repo DIR]

Writes a randomly initialised tiny checkpoint (the `tiny` backbone at torchvision's resize,
min_size 800 / max_size 1333, every score kept: `--detections` detections per image) and a
smooth synthetic JPEG of each size, then runs `predict.py` on each image in its own process
under `/usr/bin/time -v` (Debian package `time`) and prints the process's maximum resident set
size, its wall time and the detections written. The backbone is tiny on purpose: what is
measured is predict's host work on a large image (decoding, resizing, pasting and encoding
masks, drawing), which does not depend on the network. `--repo` runs another checkout's
predict.py (e.g. an older commit, for comparison) with the same checkpoint and images.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def write_checkpoint(directory, detections):
    from maskrcnn_jax import checkpoints
    from maskrcnn_jax.testing.tiny import tiny_model

    config, variables = tiny_model(min_size=800, max_size=1333, canvas_size=None,
                                   rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=500,
                                   box_detections_per_img=detections, box_score_thresh=0.0)
    checkpoints.save_converted(directory, config, variables)


def write_photo(path, height, width):
    """A smooth JPEG (gradients and ellipses, drawn at 1/8 size and upsampled: cheap)."""
    from maskrcnn_jax.testing.images import ellipse_image

    small = ellipse_image(np.random.default_rng(0), max(height // 8, 1), max(width // 8, 1))
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path, quality=90)


def measure(repo, checkpoint, image, out, cache):
    command = ["/usr/bin/time", "-v", sys.executable, "predict.py", image,
               f"--checkpoint={checkpoint}", f"--out={out}", f"--compilation_cache_dir={cache}"]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", result.stderr)
    stem = os.path.splitext(os.path.basename(image))[0]
    json_path = os.path.join(out, stem + ".json")
    detections = len(json.load(open(json_path))) if os.path.exists(json_path) else None
    return {"exit": result.returncode, "max_rss_gb": rss_kb / 2**20, "wall": wall.group(1),
            "detections": detections, "stderr_tail": result.stderr[-600:] if result.returncode
            else ""}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="4032x3024,12000x9000", help="WxH,...")
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--repo", default=REPO, help="the checkout whose predict.py runs")
    parser.add_argument("--work", default=None, help="folder for the checkpoint and images")
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="predict_memory_")
    checkpoint = os.path.join(work, "ckpt")
    if not os.path.exists(checkpoint):
        write_checkpoint(checkpoint, args.detections)
    cache = os.path.join(work, "jax_cache")
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        image = os.path.join(work, f"photo_{width}x{height}.jpg")
        if not os.path.exists(image):
            write_photo(image, height, width)
        out = tempfile.mkdtemp(prefix="out_", dir=work)
        measure(args.repo, checkpoint, image, out, cache)  # compile once (cached), not measured
        out = tempfile.mkdtemp(prefix="out_", dir=work)
        print(json.dumps({"size": size, **measure(args.repo, checkpoint, image, out, cache)}),
              flush=True)


if __name__ == "__main__":
    main()
