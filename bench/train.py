"""Training-step benchmark: maskrcnn_jax vs torchvision (with its compiled C++/CUDA nms and
roi_align kernels and their backward) on identical weights and data, at equal work.

Run:  python bench/train.py [--size 512] [--batch 2] [--steps 3] [--backbone resnet50]
                            [--frozen-stages 2] [--threads N] [--mask-rois N]
                            [--mask-rois-per-batch N] [--profile] [--no-stop-gradient]

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

Mask RoIs. torchvision runs its mask head (4 conv layers at 14x14 + a deconv: ~1 GFLOP per RoI
forward, ~3 with the backward) on the positive RoIs it sampled; maskrcnn_jax, with static
shapes, on `mask_rois_per_image` slots per image (default 128 = 512 x 0.25, the most positives
the sampler can return, which keeps every positive, as torchvision). With random weights and few
objects the positives are few (typically just the gt boxes, which torchvision appends to the
proposals: --objects per image), so the benchmark prints torchvision's positive counts and times
maskrcnn_jax twice:
  * equal work: `mask_rois_per_image` = the most positives torchvision sampled in an image (the
    printed mask losses show whether that dropped any positive of maskrcnn_jax's own sample);
  * defaults: the default 128 (the worst case for maskrcnn_jax, e.g. a trained RPN on crowded
    COCO images makes torchvision's positives approach it too).
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from timing import header, torch_device, torch_sync  # noqa: E402

from maskrcnn_jax.data.transform import preprocess  # noqa: E402
from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen  # noqa: E402
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
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
    args = parser.parse_args()
    torchvision = import_torchvision()
    device = torch_device(jax, torch)
    header(THREADS, torch, torchvision, jax, device)
    torch.manual_seed(0)
    num_classes = 5
    model = torchvision_model(args.backbone, num_classes, args.frozen_stages)
    model.transform.min_size, model.transform.max_size = (args.size,), args.size
    # Copies: the converted arrays would otherwise share memory with the torch parameters, and
    # torchvision's (in-place) training below would change maskrcnn_jax's starting weights.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config, variables = from_torchvision(state, num_classes=num_classes, min_size=args.size,
                                         max_size=args.size, canvas_size=(args.size, args.size))
    model.to(device)
    rng = np.random.default_rng(0)
    images, targets = synthetic_data(rng, args.batch, args.size, args.objects)
    print(f"{args.backbone} {args.size}x{args.size}, batch {args.batch}, {args.objects} objects "
          f"per image; frozen backbone stages: {args.frozen_stages} (torchvision "
          f"trainable_backbone_layers={5 - args.frozen_stages}, maskrcnn_jax "
          f"frozen_backbone_stages={args.frozen_stages})")

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
    masks = np.zeros((args.batch, args.objects, args.size, args.size), np.float32)
    for i, t in enumerate(targets):
        masks[i] = t["masks"]
    data = jax.device_put({
        "images": batch.images, "image_sizes": batch.image_sizes, "padded_sizes": batch.padded_sizes,
        "boxes": np.stack([t["boxes"] for t in targets]),
        "labels": np.stack([t["labels"] for t in targets]).astype(np.int32),
        "valid": np.ones((args.batch, args.objects), bool), "masks": masks})
    opt_state = tx.init(params)

    default_rois = int(config.box_batch_size_per_image * config.box_positive_fraction)
    matched_rois = args.mask_rois or int(counts.max())
    runs = [("equal", f"maskrcnn_jax, {matched_rois} mask RoIs/img (equal work)", matched_rois,
             None),
            ("default", f"maskrcnn_jax, {default_rois} mask RoIs/img (default)", None, None)]
    if args.mask_rois_per_batch:
        runs.append(("batch", f"maskrcnn_jax, {args.mask_rois_per_batch} mask RoIs per batch "
                              "(positives packed)", None, args.mask_rois_per_batch))
    frozen_labels = labels if args.frozen_stages and not args.no_stop_gradient else None
    if args.no_stop_gradient:
        print("maskrcnn_jax: --no-stop-gradient, its frozen stages are differentiated (their "
              "update is still zero)")
    rows = {}
    for key, label, mask_rois, per_batch in runs:
        step_s, compile_s, loss_mask, losses, step = time_jax(
            net, tx, params, stats, opt_state, data, mask_rois, args.steps, frozen_labels,
            per_batch)
        rows[key] = (label, step_s, compile_s, loss_mask)
        print(f"{label}: total loss per step " + " ".join(f"{v:.4g}" for v in losses), flush=True)
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
          f"{tv_step / rows['equal'][1]:.2f}; defaults ratio: {tv_step / rows['default'][1]:.2f}")
    ref, matched = rows["default"][3], rows["equal"][3]
    rel = abs(matched - ref) / max(abs(ref), 1e-30)
    # Dropping a positive changes the mean over positives; otherwise only summation order differs.
    print(f"first-step loss_mask: {ref:.6f} ({default_rois} RoIs/img) vs {matched:.6f} "
          f"({matched_rois}): rel diff {rel:.1e}, "
          f"{'no positive dropped' if rel < 1e-5 else 'POSITIVES DROPPED: the matched run is not equal work'}")


def time_jax(net, tx, params, stats, opt_state, data, mask_rois, steps, frozen_labels=None,
             mask_rois_per_batch=None):
    """(median step s, first step s incl. compile, first step's loss_mask, total loss of every
    step, the jitted step) of the jitted step; `frozen_labels` ('frozen'/'trained' per parameter): the frozen
    ones get no gradient, as in `train_lib.train_step`."""

    net = type(net)(frozen({**net.config.to_dict(), "gt_mask_format": "full",
                            "mask_rois_per_image": mask_rois,
                            "mask_rois_per_batch": mask_rois_per_batch}))

    @jax.jit
    def step(params, opt_state, data, key):
        def loss_fn(p):
            p = stop_frozen_gradients(p, frozen_labels)
            return compute_losses(net, {"params": p, "batch_stats": stats}, data, key)
        (loss, (terms, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, terms["loss_mask"]

    key = jax.random.key(0)
    start = time.perf_counter()
    _, _, loss, loss_mask = step(params, opt_state, data, key)
    losses, loss_mask = [float(loss)], float(loss_mask)
    compile_s = time.perf_counter() - start
    times = []
    for i in range(steps):  # from the initial weights each time, as torchvision's steps
        start = time.perf_counter()
        _, _, loss, _ = step(params, opt_state, data, jax.random.fold_in(key, i))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return float(np.median(times)), compile_s, loss_mask, losses, step


if __name__ == "__main__":
    main()
