"""Synthetic test images (NumPy only)."""

import numpy as np


def ellipse_image(rng, height, width, num_ellipses=5):
    """A smooth uint8 RGB `(height, width, 3)` image (colour gradients) with `num_ellipses`
    bright filled ellipses and mild noise: something a detector's features respond to."""
    yy, xx = np.mgrid[:height, :width]
    image = np.stack([(xx / width) * 120, (yy / height) * 120, np.full((height, width), 60.0)], -1)
    for _ in range(num_ellipses):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.08, 0.25) * height, rng.uniform(0.08, 0.25) * width
        image[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = rng.uniform(80, 255, 3)
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
