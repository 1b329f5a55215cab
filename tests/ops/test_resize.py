"""resize.py against torch's CPU `F.interpolate(mode="bilinear", align_corners=False)`.

torch's kernels evaluate parts of the arithmetic with fused multiply-adds on FMA-capable
builds (AVX2 / AVX512 dispatch); there our results must be bit-identical. On other CPUs
both sides round differently and we allow a few float32 ulps (see `assert_matches_torch`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.transform import _resize_image_and_masks

from maskrcnn_jax.ops.resize import (
    resize_bilinear,
    resize_into_canvas,
    resized_image_size,
)

FMA_BUILD = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def assert_matches_torch(ours, ref):
    """Bit-identical on FMA builds; else within 4 float32 ulps of the largest value."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    max_diff = float(np.max(np.abs(ours - ref), initial=0.0))
    if FMA_BUILD:
        assert max_diff == 0.0, f"max abs diff {max_diff}"
    else:
        scale = float(np.max(np.abs(ref), initial=1.0))
        assert max_diff <= 4 * np.finfo(np.float32).eps * scale, f"max abs diff {max_diff}"
    return max_diff


def torch_resize(image_hwc, out_size):
    """torch reference: (H, W, C) float32 NumPy -> (oh, ow, C)."""
    x = torch.from_numpy(np.ascontiguousarray(image_hwc.transpose(2, 0, 1)))[None]
    y = F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)
    return y[0].numpy().transpose(1, 2, 0)


def auto_kernel_for_torch_threads(channels):
    """Kernel torch runs for large outputs: channels-last for 3 channels on one thread."""
    return "channels_last" if (torch.get_num_threads() == 1 and channels == 3) else "auto"


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(20240601)


# Sizes: up/down-sampling, odd sizes, identity, 1-pixel, both torch kernels
# (out_h + out_w <= 128 selects torch's channels-last kernel, > 128 the generic one).
RESIZE_CASES = [
    ((37, 53), (101, 77)),  # upsample, generic
    ((61, 45), (23, 17)),  # downsample, channels-last
    ((30, 30), (29, 31)),  # near-identity, channels-last
    ((13, 9), (40, 3)),  # mixed up/down
    ((17, 19), (17, 19)),  # identity
    ((1, 1), (5, 4)),  # single input pixel
    ((6, 7), (1, 1)),  # single output pixel
    ((120, 90), (64, 64)),  # exactly 128: channels-last
    ((120, 90), (64, 65)),  # 129: generic
    ((211, 150), (97, 301)),  # larger generic
]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("in_size,out_size", RESIZE_CASES)
def test_resize_bilinear_matches_torch(rng, in_size, out_size, channels):
    image = rng.standard_normal(in_size + (channels,)).astype(np.float32)
    ours = resize_bilinear(jnp.asarray(image), out_size,
                           kernel=auto_kernel_for_torch_threads(channels))
    assert ours.dtype == jnp.float32 and ours.shape == out_size + (channels,)
    assert_matches_torch(ours, torch_resize(image, out_size))


def test_identity_resize_returns_input(rng):
    image = rng.standard_normal((11, 14, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(resize_bilinear(jnp.asarray(image), (11, 14))),
                                  image)


def test_single_thread_torch_uses_channels_last_kernel(rng):
    """torch on one thread resizes 3-channel images with its channels-last kernel."""
    image = rng.standard_normal((71, 93, 3)).astype(np.float32)
    out_size = (150, 190)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = torch_resize(image, out_size)
    finally:
        torch.set_num_threads(previous)
    ours = resize_bilinear(jnp.asarray(image), out_size, kernel="channels_last")
    assert_matches_torch(ours, ref)
    # The two kernels really differ somewhere, so the test above can fail.
    generic = resize_bilinear(jnp.asarray(image), out_size, kernel="generic")
    assert np.any(np.asarray(generic) != ref)


def test_bad_kernel_name_raises():
    with pytest.raises(ValueError):
        resize_bilinear(jnp.zeros((4, 4, 1)), (2, 2), kernel="fast")


# Portrait, landscape, square; short sides where int(h * (800 / h)) == 799 (97, 161, 193)
# or long sides where the max_size rule rounds down (149, 1077); tiny and huge images.
SIZE_CASES = [
    (480, 640), (640, 480), (500, 500), (800, 1333), (1333, 800), (97, 500), (500, 97),
    (97, 100), (161, 200), (193, 193), (149, 1077), (1077, 149), (600, 1000), (427, 640),
    (375, 500), (1, 1), (2, 3), (3000, 2000), (800, 800), (799, 1334), (1200, 1600),
]


def test_resized_image_size_matches_torchvision():
    for height, width in SIZE_CASES:
        expected = _resize_image_and_masks(torch.zeros(1, height, width), 800, 1333)[0].shape
        out_h, out_w, scale = resized_image_size(height, width)
        assert (out_h, out_w) == tuple(expected[-2:]), (height, width)
        assert scale == min(800 / min(height, width), 1333 / max(height, width))


def test_resized_image_size_short_side_can_be_799():
    assert resized_image_size(97, 100)[:2] == (799, 824)


def test_resize_matches_torchvision_transform(rng):
    """The whole torchvision resize step, values included, on a normalized-like image."""
    image = rng.standard_normal((3, 61, 47)).astype(np.float32)
    ref = _resize_image_and_masks(torch.from_numpy(image), 800, 1333)[0].numpy()
    out_h, out_w, _ = resized_image_size(61, 47)
    ours = resize_bilinear(jnp.asarray(image.transpose(1, 2, 0)), (out_h, out_w),
                           kernel=auto_kernel_for_torch_threads(3))
    assert_matches_torch(np.asarray(ours).transpose(2, 0, 1), ref)


CANVAS = (160, 170)
BUFFER = (90, 100)


@pytest.fixture(scope="module")
def canvas_cases(rng):
    """(padded buffer, in_size, out_size, torch result) for sizes sharing one buffer shape."""
    cases = []
    for in_size, out_size in [((37, 53), (101, 77)), ((61, 45), (23, 17)), ((90, 100), (160, 170)),
                              ((13, 9), (40, 3)), ((1, 1), (5, 4)), ((80, 70), (80, 70))]:
        image = rng.standard_normal(in_size + (3,)).astype(np.float32)
        buffer = rng.standard_normal(BUFFER + (3,)).astype(np.float32)  # garbage padding
        buffer[: in_size[0], : in_size[1]] = image
        cases.append((buffer, in_size, out_size, torch_resize(image, out_size)))
    return cases


def test_resize_into_canvas_matches_static_and_torch(canvas_cases):
    kernel = auto_kernel_for_torch_threads(3)
    for buffer, in_size, out_size, ref in canvas_cases:
        out = np.asarray(resize_into_canvas(jnp.asarray(buffer), jnp.asarray(in_size),
                                            jnp.asarray(out_size), CANVAS, kernel=kernel))
        assert out.shape == CANVAS + (3,)
        oh, ow = out_size
        static = resize_bilinear(jnp.asarray(buffer[: in_size[0], : in_size[1]]), out_size,
                                 kernel=kernel)
        np.testing.assert_array_equal(out[:oh, :ow], np.asarray(static))
        assert_matches_torch(out[:oh, :ow], ref)
        assert not out[oh:].any() and not out[:, ow:].any()


def test_resize_into_canvas_compiles_once_for_all_sizes(canvas_cases):
    jitted = jax.jit(resize_into_canvas, static_argnames=("canvas_size", "kernel"))
    for buffer, in_size, out_size, _ in canvas_cases:
        jitted(jnp.asarray(buffer), jnp.asarray(in_size, jnp.int32),
               jnp.asarray(out_size, jnp.int32), CANVAS).block_until_ready()
    assert jitted._cache_size() == 1


def test_resize_into_canvas_vmap(canvas_cases):
    kernel = auto_kernel_for_torch_threads(3)
    buffers = jnp.asarray(np.stack([c[0] for c in canvas_cases]))
    in_sizes = jnp.asarray([c[1] for c in canvas_cases], jnp.int32)
    out_sizes = jnp.asarray([c[2] for c in canvas_cases], jnp.int32)
    batched = jax.jit(jax.vmap(lambda b, i, o: resize_into_canvas(b, i, o, CANVAS, kernel)))
    outs = np.asarray(batched(buffers, in_sizes, out_sizes))
    for out, (_, _, (oh, ow), ref) in zip(outs, canvas_cases):
        assert_matches_torch(out[:oh, :ow], ref)
        assert not out[oh:].any() and not out[:, ow:].any()
