"""Whole-run agreement: the same architecture and recipe trained to the end by maskrcnn_jax
(train.py, as a user runs it) and by torchvision (a loop of its references/detection recipe),
each with its own initialisation and random stream, both final models scored the same way.

    python bench/train_agreement.py --out /tmp/agree [--data shapes|coco] [--sides jax torchvision]
                                    [--seeds 0 1] [--steps 800] [--threads N]
                                    [--recipe main|bn_lsj] [--jax-flag=--config.X=V ...]
    python bench/train_agreement.py --out /tmp/agree --report      # the table of every finished run

The recipe is the README's main job (`configs/shapes.py`: ResNet-18 FPN from scratch with
FrozenBatchNorm, the narrow heads, scale jitter over `data.min_sizes` with max size 160,
horizontal flip, SGD lr 0.03 at batch 4, momentum 0.9, weight decay 1e-4 on every trained
parameter, linear warm-up from 0.001x over 100 steps, x0.1 at 1350/1600 of the run, gradient
norm clipped at 10) run for `--steps` steps, with every positive RoI in the mask head
(`mask_rois_per_image` = 64 x 0.25 = 16: torchvision's mask head takes all of them), each batch
of 4 trained as one padded tensor (`train_padding_group` 4, as torchvision's batch tensor), and
ground-truth mask crops of the canvas size (`data.mask_crop_size` 160, as the main job's; smaller
crops would downsample the larger boxes): mask targets as torchvision's, from full-resolution
masks.

maskrcnn_jax: `python train.py --config=configs/shapes.py --workdir=... --config.seed=S ...` in a
subprocess (its own `data_dir` under --out); `--data coco` trains from a COCO-format folder
(`--config.data.name=coco_instances --config.data.manual_dir=...`).

torchvision: `testing.torch_models.torchvision_maskrcnn(config)` (the same widths, thresholds
and resize; torchvision's own module initialisation under `torch.manual_seed(S)`) trained by the
loop of references/detection (train.py + engine.train_one_epoch), read from the COCO folder with
pycocotools as its coco_utils does (crowd dropped, boxes clipped, empty boxes dropped, masks
from the annotations): `RandomHorizontalFlip(0.5)` as presets' 'hflip', scale jitter as
`GeneralizedRCNNTransform` does it with a `min_size` tuple (one draw per image), a
`RandomSampler` + `BatchSampler(drop_last=True)` (the reference with
`--aspect-ratio-group-factor -1`), SGD(momentum 0.9, weight_decay on every parameter that
requires grad: the reference without `--norm-weight-decay`), `LinearLR(start_factor=0.001)`
warm-up then x0.1 milestones (here per step, as the config's), the summed loss dict, and
`clip_grad_norm_(10)` before the step (the reference recipe has no clipping; the main job does).

`--recipe bn_lsj` runs `configs/shapes_bn_lsj.py` instead (the batch-norm + large-scale-jitter
recipe: trainable BatchNorm2d in the backbone, statistics over the batch tensor, and LSJ into the
160 x 160 canvas at scale 0.5-2.0); torchvision's side follows references/detection for
`--data-augmentation lsj`: `transforms.v2.ScaleJitter(target_size=(160, 160),
scale_range=(0.5, 2.0), antialias=True)`, the references' `FixedSizeCrop(size=(160, 160),
fill=(123, 117, 104))` (one uniform draw for both offsets, boxes shifted and clamped, empty boxes
dropped with their masks, bottom / right padding), `RandomHorizontalFlip(0.5)`, and the model's
`transform._skip_resize = True` in training (the 160 x 160 image goes in as it is).

Data: `--data shapes` is the main job's set (1,000 train / 200 validation images); torchvision
reads it as a COCO folder written from the same generator (identical JPEG bytes and RLE masks).
`--data coco` is another shapes draw (seed 7, up to 10 shapes per image, 4.6 on average) written
as a COCO folder that both sides read (maskrcnn_jax with `max_instances` 10: every object).

Scoring: each final model runs in torchvision (maskrcnn_jax's weights converted with
`convert.to_torchvision`) through `testing.torch_models.torchvision_coco_metrics`: one image at
a time, pycocotools against the validation split's ground truth, the same code for both
(train.py's own final evaluation is printed beside it). Loss curves: each loss term's mean over
the 100 steps before fixed steps (maskrcnn_jax: train.py's metrics.jsonl windows).
"""

import argparse
import functools
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time

from timing import THREADS_HELP, pin_threads  # noqa: E402  (bench/timing.py; before jax/torch)

THREADS = pin_threads()

import numpy as np  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
COCO_DRAW = dict(num_train=1000, num_validation=200, seed=7, max_shapes=10)
RECIPES = {"main": "configs/shapes.py", "bn_lsj": "configs/shapes_bn_lsj.py"}
EVERY_POSITIVE = 16  # box_batch_size_per_image 64 x positive fraction 0.25
# Ground-truth mask crops as large as the 160x160 canvas (as configs/shapes.py's): no box is
# downsampled, so the mask targets are those of torchvision's full-resolution masks (56x56 crops
# slow the run: BENCHMARKS.md, "Whole-run agreement with full-resolution mask targets").
FULL_RESOLUTION_CROP = 160


@functools.lru_cache(maxsize=None)
def _train_cli():
    """train.py as a module (its `load_source`), loaded once: it defines absl flags."""
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(REPO, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_config(path: str):
    spec = importlib.util.spec_from_file_location("recipe", os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def label(args) -> str:
    """The data set, with the recipe when it is not the main job's: the report's groups."""
    return args.data if args.recipe == "main" else f"{args.data}+{args.recipe}"


def milestone(steps: int) -> int:
    return int(round(steps * 1350 / 1600))


def overrides(args, data_dir: str, folder: str) -> list:
    """train.py flags of the run (besides --config, --workdir and the seed)."""
    flags = [f"--config.num_train_steps={args.steps}",
             f"--config.optimizer.milestones={milestone(args.steps)}",
             f"--config.model.mask_rois_per_image={EVERY_POSITIVE}",
             f"--config.data.mask_crop_size={FULL_RESOLUTION_CROP}",
             f"--config.data.data_dir={data_dir}",
             f"--config.checkpoint_every_steps={args.steps}"]
    if args.data == "coco":
        flags += ["--config.data.name=coco_instances", f"--config.data.manual_dir={folder}",
                  f"--config.data.max_instances={COCO_DRAW['max_shapes']}"]
    return flags + list(args.jax_flag or [])


def run_config(args, data_dir, folder, seed):
    """The ml_collections config train.py runs (configs/shapes.py with the run's flags)."""
    config = _load_config(RECIPES[args.recipe])
    config.seed = seed
    config.num_train_steps = args.steps
    config.optimizer.milestones = (milestone(args.steps),)
    config.model.mask_rois_per_image = EVERY_POSITIVE
    config.data.mask_crop_size = FULL_RESOLUTION_CROP
    config.data.data_dir = data_dir
    if args.data == "coco":
        config.data.name = "coco_instances"
        config.data.manual_dir = folder
        config.data.max_instances = COCO_DRAW["max_shapes"]  # every object: torchvision keeps all
    return config


# ---------------------------------------------------------------- data
def write_coco_folder(folder: str, seed: int, num_train: int, num_validation: int, **options):
    """A shapes draw (`data.shapes.generate_image`, the builder's generator) as a COCO folder:
    `annotations/instances_{train,val}.json`, images in `train/`, `val/` (the generator's JPEG
    bytes), masks as compressed RLE. Written once (a `done` file marks it complete)."""
    from maskrcnn_jax.data import shapes

    if os.path.exists(os.path.join(folder, "done")):
        return folder
    opts = shapes.ShapesOptions(**options)
    os.makedirs(os.path.join(folder, "annotations"), exist_ok=True)
    for split, name, n in (("train", "train", num_train), ("validation", "val", num_validation)):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        images, annotations = [], []
        for _, record in shapes.shapes_records(seed, split, n, opts):
            h, w = (int(v) for v in record["original_size"])
            with open(os.path.join(folder, name, record["file_name"]), "wb") as f:
                f.write(record["image"])
            images.append({"id": int(record["image_id"]), "file_name": record["file_name"],
                           "height": h, "width": w})
            for k in range(len(record["labels"])):
                x1, y1, x2, y2 = (float(v) for v in record["boxes"][k])
                counts = record["mask_rles"][k]
                annotations.append({
                    "id": int(record["annotation_ids"][k]), "image_id": int(record["image_id"]),
                    "category_id": int(record["category_ids"][k]), "iscrowd": 0,
                    "area": float(record["areas"][k]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "segmentation": {"size": [h, w], "counts": counts.decode()
                                     if isinstance(counts, bytes) else counts}})
        categories = [{"id": c["id"], "name": c["name"]} for c in shapes.CATEGORIES]
        with open(os.path.join(folder, "annotations", f"instances_{name}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations,
                       "categories": categories}, f)
    open(os.path.join(folder, "done"), "w").close()
    return folder


def folder_of(args) -> str:
    if args.data == "shapes":
        return write_coco_folder(os.path.join(args.out, "shapes_coco"), seed=0, num_train=1000,
                                 num_validation=200)
    return write_coco_folder(os.path.join(args.out, "coco_folder"), **COCO_DRAW)


class CocoTrainSet:
    """torchvision's reference `coco_utils` for training: image as float [0, 1] CHW, crowd
    annotations dropped, boxes xywh -> xyxy clipped to the image, empty boxes dropped, masks
    from the annotations (pycocotools), labels the category ids (1..K here)."""

    def __init__(self, folder: str):
        from PIL import Image
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO

        coco = COCO(os.path.join(folder, "annotations", "instances_train.json"))
        ids = sorted(c["id"] for c in coco.loadCats(coco.getCatIds()))
        assert ids == list(range(1, len(ids) + 1)), "categories must be 1..K"
        self.items = []
        for image_id in sorted(coco.getImgIds()):
            info = coco.loadImgs(image_id)[0]
            image = np.asarray(Image.open(os.path.join(folder, "train", info["file_name"]))
                               .convert("RGB"))
            h, w = image.shape[:2]
            anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a["iscrowd"]]
            boxes = np.asarray([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
            keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
            rles = [mask_utils.frPyObjects(a["segmentation"], h, w)
                    if isinstance(a["segmentation"], list) else a["segmentation"] for a in anns]
            self.items.append((image, boxes[keep],
                               np.asarray([a["category_id"] for a in anns], np.int64)[keep],
                               [r for r, k in zip(rles, keep) if k]))
        self._decode = mask_utils.decode

    def __len__(self):
        return len(self.items)

    def get(self, index: int, flip: bool):
        import torch

        image, boxes, labels, rles = self.items[index]
        h, w = image.shape[:2]
        masks = (np.stack([self._decode(r) for r in rles]) if rles else
                 np.zeros((0, h, w), np.uint8))
        boxes = boxes.copy()
        if flip:  # references/detection/transforms.RandomHorizontalFlip
            image = image[:, ::-1]
            masks = masks[:, :, ::-1]
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
        return tensor, {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                        "masks": torch.from_numpy(np.ascontiguousarray(masks))}

    def get_lsj(self, index: int, size: int, scale_range, fill=(123, 117, 104)):
        """references/detection's `--data-augmentation lsj` on one image (torch's global random
        stream): ScaleJitter, FixedSizeCrop, RandomHorizontalFlip (module docstring)."""
        import torch
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        image, boxes, labels, rles = self.items[index]
        h, w = image.shape[:2]
        masks = (np.stack([self._decode(r) for r in rles]) if rles else
                 np.zeros((0, h, w), np.uint8))
        image, target = v2.ScaleJitter((size, size), scale_range=tuple(scale_range),
                                       antialias=True)(
            tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1)),
            {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY",
                                               canvas_size=(h, w)),
             "masks": tv_tensors.Mask(torch.from_numpy(masks))})
        image, boxes, masks = (image.as_subclass(torch.Tensor),
                               target["boxes"].as_subclass(torch.Tensor).clone(),
                               target["masks"].as_subclass(torch.Tensor))
        labels = torch.from_numpy(labels)
        _, h, w = image.shape
        ch, cw = min(h, size), min(w, size)
        if (ch, cw) != (h, w):  # FixedSizeCrop: one draw for both offsets
            u = torch.rand(1)
            top, left = int(max(h - size, 0) * u), int(max(w - size, 0) * u)
            image = image[:, top:top + ch, left:left + cw]
            boxes[:, 0::2] -= left
            boxes[:, 1::2] -= top
            boxes[:, 0::2].clamp_(min=0, max=cw)
            boxes[:, 1::2].clamp_(min=0, max=ch)
            valid = (boxes[:, 0] < boxes[:, 2]) & (boxes[:, 1] < boxes[:, 3])
            boxes, labels = boxes[valid], labels[valid]
            masks = masks[valid][:, top:top + ch, left:left + cw]
        canvas = torch.tensor(fill, dtype=image.dtype).view(3, 1, 1).repeat(1, size, size)
        canvas[:, :ch, :cw] = image
        padded = torch.zeros((len(masks), size, size), dtype=masks.dtype)
        padded[:, :ch, :cw] = masks
        if torch.rand(1) < 0.5:  # RandomHorizontalFlip of the padded canvas
            canvas, padded = canvas.flip(-1), padded.flip(-1)
            boxes[:, [0, 2]] = size - boxes[:, [2, 0]]
        return canvas.float() / 255, {"boxes": boxes, "labels": labels, "masks": padded}


# ---------------------------------------------------------------- the two sides
def train_jax(args, seed: int, run_dir: str, data_dir: str, folder: str) -> None:
    workdir = os.path.join(run_dir, "workdir")
    command = [sys.executable, "train.py", f"--config={RECIPES[args.recipe]}", f"--workdir={workdir}",
               f"--config.seed={seed}", *overrides(args, data_dir, folder)]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - start
    curve = {}
    final_eval = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["split"] == "train":
                curve[row["step"]] = {k: row[k] for k in (*LOSSES, "grad_norm")}
            elif row["split"] == "eval":
                final_eval = {k: row[k] for k in ("bbox/AP", "segm/AP")}
    json.dump({"seconds": seconds, "curve": curve, "own_eval": final_eval},
              open(os.path.join(run_dir, "train.json"), "w"))


def train_torchvision(args, seed: int, run_dir: str, data_dir: str, folder: str) -> None:
    import torch

    from maskrcnn_jax.config import model_config
    from maskrcnn_jax.testing.torch_models import torchvision_maskrcnn

    torch.set_num_threads(THREADS)
    config = run_config(args, data_dir, folder, seed)
    torch.manual_seed(seed)
    model = torchvision_maskrcnn(model_config(**config.model.to_dict())).train()
    model.transform.min_size = tuple(int(s) for s in config.data.min_sizes)
    lsj = config.data.augmentation == "lsj"
    model.transform._skip_resize = lsj  # training only: the LSJ canvas goes in as it is
    data = CocoTrainSet(folder)
    opt = config.optimizer
    batch = int(config.data.batch_size)
    peak = float(opt.learning_rate) * batch / int(opt.reference_batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=peak, momentum=float(opt.momentum),
                          weight_decay=float(opt.weight_decay))

    def lr_at(step):  # LinearLR warm-up (per iteration), then MultiStepLR's decays
        warmup = int(opt.warmup_steps)
        factor = (float(opt.warmup_factor) + (1 - float(opt.warmup_factor)) * step / warmup
                  if step < warmup else 1.0)
        return peak * factor * float(opt.gamma) ** sum(step >= m for m in opt.milestones)

    sampler = torch.Generator().manual_seed(seed)
    order, curve, window = [], {}, []
    start = time.perf_counter()
    for step in range(args.steps):
        if len(order) < batch:  # a new epoch: RandomSampler's permutation, last batch dropped
            order = torch.randperm(len(data), generator=sampler).tolist()
        indices, order = order[:batch], order[batch:]
        images, targets = zip(*(
            data.get_lsj(i, int(config.data.lsj_size), config.data.lsj_scale_range) if lsj
            else data.get(i, bool(torch.rand(1) < 0.5)) for i in indices))
        for group in sgd.param_groups:
            group["lr"] = lr_at(step)
        losses = model(list(images), list(targets))
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: {losses}")
        sgd.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float(opt.grad_clip_norm))
        sgd.step()
        window.append({**{k: v.item() for k, v in losses.items()}, "grad_norm": grad_norm.item()})
        if (step + 1) % int(config.log_every_steps) == 0:
            curve[step + 1] = {k: float(np.mean([w[k] for w in window]))
                               for k in (*LOSSES, "grad_norm")}
            window = []
            if (step + 1) % 100 == 0:
                print(f"torchvision seed {seed} step {step + 1}: loss "
                      f"{sum(curve[step + 1].values()):.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    torch.save(model.state_dict(), os.path.join(run_dir, "torchvision.pth"))
    json.dump({"seconds": seconds, "curve": curve, "own_eval": {}},
              open(os.path.join(run_dir, "train.json"), "w"))


def score(args, side: str, seed: int, run_dir: str, data_dir: str, folder: str) -> dict:
    """Box and mask AP of a finished run's model, run in torchvision, one image at a time."""
    import torch

    from maskrcnn_jax.checkpoints import load_weights
    from maskrcnn_jax.config import model_config
    from maskrcnn_jax.testing.torch_models import torchvision_coco_metrics, torchvision_maskrcnn
    from maskrcnn_jax.torchvision.convert import to_torchvision

    config = run_config(args, data_dir, folder, seed)
    model_cfg = model_config(**config.model.to_dict())
    model = torchvision_maskrcnn(model_cfg)
    if side == "jax":
        cfg, variables, _ = load_weights(os.path.join(run_dir, "workdir"))
        state = to_torchvision(cfg, variables)
    else:
        state = torch.load(os.path.join(run_dir, "torchvision.pth"))
    model.load_state_dict(state, strict=True)
    source = _train_cli().load_source(config.data, config.data.eval_split)
    metrics, _ = torchvision_coco_metrics(model.eval(), source)
    return {k: metrics[k] for k in ("bbox/AP", "segm/AP", "bbox/AP50", "segm/AP50")}


# ---------------------------------------------------------------- report
def plateau_exit(curve: dict, level: float = 0.7):
    """The first logged step where the classifier loss, averaged over the 100 steps before it,
    is under `level`: when a from-scratch run leaves the plateau on which its box head predicts
    the class prior (loss ~0.8 here). None if it never does."""
    steps = sorted(curve, key=int)
    for i, step in enumerate(steps):
        window = [curve[s]["loss_classifier"] for s in steps[max(0, i - 3):i + 1]]
        if int(step) >= 100 and np.mean(window) < level:
            return int(step)
    return None


def report(out: str) -> None:
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "*", "*", "*", "result.json"))):
        rows.append(json.load(open(path)))
    if not rows:
        print("no finished runs under", out)
        return
    print(f"{'data':<7}{'side':<12}{'seed':>5}{'steps':>6}{'mask AP':>9}{'box AP':>8}"
          f"{'own eval':>15}{'minutes':>8}{'plateau exit':>14}")
    for r in rows:
        own = r["own_eval"]
        own_text = f"{own['segm/AP']:.3f}/{own['bbox/AP']:.3f}" if own else "-"
        print(f"{r['data']:<7}{r['side']:<12}{r['seed']:>5}{r['steps']:>6}"
              f"{r['scores']['segm/AP']:>9.3f}{r['scores']['bbox/AP']:>8.3f}{own_text:>15}"
              f"{r['seconds'] / 60:>8.1f}{str(plateau_exit(r['curve'])):>14}")
    print("\nmean (range) per data set and side; difference of the means maskrcnn_jax - "
          "torchvision")
    for data in sorted({r["data"] for r in rows}):
        means = {}
        for side in ("torchvision", "jax"):
            got = [r for r in rows if r["data"] == data and r["side"] == side]
            if not got:
                continue
            mask = [r["scores"]["segm/AP"] for r in got]
            box = [r["scores"]["bbox/AP"] for r in got]
            means[side] = (np.mean(mask), np.mean(box))
            print(f"{data:<7}{side:<12} n={len(got)}  mask {np.mean(mask):.3f} "
                  f"({min(mask):.3f}-{max(mask):.3f})  box {np.mean(box):.3f} "
                  f"({min(box):.3f}-{max(box):.3f})")
        if len(means) == 2:
            print(f"{data:<7}difference   mask {means['jax'][0] - means['torchvision'][0]:+.3f}"
                  f"  box {means['jax'][1] - means['torchvision'][1]:+.3f}")
    print("\nloss curves: each term's mean over the 100 steps before the step (mean of the "
          "seeds)")
    for data in sorted({r["data"] for r in rows}):
        steps = max(r["steps"] for r in rows if r["data"] == data)
        marks = [s for s in (100, 200, 400, 600, steps) if s <= steps]
        print(f"{data}: {'term':<18}{'side':<12}" + "".join(f"{s:>8}" for s in marks))
        for term in LOSSES:
            for side in ("torchvision", "jax"):
                got = [r for r in rows if r["data"] == data and r["side"] == side]
                if not got:
                    continue
                values = []
                for s in marks:
                    per_seed = []
                    for r in got:
                        window = [v[term] for k, v in r["curve"].items() if s - 100 < int(k) <= s]
                        per_seed.append(np.mean(window) if window else np.nan)
                    values.append(np.mean(per_seed))
                print(f"{'':<6}{term:<18}{side:<12}" + "".join(f"{v:>8.4f}" for v in values))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="runs, data and results go here")
    parser.add_argument("--data", choices=["shapes", "coco"], default="shapes")
    parser.add_argument("--sides", nargs="+", choices=["jax", "torchvision"],
                        default=["torchvision", "jax"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="main",
                        help="main: configs/shapes.py; bn_lsj: configs/shapes_bn_lsj.py")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument("--jax-flag", action="append", metavar="FLAG",
                        help="an extra train.py flag of the maskrcnn_jax runs (repeatable), "
                             "for an A/B of one setting, e.g. "
                             "--jax-flag=--config.data.mask_crop_size=160 (their own --out)")
    parser.add_argument("--report", action="store_true", help="only print the table")
    args = parser.parse_args(argv)
    args.out = os.path.abspath(os.path.expanduser(args.out))
    if args.report:
        report(args.out)
        return 0
    os.makedirs(args.out, exist_ok=True)
    data_dir = os.path.join(args.out, "tensorflow_datasets")
    folder = folder_of(args)
    for seed in args.seeds:
        for side in args.sides:
            run_dir = os.path.join(args.out, label(args), side, f"seed{seed}")
            if os.path.exists(os.path.join(run_dir, "result.json")):
                continue
            os.makedirs(run_dir, exist_ok=True)
            if not os.path.exists(os.path.join(run_dir, "train.json")):
                (train_jax if side == "jax" else train_torchvision)(args, seed, run_dir,
                                                                    data_dir, folder)
            trained = json.load(open(os.path.join(run_dir, "train.json")))
            scores = score(args, side, seed, run_dir, data_dir, folder)
            print(f"{label(args)} {side} seed {seed}: mask AP {scores['segm/AP']:.3f}, box AP "
                  f"{scores['bbox/AP']:.3f} ({trained['seconds'] / 60:.1f} min)", flush=True)
            json.dump({"data": label(args), "side": side, "seed": seed, "steps": args.steps,
                       "scores": scores, **trained},
                      open(os.path.join(run_dir, "result.json"), "w"))
    report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
