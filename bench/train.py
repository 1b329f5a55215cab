"""Training-step benchmark: maskrcnn_jax vs torchvision (with its compiled C++/CUDA nms and
roi_align kernels and their backward) on identical weights and data, at equal work.

Run:  python bench/train.py [--size 512] [--batch 2] [--steps 3] [--backbone resnet50]
                            [--frozen-stages 2] [--threads N] [--mask-rois N]
                            [--mask-rois-per-batch N] [--profile] [--no-stop-gradient]
                            [--trained [--trained-steps 200] [--cache DIR]]

Both sides start from the same converted weights (torchvision's Mask R-CNN with frozen batch
norm, as it trains from pretrained backbones), train on the same synthetic images, boxes and
full-resolution masks (both RoIAlign the full masks into 28x28 targets) with SGD (lr 0.02 x
batch / 16, momentum 0.9, weight decay 1e-4), with the same CPU threads, and freeze the same
backbone stages: torchvision `trainable_backbone_layers = 5 - F` (parameters with
requires_grad=False) <=> maskrcnn_jax `frozen_backbone_stages = F` (`train_lib.create_optimizer`:
zero updates, no decay), default F = 2 (stem and layer1 frozen, both projects' default for a
pretrained backbone; the script checks both sides train the same number of parameters).
Neither side runs the backward of its frozen stages: torchvision's parameters have
requires_grad=False, maskrcnn_jax's train step stops their gradient
(`train_lib.stop_frozen_gradients`, as `train.py` does).
Each timed step starts again from the initial weights (from random weights the recipe diverges
to inf/NaN within two steps, which would be timed otherwise).

Load. By default random weights on random images with --objects boxes each: the positives are
few (typically just the gt boxes, which torchvision appends to the proposals). With --trained,
a realistic load: weights whose RPN is trained (an R50-FPN trained by this script on shapes for
--trained-steps steps of 2 images at 256..320 px, cached in --cache: `trained_weights`) on 4:3
images with 5-15 objects at torchvision's 800 px, tiled from shapes images so that the objects
have the pixel sizes the weights were trained on (`shapes_data`, canvas 800x1088).

Mask RoIs. torchvision runs its mask head (4 conv layers at 14x14 + a deconv: ~1 GFLOP per RoI
forward, ~3 with the backward) on the positive RoIs it sampled (at most 512 x 0.25 = 128 per
image); maskrcnn_jax, with static shapes, on a fixed number of slots. The benchmark prints
torchvision's positives per image and times maskrcnn_jax with
  * equal work: `mask_rois_per_image` = the most positives torchvision sampled in an image;
  * defaults: the default batch-wide budget (`mask_budget_per_image` slots per image shared by
    the batch: every positive while they fit, `models.maskrcnn.mask_budget`);
  * every: a slot for every possible positive (128 per image, `mask_budget_per_image=0`).
The first-step mask losses show whether equal work or the default dropped any positive of
maskrcnn_jax's own sample (each is compared with the every-positive run's).
Prints images/s of each (after maskrcnn_jax's compilation, whose time is printed too) and the
speed ratios maskrcnn_jax / torchvision (images/s over images/s: > 1 means maskrcnn_jax trains
faster).
"""

import argparse
import os
import sys
import time

from timing import THREADS_HELP, pin_threads  # noqa: E402  (bench/timing.py; before jax/torch)

THREADS = pin_threads()

import numpy as np  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from timing import header, torch_device, torch_sync  # noqa: E402

from maskrcnn_jax.data.transform import preprocess  # noqa: E402
from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen, mask_budget  # noqa: E402
from maskrcnn_jax.testing import import_torchvision  # noqa: E402
from maskrcnn_jax.torchvision.convert import from_torchvision  # noqa: E402
from maskrcnn_jax.training.losses import compute_losses  # noqa: E402
from maskrcnn_jax.training.train_lib import (  # noqa: E402
    create_optimizer,
    frozen_param_labels,
    stop_frozen_gradients,
)


def torchvision_model(backbone_name, num_classes, frozen_stages):
    torchvision = import_torchvision()
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = getattr(torchvision.models, backbone_name)(weights=None, norm_layer=FrozenBatchNorm2d)
    # trainable_layers = torchvision's trainable_backbone_layers: the last 5 - F stages.
    return torchvision.models.detection.MaskRCNN(
        _resnet_fpn_extractor(body, 5 - frozen_stages), num_classes=num_classes)


def synthetic_data(rng, batch, size, num_objects=4):
    """Random uint8 images with `num_objects` random boxes each, masks filling the boxes."""
    images, targets = [], []
    for _ in range(batch):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        xy = rng.uniform(0, size * 0.6, (num_objects, 2))
        wh = rng.uniform(size * 0.1, size * 0.4, (num_objects, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        masks = np.zeros((num_objects, size, size), np.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
            masks[i, y1:y2, x1:x2] = 1
        images.append(image)
        targets.append({"boxes": boxes, "labels": rng.integers(1, 5, num_objects), "masks": masks})
    return images, targets


def shapes_data(batch, size, objects=(5, 15), seed=0, grid=(2, 3)):
    """Photo-like 4:3 images of short side `size` (torchvision's resize is then the identity)
    with `objects` (min, max) shapes each: a `grid` of shapes tiles (`data.shapes`, the
    builder's generator; up to 3 shapes a tile), so that at 800 px the objects have the pixel
    sizes of the --trained weights' training images (tiles of ~400 px: shapes of 30-120 px
    radius). Masks full-size, boxes their tight boxes. Images are made in seed order until
    `batch` have a count within `objects`."""
    import io

    from PIL import Image
    from pycocotools import mask as mask_utils

    from maskrcnn_jax.data import shapes

    rows, cols = grid
    height, width = size, int(round(size * 4 / 3))
    tile_h, tile_w = -(-height // rows), -(-width // cols)
    options = shapes.ShapesOptions(min_side=min(tile_h, tile_w), max_side=max(tile_h, tile_w),
                                   max_shapes=3)
    images, targets, index = [], [], 0
    while len(images) < batch:
        image = np.zeros((rows * tile_h, cols * tile_w, 3), np.uint8)
        masks, labels = [], []
        for r in range(rows):
            for c in range(cols):
                record = shapes.generate_image(seed, "train", index, options)
                index += 1
                h, w = (int(v) for v in record["original_size"])
                h, w = min(h, tile_h), min(w, tile_w)
                tile = np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"))
                image[r * tile_h:r * tile_h + h, c * tile_w:c * tile_w + w] = tile[:h, :w]
                for rle, label in zip(record["mask_rles"], record["labels"]):
                    full = np.zeros(image.shape[:2], np.uint8)
                    m = mask_utils.decode({"size": list(record["original_size"]), "counts": rle})
                    full[r * tile_h:r * tile_h + h, c * tile_w:c * tile_w + w] = m[:h, :w]
                    masks.append(full[:height, :width])
                    labels.append(label)
        kept = [i for i, m in enumerate(masks) if m.sum() >= 30]  # cut at the image edge
        masks, labels = [masks[i] for i in kept], [labels[i] for i in kept]
        if not objects[0] <= len(masks) <= objects[1]:
            continue
        boxes = np.zeros((len(masks), 4), np.float32)
        for i, m in enumerate(masks):
            ys, xs = np.nonzero(m)
            boxes[i] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        images.append(np.ascontiguousarray(image[:height, :width]))
        targets.append({"boxes": boxes, "labels": np.asarray(labels, np.int64),
                        "masks": np.stack(masks)})
    return images, targets


TRAINED_SIZE = (256, 320)  # the weights' training images: squares of these sides, canvas 320


def trained_weights(cache, backbone, steps, frozen_stages):
    """(model config, variables) of a Mask R-CNN `backbone`-FPN (torchvision's widths, 5
    classes) trained by `train.py`'s loop for `steps` steps of 2 images on shapes with up to 20
    objects (256..320 px squares, half torchvision's RPN top-n and RoI samples: a few seconds
    a step on a CPU; the objects' sizes relative to the image are those of `shapes_data`), so
    that its RPN proposes around objects and the RoI sampler finds positives as a trained
    model's does. From scratch with trainable batch norm in the backbone (FrozenBatchNorm at
    its identity init would leave a from-scratch R50 unnormalised), `frozen_stages` stages
    frozen, SGD 0.02 with warm-up and clipping.
    Trained once into `cache` and read from there after.
    """
    import importlib.util

    from configs import shapes as shapes_config

    from maskrcnn_jax.checkpoints import load_weights
    from maskrcnn_jax.config import model_settings

    workdir = os.path.join(os.path.expanduser(cache), f"{backbone}_shapes_{steps}_f{frozen_stages}")
    if not os.path.exists(os.path.join(workdir, "done")):
        # The repository's train.py (this script is a `train` module too).
        spec = importlib.util.spec_from_file_location("train_cli", os.path.join(REPO, "train.py"))
        train_cli = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train_cli)
        print(f"training the benchmark's weights into {workdir} ({steps} steps, once)", flush=True)
        config = shapes_config.get_config()
        low, high = TRAINED_SIZE
        config.model = model_settings(
            backbone=backbone, backbone_norm="batch_norm", num_classes=5, min_size=low,
            max_size=high, canvas_size=(high, high), rpn_pre_nms_top_n_train=1000,
            rpn_post_nms_top_n_train=1000, box_batch_size_per_image=256, mask_rois_per_image=8,
            train_padding_group=2)
        config.data.shapes = dict(num_train=2 * steps, num_validation=8, seed=1, min_side=low,
                                  max_side=high, max_shapes=20)
        config.data.data_dir = os.path.join(os.path.expanduser(cache), "tensorflow_datasets")
        config.data.batch_size = 2
        config.data.max_instances = 20
        config.data.min_sizes = (low,)
        config.optimizer.learning_rate = 0.02
        config.optimizer.reference_batch_size = 2
        config.optimizer.warmup_steps = min(50, steps // 2)
        config.optimizer.milestones = (max(int(steps * 0.8), config.optimizer.warmup_steps + 1),)
        config.num_train_steps = steps
        config.checkpoint_every_steps = steps
        config.log_every_steps = max(1, steps // 10)
        config.frozen_backbone_stages = frozen_stages
        train_cli.train_and_evaluate(config, workdir)
        open(os.path.join(workdir, "done"), "w").close()
    cfg, variables, _ = load_weights(workdir)
    return cfg, variables


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=None,
                        help="image side (default 512), or with --trained the short side of 4:3 "
                             "images (default 800, torchvision's)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--objects", type=int, default=4, help="objects per image")
    parser.add_argument("--frozen-stages", type=int, default=2, choices=range(6),
                        help="backbone stages frozen on both sides: maskrcnn_jax "
                             "frozen_backbone_stages = 5 - torchvision trainable_backbone_layers")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument("--mask-rois", type=int, default=None,
                        help="maskrcnn_jax's equal-work mask_rois_per_image (default: the most "
                             "positives torchvision sampled in an image)")
    parser.add_argument("--profile", action="store_true",
                        help="also trace one step of each maskrcnn_jax run (jax.profiler) and "
                             "print where its time goes (bench/step_profile.py)")
    parser.add_argument("--no-stop-gradient", action="store_true",
                        help="maskrcnn_jax differentiates its frozen stages too (the optimizer "
                             "still zeroes their update): the step before stop_frozen_gradients")
    parser.add_argument("--mask-rois-per-batch", type=int, default=None,
                        help="also time maskrcnn_jax with this batch-wide mask-head budget "
                             "(positives of all images packed; config mask_rois_per_batch)")
    parser.add_argument("--trained", action="store_true",
                        help="realistic load: weights whose RPN is trained (trained by this "
                             "script on shapes, cached in --cache) and shapes images with 5-15 "
                             "objects instead of random weights and random images")
    parser.add_argument("--trained-steps", type=int, default=200,
                        help="training steps of the --trained weights")
    parser.add_argument("--cache", default="~/.cache/maskrcnn_jax/bench_train",
                        help="where the --trained weights are kept")
    args = parser.parse_args()
    if args.size is None:
        args.size = 800 if args.trained else 512
    torchvision = import_torchvision()
    device = torch_device(jax, torch)
    header(THREADS, torch, torchvision, jax, device)
    torch.manual_seed(0)
    num_classes = 5
    model = torchvision_model(args.backbone, num_classes, args.frozen_stages)
    if args.trained:
        from maskrcnn_jax.torchvision.convert import to_torchvision

        trained = to_torchvision(*trained_weights(args.cache, args.backbone, args.trained_steps,
                                                  args.frozen_stages))
        own = model.state_dict()
        missing = set(own) - set(trained)
        if missing:
            raise AssertionError(f"trained weights lack {sorted(missing)[:5]}")
        # The trained batch norms' running statistics become FrozenBatchNorm2d's.
        model.load_state_dict({k: trained[k] for k in own})
        images, targets = shapes_data(args.batch, args.size)
        max_size = 1333
        canvas = (-(-args.size // 32) * 32, -(-images[0].shape[1] // 32) * 32)
        what = (f"shapes images {images[0].shape[0]}x{images[0].shape[1]}, "
                f"{'/'.join(str(len(t['boxes'])) for t in targets)} objects, weights trained "
                f"{args.trained_steps} steps on shapes")
    else:
        images, targets = synthetic_data(np.random.default_rng(0), args.batch, args.size,
                                         args.objects)
        max_size, canvas = args.size, (args.size, args.size)
        what = (f"random images {args.size}x{args.size}, {args.objects} objects per image, "
                "random weights")
    model.transform.min_size, model.transform.max_size = (args.size,), max_size
    # Copies: the converted arrays would otherwise share memory with the torch parameters, and
    # torchvision's (in-place) training below would change maskrcnn_jax's starting weights.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config, variables = from_torchvision(state, num_classes=num_classes, min_size=args.size,
                                         max_size=max_size, canvas_size=canvas)
    model.to(device)
    print(f"{args.backbone}, batch {args.batch}, {what}; frozen backbone stages: "
          f"{args.frozen_stages} (torchvision trainable_backbone_layers="
          f"{5 - args.frozen_stages}, maskrcnn_jax frozen_backbone_stages={args.frozen_stages})")

    # Same optimizer on both sides (PyTorch SGD semantics); maskrcnn_jax's from the product.
    opt_cfg = ml_collections.ConfigDict(dict(
        name="sgd", learning_rate=0.02, reference_batch_size=16, warmup_steps=0,
        warmup_factor=1.0, milestones=(), gamma=0.1, momentum=0.9, weight_decay=1e-4,
        grad_clip_norm=0.0))
    lr = 0.02 * args.batch / 16
    params, stats = jax.device_put((variables["params"], variables["batch_stats"]))
    tx, _ = create_optimizer(opt_cfg, params, args.batch, frozen_backbone_stages=args.frozen_stages)
    labels = frozen_param_labels(params, args.frozen_stages)
    trained_jax = sum(int(np.size(p)) for p, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels))
                      if lab == "trained")
    trained_tv = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trained_jax != trained_tv:
        raise AssertionError(f"trained parameters differ: maskrcnn_jax {trained_jax:,}, "
                             f"torchvision {trained_tv:,}")
    print(f"trained parameters: {trained_tv:,} on both sides; neither differentiates its frozen "
          "stages (torchvision requires_grad=False, maskrcnn_jax stop_gradient)"
          if args.frozen_stages else "nothing frozen: both sides compute the full backward",
          flush=True)

    # torchvision
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                                momentum=0.9, weight_decay=1e-4)
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float().div(255).to(device) for im in images]
    torch_targets = [{"boxes": torch.from_numpy(t["boxes"]).to(device),
                      "labels": torch.from_numpy(t["labels"]).to(device),
                      "masks": torch.from_numpy(t["masks"]).to(device)} for t in targets]
    # Positive RoIs per image (the mask head's batch), as torchvision's roi_heads samples them.
    positives = []
    select = model.roi_heads.select_training_samples

    def counting_select(proposals, targets):
        out = select(proposals, targets)
        positives.append([int((labels > 0).sum()) for labels in out[2]])
        return out

    model.roi_heads.select_training_samples = counting_select
    times, tv_losses = [], []
    for _ in range(args.steps + 1):
        # Every timed step starts from the initial weights: from random weights this recipe
        # diverges within two steps (inf/NaN values would then be timed).
        model.load_state_dict(state)
        optimizer.state.clear()
        torch_sync(torch, device)
        start = time.perf_counter()
        loss = sum(model(tensors, torch_targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch_sync(torch, device)
        times.append(time.perf_counter() - start)
        tv_losses.append(loss.item())
    tv_step = float(np.median(times[1:]))
    counts = np.asarray(positives)
    print(f"torchvision positive (mask-head) RoIs per image over {len(counts)} steps: "
          f"mean {counts.mean():.1f}, max {counts.max()}; total loss per step "
          + " ".join(f"{v:.4g}" for v in tv_losses), flush=True)

    # maskrcnn_jax
    net = MaskRCNN(frozen(config))
    batch = preprocess(images, config)
    # Images at their resized size already (scale 1): boxes and masks as they are, padded.
    objects = max(len(t["boxes"]) for t in targets)
    masks = np.zeros((args.batch, objects, *config.canvas_size), np.float32)
    boxes = np.zeros((args.batch, objects, 4), np.float32)
    labels_ = np.zeros((args.batch, objects), np.int32)
    for i, t in enumerate(targets):
        n, (h, w) = len(t["boxes"]), t["masks"].shape[1:]
        masks[i, :n, :h, :w], boxes[i, :n], labels_[i, :n] = t["masks"], t["boxes"], t["labels"]
    data = jax.device_put({
        "images": batch.images, "image_sizes": batch.image_sizes, "padded_sizes": batch.padded_sizes,
        "boxes": boxes, "labels": labels_, "valid": np.any(boxes > 0, axis=-1), "masks": masks})
    opt_state = tx.init(params)

    every = int(config.box_batch_size_per_image * config.box_positive_fraction)
    _, default_slots = mask_budget(config, args.batch)
    matched_rois = args.mask_rois or int(counts.max())
    runs = [("equal", f"maskrcnn_jax, {matched_rois} mask RoIs/img (equal work)",
             {"mask_rois_per_image": matched_rois}),
            ("default", f"maskrcnn_jax, default budget ({config.mask_budget_per_image}/img "
                        f"shared: {default_slots} per batch)", {}),
            ("every", f"maskrcnn_jax, {every} mask RoIs/img (a slot for every possible "
                      "positive)", {"mask_budget_per_image": 0})]
    if args.mask_rois_per_batch:
        runs.append(("batch", f"maskrcnn_jax, {args.mask_rois_per_batch} mask RoIs per batch "
                              "(positives packed)",
                     {"mask_rois_per_batch": args.mask_rois_per_batch}))
    frozen_labels = labels if args.frozen_stages and not args.no_stop_gradient else None
    if args.no_stop_gradient:
        print("maskrcnn_jax: --no-stop-gradient, its frozen stages are differentiated (their "
              "update is still zero)")
    rows = {}
    for key, label, overrides in runs:
        step_s, compile_s, terms, losses, step = time_jax(
            net, tx, params, stats, opt_state, data, overrides, args.steps, frozen_labels)
        rows[key] = (label, step_s, compile_s, terms)
        print(f"{label}: total loss per step " + " ".join(f"{v:.4g}" for v in losses)
              + f"; first step: {terms['mask_positives']:.1f} positives/img (max "
              f"{terms['mask_positives_max']:.0f}), {terms['mask_positives_dropped']:.0f} "
              "beyond the budget", flush=True)
        if args.profile:
            from step_profile import print_profile, profile_call

            print_profile(profile_call(step, params, opt_state, data, jax.random.key(0)),
                          f"step of {label}")
    print("| | step s | images/s | maskrcnn_jax / torchvision speed |\n|---|---:|---:|---:|")
    print(f"| torchvision, {args.frozen_stages} frozen stages, mask head on its positives "
          f"(max {counts.max()}/img) | {tv_step:.2f} | {args.batch / tv_step:.2f} | |")
    for key, (label, step_s, compile_s, _) in rows.items():
        print(f"| {label} | {step_s:.2f} | {args.batch / step_s:.2f} | "
              f"{tv_step / step_s:.2f} (first step incl. compile {compile_s:.1f} s) |")
    print(f"equal-work ratio (maskrcnn_jax / torchvision images/s): "
          f"{tv_step / rows['equal'][1]:.2f}; defaults ratio: {tv_step / rows['default'][1]:.2f}"
          f"; default step / equal-work step: {rows['default'][1] / rows['equal'][1]:.3f}")
    ref = rows["every"][3]["loss_mask"]
    for key in ("equal", "default"):
        got = rows[key][3]["loss_mask"]
        rel = abs(got - ref) / max(abs(ref), 1e-30)
        # Dropping a positive changes the mean over positives; otherwise only summation order
        # differs.
        print(f"first-step loss_mask of {key}: {got:.6f} vs {ref:.6f} with every positive: rel "
              f"diff {rel:.1e}, " + ("no positive dropped" if rel < 1e-5 else
                                     "POSITIVES DROPPED: not torchvision's work"))


def time_jax(net, tx, params, stats, opt_state, data, overrides, steps, frozen_labels=None):
    """(median step s, first step s incl. compile, first step's loss terms, total loss of every
    step, the jitted step) of the jitted step of `net` with the model config `overrides` (its
    mask budget); `frozen_labels` ('frozen'/'trained' per parameter): the frozen ones get no
    gradient, as in `train_lib.train_step`."""

    net = type(net)(frozen({**net.config.to_dict(), "gt_mask_format": "full", **overrides}))

    @jax.jit
    def step(params, opt_state, data, key):
        def loss_fn(p):
            p = stop_frozen_gradients(p, frozen_labels)
            return compute_losses(net, {"params": p, "batch_stats": stats}, data, key)
        (loss, (terms, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, terms

    key = jax.random.key(0)
    start = time.perf_counter()
    _, _, loss, terms = step(params, opt_state, data, key)
    losses, terms = [float(loss)], {k: float(v) for k, v in terms.items()}
    compile_s = time.perf_counter() - start
    times = []
    for i in range(steps):  # from the initial weights each time, as torchvision's steps
        start = time.perf_counter()
        _, _, loss, _ = step(params, opt_state, data, jax.random.fold_in(key, i))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return float(np.median(times)), compile_s, terms, losses, step


if __name__ == "__main__":
    main()
