"""Training-step benchmark: maskrcnn_jax vs torchvision on identical weights and data.

Run:  python bench/train.py [--size 512] [--batch 2] [--steps 3] [--backbone resnet50]

Both sides start from the same converted weights (torchvision's Mask R-CNN with frozen batch
norm, as it trains from pretrained backbones) and train on the same synthetic images, boxes
and full-resolution masks with SGD (lr 0.02 x batch / 16, momentum 0.9, weight decay 1e-4); each
timed step starts again from the initial weights (from random weights the recipe diverges to
inf/NaN within two steps, which would be timed otherwise).
Prints images/s of each (after maskrcnn_jax's compilation, whose time is printed too) and their
ratio (maskrcnn_jax / torchvision: > 1 means maskrcnn_jax trains faster).

The two do not do the same mask-head work by default. torchvision runs its mask head (4 conv
layers at 14x14 + a deconv: ~1 GFLOP per RoI forward, ~3 with the backward) on the positive
RoIs it sampled; maskrcnn_jax, with static shapes, on `mask_rois_per_image` slots per image
(default 128 = 512 x 0.25, the most positives the sampler can return, which keeps every positive,
as torchvision). With random weights and few objects the positives are few (typically just the
gt boxes, which torchvision appends to the proposals: 4 per image here), so the benchmark prints
torchvision's positive counts and times maskrcnn_jax twice: with the exact default (the worst
case, e.g. a trained RPN on crowded COCO images) and with `mask_rois_per_image` set to the most
positives torchvision had in an image (equal work; the printed mask losses show whether that
dropped any positive of maskrcnn_jax's own sample).
"""

import argparse
import contextlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from maskrcnn_jax.convert import from_torchvision  # noqa: E402
from maskrcnn_jax.losses import compute_losses  # noqa: E402
from maskrcnn_jax.model import MaskRCNN, frozen  # noqa: E402
from maskrcnn_jax.testing import import_torchvision  # noqa: E402
from maskrcnn_jax.testing.torch_models import fast_roi_align  # noqa: E402
from maskrcnn_jax.transform import preprocess  # noqa: E402


def torchvision_model(backbone_name, num_classes):
    torchvision = import_torchvision()
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = getattr(torchvision.models, backbone_name)(weights=None, norm_layer=FrozenBatchNorm2d)
    return torchvision.models.detection.MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=num_classes)


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
    parser.add_argument("--torch-roi-align", choices=("separable", "fallback"), default="separable",
                        help="where torchvision's compiled ops are missing: 'separable' (the "
                             "matrix-product stand-in of maskrcnn_jax.testing, closer to a C++ "
                             "kernel's cost) or torchvision's own slow pure-PyTorch fallback")
    parser.add_argument("--mask-rois", type=int, default=None,
                        help="maskrcnn_jax's matched mask_rois_per_image (default: the most "
                             "positives torchvision sampled in an image)")
    args = parser.parse_args()
    torch.manual_seed(0)
    num_classes = 5
    model = torchvision_model(args.backbone, num_classes)
    model.transform.min_size, model.transform.max_size = (args.size,), args.size
    # Copies: the converted arrays would otherwise share memory with the torch parameters, and
    # torchvision's (in-place) training below would change maskrcnn_jax's starting weights.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config, variables = from_torchvision(state, num_classes=num_classes, min_size=args.size,
                                         max_size=args.size, canvas_size=(args.size, args.size))
    rng = np.random.default_rng(0)
    images, targets = synthetic_data(rng, args.batch, args.size, args.objects)
    lr = 0.02 * args.batch / 16
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {args.backbone} {args.size}x{args.size}, batch {args.batch}; "
          f"torchvision RoIAlign: {args.torch_roi_align}")

    # torchvision
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                                momentum=0.9, weight_decay=1e-4)
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images]
    torch_targets = [{"boxes": torch.from_numpy(t["boxes"]), "labels": torch.from_numpy(t["labels"]),
                      "masks": torch.from_numpy(t["masks"])} for t in targets]
    # Positive RoIs per image (the mask head's batch), as torchvision's roi_heads samples them.
    positives = []
    select = model.roi_heads.select_training_samples

    def counting_select(proposals, targets):
        out = select(proposals, targets)
        positives.append([int((labels > 0).sum()) for labels in out[2]])
        return out

    model.roi_heads.select_training_samples = counting_select
    times, tv_losses = [], []
    roi_align_ctx = fast_roi_align() if args.torch_roi_align == "separable" else contextlib.nullcontext()
    for _ in range(args.steps + 1):
        # Every timed step starts from the initial weights: from random weights this recipe
        # diverges within two steps (inf/NaN values would then be timed).
        model.load_state_dict(state)
        optimizer.state.clear()
        start = time.perf_counter()
        with roi_align_ctx:
            loss = sum(model(tensors, torch_targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
        tv_losses.append(loss.item())
    tv_step = float(np.median(times[1:]))
    counts = np.asarray(positives)
    print(f"torchvision positive (mask-head) RoIs per image over {len(counts)} steps: "
          f"mean {counts.mean():.1f}, max {counts.max()}; total loss per step "
          + " ".join(f"{v:.4g}" for v in tv_losses))

    # maskrcnn_jax
    net = MaskRCNN(frozen(config))
    batch = preprocess(images, config)
    masks = np.zeros((args.batch, args.objects, args.size, args.size), np.float32)
    for i, t in enumerate(targets):
        masks[i] = t["masks"]
    data = {"images": batch.images, "image_sizes": batch.image_sizes, "padded_sizes": batch.padded_sizes,
            "boxes": np.stack([t["boxes"] for t in targets]), "labels": np.stack([t["labels"] for t in targets]).astype(np.int32),
            "valid": np.ones((args.batch, args.objects), bool), "masks": masks}
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(lr, momentum=0.9))
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    default_rois = int(config.box_batch_size_per_image * config.box_positive_fraction)
    matched_rois = args.mask_rois or int(counts.max())
    rows = []
    for label, mask_rois in ((f"maskrcnn_jax, {default_rois} mask RoIs/img (exact, worst case)", None),
                             (f"maskrcnn_jax, {matched_rois} mask RoIs/img (torchvision's work)", matched_rois)):
        step_s, compile_s, loss_mask, losses = time_jax(net, tx, params, stats, opt_state, data,
                                                        mask_rois, args.steps)
        rows.append((label, step_s, compile_s, loss_mask))
        print(f"{label}: total loss per step " + " ".join(f"{v:.4g}" for v in losses))
    print(f"{'':<58} {'step s':>8} {'images/s':>9} {'vs torchvision':>15}")
    print(f"{'torchvision':<58} {tv_step:8.2f} {args.batch / tv_step:9.2f}")
    for label, step_s, compile_s, _ in rows:
        print(f"{label:<58} {step_s:8.2f} {args.batch / step_s:9.2f} {tv_step / step_s:15.2f}"
              f"   (first step incl. compile {compile_s:.1f} s)")
    rel = abs(rows[1][3] - rows[0][3]) / abs(rows[0][3])
    # Dropping a positive changes the mean over positives; otherwise only summation order differs.
    print(f"first-step loss_mask: {rows[0][3]:.6f} ({default_rois} RoIs/img) vs {rows[1][3]:.6f} "
          f"({matched_rois}): rel diff {rel:.1e}, "
          f"{'no positive dropped' if rel < 1e-5 else 'POSITIVES DROPPED: the matched run is not equal work'}")
    print("vs torchvision: maskrcnn_jax images/s / torchvision images/s (> 1: maskrcnn_jax faster)")


def time_jax(net, tx, params, stats, opt_state, data, mask_rois, steps):
    """(median step s, first step s incl. compile, first step's loss_mask, total loss of every
    step) of the jitted step."""

    @jax.jit
    def step(params, opt_state, data, key):
        def loss_fn(p):
            return compute_losses(net, {"params": p, "batch_stats": stats}, data, key,
                                  mask_format="full", mask_rois_per_image=mask_rois)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
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
    return float(np.median(times)), compile_s, loss_mask, losses


if __name__ == "__main__":
    main()
