"""Bilinear resizing that reproduces torch's CPU `upsample_bilinear2d` (align_corners=False).

torchvision's `GeneralizedRCNNTransform` resizes every (normalized, float32) image with
`F.interpolate(image[None], scale_factor=s, mode="bilinear", recompute_scale_factor=True,
align_corners=False)`, and `paste_masks_in_image` resizes every padded mask with
`F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)`. To give the same
detections, this module reproduces the float32 arithmetic of torch's CPU kernels
(aten/src/ATen/native/cpu/UpSampleKernel.cpp, UpSample.h), not just the formula:

* scale = float32(in_size) / float32(out_size) (recompute_scale_factor=True means the kernel
  never sees the user's scale factor, only the integer sizes);
* source coordinate `src = max(scale * (dst + 0.5) - 0.5, 0)`, which torch's build evaluates
  with a fused multiply-add; `i0 = min(floor(src), in - 1)`, `i1 = i0 + (i0 < in - 1)`,
  `lambda1 = clamp(src - i0, 0, 1)`, `lambda0 = 1 - lambda1`;
* two ways of mixing the four neighbours, depending on which CPU kernel torch dispatches to:
  - "generic" (`upsample_non_separable_Nd_kernel_impl`, used when out_h + out_w > 128 with
    a multi-threaded torch): width first, then height, each step `fma(x0, l0, x1 * l1)`;
  - "channels_last" (`upsample_linear_channels_last`, used when out_h + out_w <= 128, or for
    3-channel images when torch runs on one thread): products of the two 1-D weights, then
    `fma(d, w11, fma(c, w10, fma(a, w00, b * w01)))` (its scalar loop; channel counts that
    fill whole SIMD vectors, >= 16 on AVX512, mix in another order and are not reproduced).

XLA's CPU (and GPU) backends contract `x * y + z` into a fused multiply-add, so the
expressions below are written in exactly the operand order that makes LLVM fuse the same
products torch fuses (for `p * q + r * s` it fuses the left product). The tests check the
result bit for bit against torch; on a CPU without FMA both sides differ by about 1 ulp.
Every public function is wrapped in `jax.jit` so that eager calls get the same fusion.
"""

import functools

import jax
import jax.numpy as jnp

# torch picks its channels-last kernel when out_h + out_w <= this (multi-threaded torch).
CHANNELS_LAST_MAX_OUTPUT_SUM = 128

KERNELS = ("auto", "generic", "channels_last")


def resized_image_size(height, width, min_size=800, max_size=1333):
    """Output size of torchvision's `_resize_image_and_masks` for a `height x width` image.

    Args:
      height, width: Python ints, the input image size.
      min_size, max_size: torchvision's `GeneralizedRCNNTransform` settings.

    Returns:
      (out_h, out_w, scale): Python ints and the Python float scale factor. The scale is
      computed in double precision exactly as torchvision does
      (`min(min_size / min(h, w), max_size / max(h, w))`) and the size as
      `int(size * scale)` (truncation), as `F.interpolate(recompute_scale_factor=True)` does;
      so the short side can come out as `min_size - 1` when the double product rounds down.
    """
    height, width = int(height), int(width)
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(height * scale), int(width * scale), scale


def bilinear_source_index(dst_index, in_size, out_size):
    """Source indices and weights torch's bilinear kernel uses for output indices `dst_index`.

    Args:
      dst_index: int32 array, any shape, output pixel indices along one axis. Callers may pass
        indices outside [0, out_size); the results are then still valid gather indices in
        [0, in_size - 1] (they are meaningless and must be masked by the caller).
      in_size, out_size: Python ints or int32 arrays broadcastable with `dst_index`, >= 1.

    Returns:
      (i0, i1, lambda0, lambda1): int32 indices in [0, in_size - 1] of the two neighbours and
      their float32 weights, all of the broadcast shape.
    """
    in_size = jnp.asarray(in_size, jnp.int32)
    out_size = jnp.asarray(out_size, jnp.int32)
    scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
    # Written as mul-then-sub so that XLA fuses it into one FMA, as torch's build does.
    src = scale * (dst_index.astype(jnp.float32) + jnp.float32(0.5)) - jnp.float32(0.5)
    src = jnp.maximum(src, jnp.float32(0.0))
    i0 = jnp.clip(jnp.floor(src).astype(jnp.int32), 0, in_size - 1)
    lambda1 = jnp.clip(src - i0.astype(jnp.float32), jnp.float32(0.0), jnp.float32(1.0))
    lambda0 = jnp.float32(1.0) - lambda1
    i1 = i0 + (i0 < in_size - 1).astype(jnp.int32)
    return i0, i1, lambda0, lambda1


def bilinear_combine(a, b, c, d, h_lambda0, h_lambda1, w_lambda0, w_lambda1, channels_last):
    """Mix the four neighbours with torch's float32 operation order.

    Args:
      a, b, c, d: float32 arrays of one broadcast shape, the input at (h0, w0), (h0, w1),
        (h1, w0), (h1, w1).
      h_lambda0, h_lambda1, w_lambda0, w_lambda1: float32 weights broadcastable to it.
      channels_last: Python bool, or bool array broadcastable to it, choosing torch's
        channels-last kernel order over the generic kernel's order (see module docstring).

    Returns:
      float32 array of the broadcast shape.
    """
    generic = None
    blended = None
    if channels_last is not True:
        # Generic kernel: width pass then height pass; XLA fuses the left product of each sum.
        top = a * w_lambda0 + b * w_lambda1
        bottom = c * w_lambda0 + d * w_lambda1
        generic = top * h_lambda0 + bottom * h_lambda1
    if channels_last is not False:
        # Channels-last kernel: 2-D weights first (plain products), then a left-to-right sum.
        w00 = h_lambda0 * w_lambda0
        w01 = h_lambda0 * w_lambda1
        w10 = h_lambda1 * w_lambda0
        w11 = h_lambda1 * w_lambda1
        blended = a * w00 + b * w01 + c * w10 + d * w11
    if generic is None:
        return blended
    if blended is None:
        return generic
    return jnp.where(channels_last, blended, generic)


def _channels_last_choice(kernel, out_h, out_w):
    """Which torch kernel to imitate: a Python bool for static sizes, else a traced bool."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "auto":
        return kernel == "channels_last"
    if isinstance(out_h, int) and isinstance(out_w, int):
        return out_h + out_w <= CHANNELS_LAST_MAX_OUTPUT_SUM
    return (jnp.asarray(out_h) + jnp.asarray(out_w)) <= CHANNELS_LAST_MAX_OUTPUT_SUM


def _resample(image, in_h, in_w, rows, cols, out_h, out_w, channels_last):
    """Sample `image` (H, W, C) at output rows/cols (int32 vectors) for the given sizes."""
    h0, h1, hl0, hl1 = bilinear_source_index(rows, in_h, out_h)
    w0, w1, wl0, wl1 = bilinear_source_index(cols, in_w, out_w)
    # Gather the two source rows first (small), then the two source columns of each.
    row0 = image[h0]
    row1 = image[h1]
    a, b = row0[:, w0], row0[:, w1]
    c, d = row1[:, w0], row1[:, w1]
    return bilinear_combine(a, b, c, d, hl0[:, None, None], hl1[:, None, None],
                            wl0[None, :, None], wl1[None, :, None], channels_last)


@functools.partial(jax.jit, static_argnames=("out_size", "kernel"))
def resize_bilinear(image, out_size, kernel="auto"):
    """Resize an image like torch's CPU `F.interpolate(mode="bilinear", align_corners=False)`.

    Args:
      image: (H, W, C) float32 array (channels last; torch's NCHW input has the same values).
      out_size: static (out_h, out_w) Python ints, e.g. from `resized_image_size`.
      kernel: which torch CPU kernel's arithmetic to reproduce: "auto" (what a multi-threaded
        torch runs: channels-last iff out_h + out_w <= 128), "generic" or "channels_last"
        (what torch runs for 3-channel images when `torch.get_num_threads() == 1`).

    Returns:
      (out_h, out_w, C) float32 array.
    """
    out_h, out_w = (int(s) for s in out_size)
    in_h, in_w = image.shape[0], image.shape[1]
    channels_last = _channels_last_choice(kernel, out_h, out_w)
    rows = jnp.arange(out_h, dtype=jnp.int32)
    cols = jnp.arange(out_w, dtype=jnp.int32)
    return _resample(image.astype(jnp.float32), in_h, in_w, rows, cols, out_h, out_w,
                     channels_last)


@functools.partial(jax.jit, static_argnames=("canvas_size", "kernel"))
def resize_into_canvas(image, in_size, out_size, canvas_size, kernel="auto"):
    """`resize_bilinear` with traced sizes, written into a zero-padded static canvas.

    Lets images of many sizes share one compiled function: the input is the top-left
    `in_size` region of a padded buffer and the result fills the top-left `out_size` region
    of the canvas, the rest being 0 (torchvision pads its batches with 0).

    Args:
      image: (Hi, Wi, C) float32 buffer; only `image[:in_h, :in_w]` is read.
      in_size: (in_h, in_w) int32 array or ints, 1 <= in_h <= Hi, 1 <= in_w <= Wi.
      out_size: (out_h, out_w) int32 array or ints, 1 <= out_h <= Hc, 1 <= out_w <= Wc.
      canvas_size: static (Hc, Wc) Python ints.
      kernel: as in `resize_bilinear`; "auto" decides per call from the traced sizes.

    Returns:
      (Hc, Wc, C) float32 array, equal to `resize_bilinear(image[:in_h, :in_w], out_size)` in
      its top-left `out_size` region and 0 elsewhere.
    """
    canvas_h, canvas_w = (int(s) for s in canvas_size)
    in_size = jnp.asarray(in_size, jnp.int32)
    out_size = jnp.asarray(out_size, jnp.int32)
    in_h, in_w = in_size[0], in_size[1]
    out_h, out_w = out_size[0], out_size[1]
    channels_last = _channels_last_choice(kernel, out_h, out_w)
    rows = jnp.arange(canvas_h, dtype=jnp.int32)
    cols = jnp.arange(canvas_w, dtype=jnp.int32)
    resized = _resample(image.astype(jnp.float32), in_h, in_w, rows, cols, out_h, out_w,
                        channels_last)
    inside = (rows < out_h)[:, None, None] & (cols < out_w)[None, :, None]
    return jnp.where(inside, resized, jnp.float32(0.0))

