"""Host mask crops (`crop_resized_masks`) vs torchvision and vs a float64 loop of its kernel.

References: torchvision's own `project_masks_on_boxes` (its compiled RoIAlign) on masks resized
by torch's `F.interpolate(mode='nearest')` (as `GeneralizedRCNNTransform` resizes target masks),
flipped as torchvision's reference `RandomHorizontalFlip` flips them; and a float64 loop of the
C++ RoIAlign kernel (`testing.references.numpy_roi_align`: aligned=False, adaptive grid, spatial
scale 1), which pins the sample positions without float32 summation.
"""

import numpy as np
import torch
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from maskrcnn_jax.data.mask_crops import crop_resized_masks
from maskrcnn_jax.ops.interpolate import nearest_indices
from maskrcnn_jax.testing.references import numpy_roi_align


def _random_masks_and_boxes(rng, count, h0, w0, h, w):
    """`(count, h0, w0)` uint8 masks and `(count, 4)` float32 boxes in the `h x w` resized image:
    random ones, partly outside it, plus the whole image and one under a pixel."""
    masks = (rng.random((count, h0, w0)) < 0.4).astype(np.uint8)
    xy = rng.uniform(-4, [w - 5, h - 5], (count, 2))
    wh = rng.uniform(0.2, max(h, w) * 0.75, (count, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    boxes[0] = [0, 0, w, h]  # whole image: samples in the last row/column clamp
    boxes[1] = [10.3, 5.2, 10.5, 5.3]  # under a pixel: clamped to 1 px
    return masks, boxes


def test_crop_matches_kernel_loop():
    rng = np.random.default_rng(0)
    h0, w0, h, w = 23, 31, 40, 50
    masks, boxes = _random_masks_and_boxes(rng, 6, h0, w0, h, w)
    rows, cols = nearest_indices(h0, h), nearest_indices(w0, w)
    for flip in (False, True):
        col_map = w0 - 1 - cols if flip else cols
        ours = crop_resized_masks(masks, rows, col_map, boxes, 28)
        for n in range(len(masks)):
            resized = masks[n][np.ix_(rows, col_map)].astype(np.float64)
            loop = numpy_roi_align(resized[..., None], boxes[n:n + 1], (28, 28), 1.0, -1, False)
            np.testing.assert_allclose(ours[n], loop[0, :, :, 0], rtol=0, atol=1e-6)


def test_crop_matches_torchvision_project_masks_on_boxes():
    """torchvision's training targets of the resized (and flipped) masks, on each mask's own
    box: up- and downsampled masks, crop sizes 28 and 112 (adaptive grids of 1 to 3 samples)."""
    rng = np.random.default_rng(2)
    for (h0, w0, h, w), size in (((23, 31, 40, 50), 28), ((150, 90, 100, 61), 28),
                                 ((120, 160, 240, 320), 112)):
        masks, boxes = _random_masks_and_boxes(rng, 8, h0, w0, h, w)
        rows, cols = nearest_indices(h0, h), nearest_indices(w0, w)
        for flip in (False, True):
            original = torch.from_numpy(masks)
            if flip:
                original = original.flip(-1)
            resized = torch.nn.functional.interpolate(original[:, None].float(),
                                                      size=(h, w))[:, 0].byte()
            theirs = project_masks_on_boxes(resized, torch.from_numpy(boxes),
                                            torch.arange(len(masks)), size).numpy()
            ours = crop_resized_masks(masks, rows, w0 - 1 - cols if flip else cols, boxes, size)
            assert ours.shape == (len(masks), size, size) and ours.dtype == np.float32
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
            assert theirs.max() > 0.9 and theirs.std() > 0.1  # not vacuous
