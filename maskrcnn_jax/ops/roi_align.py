"""RoIAlign (torchvision C++ kernel semantics), FPN level mapping and multilevel RoIAlign.

Layout: features are channel-last per image, `(H, W, C)`; batch through `jax.vmap`.
Boxes are `(x1, y1, x2, y2)` in absolute (image) pixels; `spatial_scale` maps them to the map.

How it is computed: a RoI's sample points form a tensor-product grid (y positions depend only on
the output row, x positions only on the output column), and bilinear weights, the "sample outside
the map contributes 0" rule and the `1 / count` normalisation all factor into a y part times an x
part. So per RoI we build, for each axis, the two neighbouring pixel indices and weights of every
sample, gather the `(oh * gh * 2) x (ow * gw * 2)` pixel block from the flattened feature map and
contract it with the two weight tables, one gathered corner row at a time so that XLA fuses
gather, weighting and sum (see `_separable_gather_sum`): the work is proportional to the
samples, where one-hot matmuls over a whole FPN level would touch every pixel of it for every
RoI. Several maps (FPN levels, or one GT mask per RoI) are handled by
flattening them into one `(sum H_l * W_l, C)` array and giving each RoI its own map's
offset/height/width/scale, as the TF TPU Mask R-CNN's `multilevel_crop_and_resize` does, so each
RoI is pooled from its own level only.

Numerics: the arithmetic is the C++ kernel's, in float32, and op-by-op (eager) results match it
to summation order. Under `jax.jit` XLA:CPU contracts `a * b + c` into FMAs and divides by
constants via reciprocals, so sample coordinates may move by an ulp (output change <= ulp of
the coordinate times the local feature slope, e.g. ~1e-5 per unit slope at x ~ 200). The
discontinuous steps (adaptive grid size) are computed exactly regardless.
"""

import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops.boxes import box_area


def _ceil_divide(x: jnp.ndarray, d: int) -> jnp.ndarray:
    """`ceil(x / d)` of float32 `x` by a static int `d`, exact also under `jax.jit` on CPU.

    Why: XLA:CPU turns division by a constant into a reciprocal multiply (e.g. `28 / 28` may give
    1.0000001), which would flip the adaptive grid of RoIs whose size is an exact multiple of the
    output size. The candidate is fixed with products of small integers, which are exact.
    """
    k = jnp.ceil(x / d)
    k = jnp.where((k - 1.0) * d >= x, k - 1.0, k)
    return jnp.where(k * d < x, k + 1.0, k)


def _axis_samples(start, bin_size, grid, size, pooled, max_grid, adaptive):
    """Pixel indices and weights of the samples along one axis, C++ kernel arithmetic.

    Args:
      start, bin_size, grid: `(R,)` float32 RoI start, bin size and per-RoI grid (as float).
      size: `(R,)` float32 map extent along this axis (H or W of the RoI's map).
      pooled: static output extent along this axis.
      max_grid: static number of grid slots per bin.
      adaptive: static; mask slots `>= grid` (adaptive grids differ per RoI).

    Returns:
      indices `(R, pooled, max_grid, 2)` int32 (low, high pixel) and weights of the same shape
      float32 (hi/lo interpolation weight, 0 for samples outside `[-1, size]` or unused slots).
    """
    p = jnp.arange(pooled, dtype=jnp.float32)[None, :, None]
    i = jnp.arange(max_grid, dtype=jnp.float32)[None, None, :]
    s, b, g, n = (t[:, None, None] for t in (start, bin_size, grid, size))
    # Same association as the kernel: start + p * bin + ((i + .5) * bin) / grid. An empty
    # adaptive grid (g = 0) has no samples; divide by 1 instead to keep the masked math finite.
    coord = s + p * b + ((i + 0.5) * b) / jnp.maximum(g, 1.0)
    used = (coord >= -1.0) & (coord <= n)
    if adaptive:
        used = used & (i < g)
    # Non-finite boxes give no samples (and must not produce out-of-range indices below).
    coord = jnp.where(jnp.isfinite(coord), coord, 0.0)
    c = jnp.maximum(coord, 0.0)
    # c >= 0 so floor == the kernel's int truncation; the clip only guards the int cast of huge
    # (already zero-weighted) coordinates.
    low = jnp.clip(jnp.floor(c), 0.0, n - 1.0)
    at_end = low >= n - 1.0
    high = jnp.where(at_end, low, low + 1.0)
    c = jnp.where(at_end, low, c)
    lo_w = c - low
    hi_w = 1.0 - lo_w
    weights = jnp.where(used[..., None], jnp.stack([hi_w, lo_w], axis=-1), 0.0)
    indices = jnp.stack([low, high], axis=-1).astype(jnp.int32)
    return indices, weights


def _gather_terms(rows, cols, y_w, x_w, a):
    """Corner row `a` of every y sample: `(R, oh, ow, B)` flat indices and weights."""
    idx = rows[:, :, a, None, None] + cols[:, None, :, :]
    w = y_w[:, :, a, None, None] * x_w[:, None, :, :]
    return idx, w


@jax.custom_vjp
def _separable_gather_sum(flat, rows, cols, y_w, x_w):
    """`out[r,p,q,:] = sum_{a,b} y_w[r,p,a] x_w[r,q,b] flat[rows[r,p,a] + cols[r,q,b], :]`.

    Args:
      flat: `(N, C)` float32/bf16; rows `(R, P, A)` / cols `(R, Q, B)` int32 (in bounds);
      y_w `(R, P, A)` / x_w `(R, Q, B)` float32.

    Returns:
      `(R, P, Q, C)` float32.

    Why this shape of loop: a gather whose result is immediately weighted and summed fuses
    into one XLA loop (no `(R, P, Q, A*B, C)` intermediate in memory, as gather-then-reduce
    would write and read back); a scan over `a` with the `b` terms unrolled keeps the program small
    for large adaptive grids. The custom VJP turns the gradient into one in-place
    scatter-add per term instead of JAX's per-term full-size scatters.
    """
    num_rois, pooled_h, num_a = rows.shape
    pooled_w, num_b = cols.shape[1:]
    channels = flat.shape[1]

    def body(acc, a):
        idx, w = _gather_terms(rows, cols, y_w, x_w, a)
        for b in range(num_b):
            pix = flat.at[idx[..., b]].get(mode="promise_in_bounds").astype(jnp.float32)
            acc = acc + pix * w[..., b, None]
        return acc, None

    init = jnp.zeros((num_rois, pooled_h, pooled_w, channels), jnp.float32)
    return jax.lax.scan(body, init, jnp.arange(num_a))[0]


def _separable_gather_sum_fwd(flat, rows, cols, y_w, x_w):
    return _separable_gather_sum(flat, rows, cols, y_w, x_w), (flat, rows, cols, y_w, x_w)


def _separable_gather_sum_bwd(res, g):
    flat, rows, cols, y_w, x_w = res
    num_b = cols.shape[2]

    def body(carry, a):
        d_flat, d_xw = carry
        idx, w = _gather_terms(rows, cols, y_w, x_w, a)
        d_yw_a = jnp.zeros(y_w.shape[:2], jnp.float32)
        for b in range(num_b):
            d_flat = d_flat.at[idx[..., b]].add(w[..., b, None] * g, mode="promise_in_bounds")
            # <pixel, g> feeds the weight cotangents (dead code unless boxes are differentiated).
            dot = jnp.sum(flat.at[idx[..., b]].get(mode="promise_in_bounds").astype(jnp.float32) * g, -1)
            d_yw_a = d_yw_a + jnp.sum(dot * x_w[:, None, :, b], axis=2)
            d_xw = d_xw.at[:, :, b].add(jnp.sum(dot * y_w[:, :, a, None], axis=1))
        return (d_flat, d_xw), d_yw_a

    init = (jnp.zeros(flat.shape, jnp.float32), jnp.zeros(x_w.shape, jnp.float32))
    (d_flat, d_xw), d_yw = jax.lax.scan(body, init, jnp.arange(rows.shape[2]))
    return d_flat.astype(flat.dtype), None, None, jnp.moveaxis(d_yw, 0, -1), d_xw


_separable_gather_sum.defvjp(_separable_gather_sum_fwd, _separable_gather_sum_bwd)


def roi_align_from_flat(
    flat_features: jnp.ndarray,
    boxes: jnp.ndarray,
    heights: jnp.ndarray,
    widths: jnp.ndarray,
    offsets: jnp.ndarray,
    spatial_scales: jnp.ndarray,
    output_size: Tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    max_sampling_grid: Optional[int] = None,
    row_strides: Optional[jnp.ndarray] = None,
) -> jnp.ndarray:
    """RoIAlign where each RoI reads its own map out of a flattened stack of maps.

    Args:
      flat_features: `(N, C)` float32/bf16: maps `(H_m, W_m, C)` flattened row-major and
        concatenated; map `m` starts at row `offsets` of the RoIs that use it.
      boxes: `(R, 4)` float32 `(x1, y1, x2, y2)` in image pixels.
      heights, widths, offsets: `(R,)` int32 height, width and first flat row of each RoI's map.
      spatial_scales: `(R,)` float32 image-to-map scale of each RoI's map.
      output_size: static `(oh, ow)`.
      sampling_ratio: static; `> 0` uses that many samples per bin and axis, `<= 0` the adaptive
        grid `ceil(roi_size / output_size)` per RoI, bounded by `max_sampling_grid`.
      aligned: static; half-pixel offset (torchvision `aligned=True`).
      max_sampling_grid: static bound of the adaptive grid (required when `sampling_ratio <= 0`).
        A RoI whose grid exceeds it is sampled on a `max_sampling_grid`-wide evenly spaced grid
        per bin instead (an average of fewer samples, so close to but not exactly torchvision).
      row_strides: optional `(R,)` int32 stored row length of each RoI's map, when `widths` is
        a smaller logical extent (a map padded beyond the region torchvision would have; the
        kernel's clamping and outside-the-map zeroing then use `heights`/`widths`).

    Returns:
      `(R, oh, ow, C)` pooled features, dtype of `flat_features` (accumulated in float32).
    """
    if row_strides is None:
        row_strides = widths
    oh, ow = output_size
    adaptive = sampling_ratio <= 0
    if adaptive and (max_sampling_grid is None or max_sampling_grid < 1):
        raise ValueError("sampling_ratio <= 0 needs a static max_sampling_grid >= 1")
    max_grid = int(max_sampling_grid) if adaptive else int(sampling_ratio)
    boxes = boxes.astype(jnp.float32)
    scale = spatial_scales.astype(jnp.float32)
    offset = 0.5 if aligned else 0.0
    scaled = boxes * scale[:, None]
    start_x = scaled[:, 0] - offset
    start_y = scaled[:, 1] - offset
    roi_w = (scaled[:, 2] - offset) - start_x
    roi_h = (scaled[:, 3] - offset) - start_y
    if not aligned:
        roi_w = jnp.maximum(roi_w, 1.0)
        roi_h = jnp.maximum(roi_h, 1.0)
    bin_h = roi_h / oh
    bin_w = roi_w / ow
    if adaptive:
        # ceil(roi / pooled) is <= 0 for inverted aligned RoIs: no samples, output 0 (count 1).
        grid_h = jnp.clip(_ceil_divide(roi_h, oh), 0.0, float(max_grid))
        grid_w = jnp.clip(_ceil_divide(roi_w, ow), 0.0, float(max_grid))
    else:
        grid_h = jnp.full_like(roi_h, float(max_grid))
        grid_w = jnp.full_like(roi_w, float(max_grid))
    count = jnp.maximum(grid_h * grid_w, 1.0)
    hf = heights.astype(jnp.float32)
    wf = widths.astype(jnp.float32)
    y_idx, y_w = _axis_samples(start_y, bin_h, grid_h, hf, oh, max_grid, adaptive)
    x_idx, x_w = _axis_samples(start_x, bin_w, grid_w, wf, ow, max_grid, adaptive)
    num_rois = boxes.shape[0]
    # (R, oh, gh*2) and (R, ow, gw*2): the two corners of every sample along each axis.
    rows = offsets.astype(jnp.int32)[:, None, None] + (
        y_idx.reshape(num_rois, oh, 2 * max_grid) * row_strides.astype(jnp.int32)[:, None, None])
    cols = x_idx.reshape(num_rois, ow, 2 * max_grid)
    y_w = y_w.reshape(num_rois, oh, 2 * max_grid) / count[:, None, None]
    x_w = x_w.reshape(num_rois, ow, 2 * max_grid)
    pooled = _separable_gather_sum(flat_features, rows, cols, y_w, x_w)
    return pooled.astype(flat_features.dtype)


def roi_align(
    features: jnp.ndarray,
    boxes: jnp.ndarray,
    output_size: Tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    max_sampling_grid: Optional[int] = None,
) -> jnp.ndarray:
    """RoIAlign of one feature map, torchvision `roi_align` (C++ kernel) semantics.

    Args:
      features: `(H, W, C)` float32 or bf16 feature map of one image (channel-last).
      boxes: `(R, 4)` float32 `(x1, y1, x2, y2)` in image pixels; any values (outside the map,
        zero-size, inverted) are handled as the C++ kernel does. Padded RoIs just give some
        output; mask them downstream.
      output_size: static `(oh, ow)`.
      spatial_scale: static image-to-map scale (e.g. 1/16).
      sampling_ratio: static; `> 0` fixed samples per bin and axis, `<= 0` adaptive grid
        `ceil(roi_size / output_size)` (then `max_sampling_grid` is required).
      aligned: static; torchvision's `aligned` (shift by -0.5 px, no `>= 1` size clamp).
      max_sampling_grid: static bound of the adaptive grid; see `roi_align_from_flat` for RoIs
        that need more.

    Returns:
      `(R, oh, ow, C)` pooled features, dtype of `features` (computed in float32).
      Differentiable w.r.t. `features`.
    """
    height, width, channels = features.shape
    num_rois = boxes.shape[0]
    full = lambda v, dtype: jnp.full((num_rois,), v, dtype)  # noqa: E731
    return roi_align_from_flat(
        features.reshape(height * width, channels),
        boxes,
        full(height, jnp.int32),
        full(width, jnp.int32),
        full(0, jnp.int32),
        full(spatial_scale, jnp.float32),
        tuple(output_size),
        sampling_ratio,
        aligned,
        max_sampling_grid,
    )


def map_boxes_to_levels(
    boxes: jnp.ndarray,
    k_min: int,
    k_max: int,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> jnp.ndarray:
    """FPN level index of each box, torchvision `LevelMapper` (ops/poolers.py) in float32.

    `floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)` clamped to
    `[k_min, k_max]`, minus `k_min`.

    Args:
      boxes: `(R, 4)` float32 `(x1, y1, x2, y2)` in image pixels.
      k_min, k_max: static finest / coarsest pyramid level (e.g. 2 and 5).

    Returns:
      `(R,)` int32 level index in `[0, k_max - k_min]`. Zero-area boxes map to 0 (as
      torchvision); inverted boxes (negative area, NaN in torchvision) also map to 0.
    """
    s = jnp.sqrt(box_area(boxes.astype(jnp.float32)))
    level = jnp.floor(
        jnp.float32(canonical_level) + jnp.log2(s / jnp.float32(canonical_scale)) + jnp.float32(eps)
    )
    level = jnp.clip(level, float(k_min), float(k_max))
    level = jnp.where(jnp.isnan(level), float(k_min), level)
    return level.astype(jnp.int32) - k_min


def infer_level_scales(
    feature_sizes: Sequence[Tuple[int, int]], image_size: Tuple[int, int]
) -> Tuple[float, ...]:
    """Map scales torchvision's `MultiScaleRoIAlign` infers (static Python, not traced).

    Args:
      feature_sizes: `(H_l, W_l)` of each level.
      image_size: `(H, W)` of the padded batch canvas (torchvision: the max over image sizes).

    Returns:
      `2 ** round(log2(H_l / H))` per level (torchvision uses the height ratio only).
    """
    return tuple(2.0 ** round(math.log2(h / image_size[0])) for h, _ in feature_sizes)


def multilevel_roi_align(
    features: Sequence[jnp.ndarray],
    boxes: jnp.ndarray,
    output_size: Tuple[int, int],
    scales: Sequence[float],
    sampling_ratio: int = 2,
    aligned: bool = False,
    max_sampling_grid: Optional[int] = None,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    valid_sizes: Optional[jnp.ndarray] = None,
) -> jnp.ndarray:
    """Pool each RoI from its FPN level, torchvision `MultiScaleRoIAlign` semantics.

    Args:
      features: per-level `(H_l, W_l, C)` maps of one image, finest first (FPN '0'..'3').
      boxes: `(R, 4)` float32 `(x1, y1, x2, y2)` in image pixels.
      output_size: static `(oh, ow)` (7x7 box head, 14x14 mask head).
      scales: static per-level scale (e.g. `(1/4, 1/8, 1/16, 1/32)`, see `infer_level_scales`);
        `k_min = -log2(scales[0])`, `k_max = -log2(scales[-1])` as torchvision.
      sampling_ratio, aligned, max_sampling_grid: as `roi_align`.
      canonical_scale, canonical_level: `LevelMapper` constants.
      valid_sizes: optional `(L, 2)` int32 (traced) `(h, w)` per level of the map torchvision
        would have for this image (its padded size / stride), when the arrays are larger (a fixed
        canvas): the kernel's edge clamping and outside-the-map zeroing then use these extents.

    Returns:
      `(R, oh, ow, C)` pooled features, dtype of the features. A single level pools every RoI
      from it (torchvision skips the level mapper then). Differentiable w.r.t. the features.
    """
    if len(features) != len(scales):
        raise ValueError("one scale per feature level is required")
    sizes = [f.shape[:2] for f in features]
    channels = features[0].shape[-1]
    if len(features) == 1:
        levels = jnp.zeros((boxes.shape[0],), jnp.int32)
    else:
        # int() truncation of -log2(scale) as torchvision's _setup_scales.
        k_min = int(-math.log2(scales[0]))
        k_max = int(-math.log2(scales[-1]))
        levels = map_boxes_to_levels(boxes, k_min, k_max, canonical_scale, canonical_level)
    starts = [0]
    for h, w in sizes[:-1]:
        starts.append(starts[-1] + h * w)
    flat = jnp.concatenate([f.reshape(-1, channels) for f in features], axis=0)
    stored = jnp.asarray(sizes, jnp.int32)
    logical = stored if valid_sizes is None else jnp.minimum(jnp.asarray(valid_sizes, jnp.int32), stored)
    offsets = jnp.asarray(starts, jnp.int32)[levels]
    level_scales = jnp.asarray(scales, jnp.float32)[levels]
    return roi_align_from_flat(
        flat, boxes, logical[levels, 0], logical[levels, 1], offsets, level_scales,
        tuple(output_size), sampling_ratio, aligned, max_sampling_grid,
        row_strides=stored[levels, 1],
    )
