"""nearest_indices against torch's F.interpolate(mode='nearest') (CPU kernel)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskrcnn_jax.ops.interpolate import nearest_indices


def test_nearest_indices_match_torch_small_sizes():
    """Up, down, odd and equal sizes, exhaustively for small ones."""
    for in_size in range(1, 24):
        for out_size in range(1, 50):
            src = torch.arange(in_size, dtype=torch.float32).reshape(1, 1, in_size)
            ref = F.interpolate(src, size=out_size, mode="nearest").reshape(-1).long().numpy()
            np.testing.assert_array_equal(nearest_indices(in_size, out_size), ref,
                                          err_msg=f"{in_size}->{out_size}")


@pytest.mark.parametrize("in_size,out_size", [(40, 64), (30, 96), (50, 80), (123, 57),
                                              (640, 1066), (97, 200), (427, 800)])
def test_nearest_indices_match_torch_image_sizes(in_size, out_size):
    """Image-sized axes, as the data pipeline resizes masks (2-D interpolate, one axis used)."""
    x = torch.arange(in_size, dtype=torch.float32)[None, None, None, :].repeat(1, 1, 2, 1)
    theirs = F.interpolate(x, size=(2, out_size))[0, 0, 0].long().numpy()
    np.testing.assert_array_equal(nearest_indices(in_size, out_size), theirs)
