"""The inference loop shared by every runner (`Predictor`, `ExportedPredictor`, `evaluate`):
host batches in, the network dispatched on each, host post-processing of the previous batch
while the device computes the next (JAX dispatches asynchronously); and the compiled network
they share.
"""

from typing import Callable, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from maskrcnn_jax import runtime
from maskrcnn_jax.canvas import bucket_for, canvases
from maskrcnn_jax.data import transform
from maskrcnn_jax.data.transform import padded_size, preprocess, resize_boxes
from maskrcnn_jax.errors import ImageError


def compiled_detector(config, mesh: Mesh):
    """The jit-compiled `MaskRCNN(config).apply` (inference) on `mesh`: variables replicated,
    images and detections split on 'data'. One per config and mesh in the process
    (`runtime.compiled`), shared by `Predictor` and `evaluate`."""
    # Imported here: `ExportedPredictor` runs this module's loop without the model code.
    from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen

    config = frozen(config)
    return runtime.compiled("detect", [config, mesh], lambda: jax.jit(
        MaskRCNN(config).apply, out_shardings=runtime.split(mesh),
        in_shardings=(runtime.replicated(mesh), *[runtime.split(mesh)] * 3)))


def run_pipelined(batches: Iterable, forward: Callable, finish: Callable):
    """`finish(forward(*inputs), context)` for each `(inputs, context)` of `batches`, in order,
    pipelined: batch k + 1 is prepared (the iterator's work) and dispatched before the outputs
    of batch k are finished, so the host work of both overlaps the device's computation of
    batch k + 1 whenever `forward` returns device arrays without waiting for them."""
    pending = None
    for inputs, context in batches:
        outputs = forward(*inputs)
        if pending is not None:
            finish(*pending)
        pending = (outputs, context)
    if pending is not None:
        finish(*pending)


def detect_in_batches(images: Sequence[np.ndarray], config, batch_size: int, forward,
                      buckets=None, paste_masks: bool = True) -> list[dict]:
    """Batched inference on images of any size (`Predictor`, `ExportedPredictor`).

    Each image goes to the smallest canvas of `buckets` (default `config.canvas_buckets`) that
    holds it after resizing; the images of one canvas are preprocessed in chunks of
    `batch_size` (a short last chunk is padded with blank images, so the compiled shapes never
    change: one per canvas used), run through `forward(images, image_sizes, padded_sizes)` (the
    network: padded detections as host or device arrays), and mapped back to original-image
    pixels, in the caller's order. With device arrays the host work overlaps the device's:
    chunk k + 1 is preprocessed and dispatched before chunk k's outputs are pasted.

    Returns:
      One dict per image, as torchvision's Mask R-CNN in eval mode: `boxes (N, 4)` float32
      `(x1, y1, x2, y2)` in original-image pixels, `scores (N,)` float32 (decreasing),
      `labels (N,)` int64, `masks (N, 1, H, W)` float32 probabilities. With
      `paste_masks=False`, `mask_probs (N, M, M)` float32 (the mask head's probabilities on
      each box) instead of `masks`: `transform.pasted_crops` / `coco_results.pasted_mask_rles`
      paste them one box extent at a time, so that a large image costs no `N x H x W` array.

    Raises:
      ImageError (a ValueError): naming the image's index in `images`, for a bad image or one
        that fits no canvas.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise ValueError("expected a sequence of images; wrap a single image in a list")
    buckets = [tuple(b) for b in buckets] if buckets else canvases(config)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        (out_h, out_w), pad = padded_size(np.asarray(image), config, i)
        canvas = bucket_for(pad, buckets)
        if canvas is None:
            h, w = np.shape(image)[:2]
            raise ImageError(f"size {h}x{w} resizes to {out_h}x{out_w} (padded {pad[0]}x"
                             f"{pad[1]}), which fits none of the canvases {buckets}", i)
        groups.setdefault(canvas, []).append(i)
    results: list[dict | None] = [None] * len(images)

    def finish(out, context):
        chunk, batch = context
        out = {k: np.asarray(v) for k, v in out.items()}  # waits for the device
        for k, i in enumerate(chunk):
            n = int(out["valid"][k].sum())  # detections are packed first, padding after
            original = tuple(int(v) for v in batch.original_sizes[k])
            boxes = resize_boxes(out["boxes"][k, :n], batch.image_sizes[k], original)
            results[i] = {
                "boxes": boxes,
                "scores": np.asarray(out["scores"][k, :n], np.float32),
                "labels": np.asarray(out["labels"][k, :n], np.int64),
            }
            probs = np.asarray(out["mask_probs"][k, :n], np.float32)
            if paste_masks:
                results[i]["masks"] = transform.paste_masks(probs, boxes, original)[:, None]
            else:
                results[i]["mask_probs"] = probs

    def batches():
        for canvas, members in groups.items():
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                blanks = [np.zeros((32, 32, 3), np.uint8)] * (batch_size - len(chunk))
                batch = preprocess([images[i] for i in chunk] + blanks, config,
                                   indices=chunk + [-1] * len(blanks), canvas_size=canvas)
                yield (batch.images, batch.image_sizes, batch.padded_sizes), (chunk, batch)

    run_pipelined(batches(), forward, finish)
    return results
