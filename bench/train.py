"""Training-step benchmark: maskrcnn_jax vs torchvision on identical weights and data.

Run:  python bench/train.py [--size 512] [--batch 2] [--steps 3] [--backbone resnet50]

Both sides start from the same converted weights (torchvision's Mask R-CNN with frozen batch
norm, as it trains from pretrained backbones) and train on the same synthetic images, boxes
and full-resolution masks with SGD (lr 0.02 x batch / 16, momentum 0.9, weight decay 1e-4).
Prints images/s of each (after maskrcnn_jax's compilation, whose time is printed too) and their
ratio (maskrcnn_jax / torchvision: > 1 means maskrcnn_jax trains faster).
"""

import argparse
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
from maskrcnn_jax.transform import preprocess  # noqa: E402


def torchvision_model(backbone_name, num_classes):
    torchvision = import_torchvision()
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = getattr(torchvision.models, backbone_name)(weights=None, norm_layer=FrozenBatchNorm2d)
    return torchvision.models.detection.MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=num_classes)


def synthetic_data(rng, batch, size, num_objects=4):
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
    args = parser.parse_args()
    torch.manual_seed(0)
    num_classes = 5
    model = torchvision_model(args.backbone, num_classes)
    model.transform.min_size, model.transform.max_size = (args.size,), args.size
    config, variables = from_torchvision(model.state_dict(), num_classes=num_classes, min_size=args.size,
                                         max_size=args.size, canvas_size=(args.size, args.size))
    rng = np.random.default_rng(0)
    images, targets = synthetic_data(rng, args.batch, args.size)
    lr = 0.02 * args.batch / 16
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {args.backbone} {args.size}x{args.size}, batch {args.batch}")

    # torchvision
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                                momentum=0.9, weight_decay=1e-4)
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images]
    torch_targets = [{"boxes": torch.from_numpy(t["boxes"]), "labels": torch.from_numpy(t["labels"]),
                      "masks": torch.from_numpy(t["masks"])} for t in targets]
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        loss = sum(model(tensors, torch_targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    tv_step = float(np.median(times[1:]))

    # maskrcnn_jax
    net = MaskRCNN(frozen(config))
    batch = preprocess(images, config)
    masks = np.zeros((args.batch, 4, args.size, args.size), np.float32)
    for i, t in enumerate(targets):
        masks[i] = t["masks"]
    data = {"images": batch.images, "image_sizes": batch.image_sizes, "padded_sizes": batch.padded_sizes,
            "boxes": np.stack([t["boxes"] for t in targets]), "labels": np.stack([t["labels"] for t in targets]).astype(np.int32),
            "valid": np.ones((args.batch, 4), bool), "masks": masks}
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(lr, momentum=0.9))
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, data, key):
        def loss_fn(p):
            return compute_losses(net, {"params": p, "batch_stats": stats}, data, key, mask_format="full")
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    key = jax.random.key(0)
    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, data, key)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - start
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, data, jax.random.fold_in(key, i))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    jax_step = float(np.median(times))
    print(f"{'':<12} {'step s':>8} {'images/s':>9}")
    print(f"{'torchvision':<12} {tv_step:8.2f} {args.batch / tv_step:9.2f}")
    print(f"{'maskrcnn_jax':<12} {jax_step:8.2f} {args.batch / jax_step:9.2f}   (first step incl. compile {compile_s:.1f} s)")
    print(f"maskrcnn_jax / torchvision images/s: {tv_step / jax_step:.2f}")


if __name__ == "__main__":
    main()
