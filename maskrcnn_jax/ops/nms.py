"""Exact greedy non-maximum suppression under `jax.jit`, with fixed-size padded outputs.

Same kept set and order as `torchvision.ops.nms` / `batched_nms` (CPU kernel arithmetic):
boxes are visited in a *stable* descending sort of the scores (ties in index order); box `j` is
suppressed by an earlier kept box `i` when

    inter / (area_i + area_j - inter) > iou_threshold        (float32, threshold cast to float32)

with `area = (x2 - x1) * (y2 - y1)` and `inter = max(0, min(x2) - max(x1)) * max(0, min(y2) -
max(y1))`. Two empty boxes give 0/0 = NaN, which never suppresses (as torchvision).

Algorithm (after the TPU Mask R-CNN's `sorted_non_max_suppression_padded`, made exact and
cheaper on CPU): sort once, then walk the sorted boxes in tiles of `tile_size` with a `lax`
loop. Each tile is
  1. suppressed by the boxes kept so far. Those are compacted into a buffer, so this costs
     `ceil(kept / block_size)` block x tile IoU blocks instead of one per earlier tile;
  2. suppressed within itself: a sequential greedy pass over the tile's rows of a precomputed
     tile x tile "i suppresses j" matrix (row i only acts if box i is still alive when reached,
     which is exactly greedy order).
The walk stops as soon as `max_output` boxes are kept. Only one block x tile (or tile x tile)
IoU matrix is materialised at a time, so N = 5,000 boxes costs no N x N memory.

In-tile pass, by backend (`self_suppression`; the results are identical):
  - "sequential" (the CPU default, tiles of 64): a `lax` loop step per candidate row. A CPU loop
    step costs microseconds, and the fixed point below needs up to `tile` rounds of tile x tile
    work on chains of overlapping boxes: on CPU the sequential pass was faster.
  - "fixed_point" (the default on GPU and TPU, tiles of 512: the TPU code's iteration): boxes
    with no live overlapping predecessor are kept; what they overlap is dropped; repeat until
    nothing changes. Exact greedy NMS: at the fixed point every live box has no live
    overlapping predecessor (else the earliest live box that has one would be dropped by that
    predecessor, which has none), and every drop is caused by a box already proven kept. Each
    round is two tile x tile reductions; the rounds are as many as the longest suppression
    chain, not one per box: on a GPU each loop step is a kernel launch (BENCHMARKS.md, "One
    GPU").

Padding: invalid boxes are sorted after all valid ones and are never kept, so they never
suppress. Output indices are padded with -1 beyond `count`.
"""

from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from maskrcnn_jax.ops.boxes import box_area

# CPU: candidates per tile and kept boxes per cross-suppression block (the timings behind these
# values: BENCHMARKS.md, "NMS tile sizes"). Small tiles keep the sequential in-tile pass short;
# larger kept blocks mean fewer loop iterations (XLA CPU while-loop steps cost microseconds) but
# more padding in the last block.
DEFAULT_TILE_SIZE = 64
DEFAULT_BLOCK_SIZE = 256
# GPU / TPU: few, wide steps (the TPU Mask R-CNN's NMS_TILE_SIZE), every loop step being a
# device round trip.
ACCELERATOR_TILE_SIZE = 512
ACCELERATOR_BLOCK_SIZE = 512
SELF_SUPPRESSION = ("sequential", "fixed_point")

Threshold = Union[float, jnp.ndarray]


def default_settings(backend: Optional[str] = None) -> Tuple[str, int, int]:
    """`(self_suppression, tile_size, block_size)` for a backend (default JAX's default
    backend, read when the NMS is traced): the sequential in-tile pass with small tiles on the
    CPU, the fixed-point pass with wide tiles elsewhere (GPU, TPU)."""
    if (backend or jax.default_backend()) == "cpu":
        return "sequential", DEFAULT_TILE_SIZE, DEFAULT_BLOCK_SIZE
    return "fixed_point", ACCELERATOR_TILE_SIZE, ACCELERATOR_BLOCK_SIZE


def nms_padded(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    valid: jnp.ndarray,
    iou_threshold: Threshold,
    max_output: int,
    tile_size: Optional[int] = None,
    block_size: Optional[int] = None,
    self_suppression: Optional[str] = None,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Greedy NMS of one image's padded boxes; same result as `torchvision.ops.nms` on the valid ones.

    Args:
      boxes: `(N, 4)` float32 boxes `(x1, y1, x2, y2)` in absolute pixels; N may be 0.
      scores: `(N,)` float scores (higher is visited first; ties in index order).
      valid: `(N,)` bool; False marks padding: never kept, never suppresses.
      iou_threshold: Python float or traced float scalar; a box is suppressed when its IoU with
        an earlier kept box is `> iou_threshold` (compared in float32).
      max_output: static int >= 0, the output length.
      tile_size: static int, candidates per tile (performance only; results do not depend on
        it); default by backend (`default_settings`).
      block_size: static int, kept boxes per cross-suppression block (performance only);
        default by backend.
      self_suppression: static, "sequential" or "fixed_point", the in-tile pass (performance
        only); default by backend.

    Returns:
      indices: `(max_output,)` int32 indices into `boxes` of the kept boxes in decreasing score
        order (torchvision's order, truncated to `max_output`), -1 beyond `count`.
      count: `()` int32, number of valid entries in `indices` (= min(kept, max_output)).
    """
    return _nms_core(boxes, scores, None, valid, iou_threshold, max_output, tile_size, block_size,
                     self_suppression)


def batched_nms_padded(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    group_ids: jnp.ndarray,
    valid: jnp.ndarray,
    iou_threshold: Threshold,
    max_output: int,
    tile_size: Optional[int] = None,
    block_size: Optional[int] = None,
    self_suppression: Optional[str] = None,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """NMS independently per group (class or FPN level), as `torchvision.ops.batched_nms`.

    Boxes of different groups never suppress each other: their IoU is simply ignored, so unlike
    torchvision's coordinate-offset trick there is no float rounding from shifted coordinates.
    The output merges all groups in decreasing score order (ties in index order).

    Args:
      boxes: `(N, 4)` float32 boxes `(x1, y1, x2, y2)`; N may be 0.
      scores: `(N,)` float scores.
      group_ids: `(N,)` int group of each box (any integer values).
      valid: `(N,)` bool; False marks padding: never kept, never suppresses.
      iou_threshold: Python float or traced float scalar (suppress when IoU `> iou_threshold`).
      max_output: static int >= 0, the output length.
      tile_size, block_size, self_suppression: static, performance only (`nms_padded`).

    Returns:
      indices: `(max_output,)` int32 kept indices into `boxes` by decreasing score, -1 padded.
      count: `()` int32 number of valid entries in `indices`.
    """
    return _nms_core(boxes, scores, group_ids, valid, iou_threshold, max_output, tile_size,
                     block_size, self_suppression)


def _suppression_matrix(
    rows: jnp.ndarray,
    row_area: jnp.ndarray,
    cols: jnp.ndarray,
    col_area: jnp.ndarray,
    threshold: jnp.ndarray,
) -> jnp.ndarray:
    """`(R, C)` bool: IoU(row box, col box) > threshold, with the C++ kernel's arithmetic.

    `rows`/`cols` are coordinate planes `(4, R)` / `(4, C)` (x1, y1, x2, y2) so that each
    coordinate is a contiguous vector.
    """
    w = jnp.maximum(jnp.minimum(rows[2][:, None], cols[2][None, :])
                    - jnp.maximum(rows[0][:, None], cols[0][None, :]), 0)
    h = jnp.maximum(jnp.minimum(rows[3][:, None], cols[3][None, :])
                    - jnp.maximum(rows[1][:, None], cols[1][None, :]), 0)
    inter = w * h
    iou = inter / (row_area[:, None] + col_area[None, :] - inter)
    return iou > threshold


def _nms_core(boxes, scores, group_ids, valid, iou_threshold, max_output, tile_size, block_size,
              self_suppression):
    """Shared body of `nms_padded` / `batched_nms_padded` (group_ids None: one group)."""
    default_pass, default_tile, default_block = default_settings()
    self_suppression = self_suppression or default_pass
    if self_suppression not in SELF_SUPPRESSION:
        raise ValueError(f"self_suppression must be one of {SELF_SUPPRESSION}, got "
                         f"{self_suppression!r}")
    tile_size = tile_size or default_tile
    block_size = block_size or default_block
    n = boxes.shape[0]
    max_output = int(max_output)
    if n == 0 or max_output == 0:
        return jnp.full((max_output,), -1, jnp.int32), jnp.zeros((), jnp.int32)
    boxes = jnp.asarray(boxes, jnp.float32)
    scores = jnp.asarray(scores, jnp.float32)
    valid = jnp.asarray(valid, bool)
    # Cast once so the comparison is float32 vs float32, as torch compares a float32 tensor with
    # a Python float (the CPU C++ kernel compares in double: differs only when an IoU equals
    # float32(threshold) exactly and that rounds above the threshold).
    threshold = jnp.asarray(iou_threshold, jnp.float32)
    grouped = group_ids is not None

    # A tile never needs to be larger than the (8-aligned) input.
    tile = int(min(tile_size, -(-n // 8) * 8))
    num_tiles = -(-n // tile)
    n_pad = num_tiles * tile

    # Stable sort: valid before invalid, then descending score, then index (ties as torch).
    order = lax.sort(
        (jnp.logical_not(valid).astype(jnp.int32), -scores,
         jnp.arange(n, dtype=jnp.int32)),
        num_keys=2, is_stable=True)[2]
    pad = n_pad - n
    order = jnp.pad(order, (0, pad))  # padding slots point at box 0 but are marked invalid
    sorted_valid = jnp.pad(valid[order[:n]], (0, pad))
    planes = boxes[order].T  # (4, n_pad)
    areas = box_area(boxes)[order]
    groups = jnp.asarray(group_ids, jnp.int32)[order] if grouped else None

    # Compacted buffer of kept boxes, sized to whole blocks so it can be read block-wise. The walk
    # stops once max_output boxes are kept, so entries past that are never needed (dropped).
    capacity = min(max_output, n)  # at most this many boxes are ever kept
    block = int(min(block_size, -(-capacity // 8) * 8))
    buf_len = -(-capacity // block) * block
    kept_planes = jnp.zeros((4, buf_len), jnp.float32)
    kept_areas = jnp.zeros((buf_len,), jnp.float32)
    kept_groups = jnp.zeros((buf_len,), jnp.int32)
    kept_index = jnp.full((buf_len,), -1, jnp.int32)
    upper = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]  # row i precedes col j

    def tile_body(state):
        t, count, kept_planes, kept_areas, kept_groups, kept_index = state
        start = t * tile
        cand_planes = lax.dynamic_slice_in_dim(planes, start, tile, axis=1)
        cand_areas = lax.dynamic_slice_in_dim(areas, start, tile)
        alive = lax.dynamic_slice_in_dim(sorted_valid, start, tile)
        cand_groups = lax.dynamic_slice_in_dim(groups, start, tile) if grouped else None

        # 1. Suppression by the boxes kept in earlier tiles, one buffer block at a time.
        def cross_body(b, alive):
            off = b * block
            blk_planes = lax.dynamic_slice_in_dim(kept_planes, off, block, axis=1)
            blk_areas = lax.dynamic_slice_in_dim(kept_areas, off, block)
            sup = _suppression_matrix(blk_planes, blk_areas, cand_planes, cand_areas, threshold)
            sup &= (off + jnp.arange(block) < count)[:, None]  # only filled buffer slots
            if grouped:
                blk_groups = lax.dynamic_slice_in_dim(kept_groups, off, block)
                sup &= blk_groups[:, None] == cand_groups[None, :]
            return alive & ~jnp.any(sup, axis=0)

        num_blocks = (count + block - 1) // block
        alive = lax.fori_loop(0, num_blocks, cross_body, alive)

        # 2. Greedy within the tile: row i suppresses later columns only if i is still alive
        # when visited, which the sequential pass guarantees (rows are in score order).
        sup = _suppression_matrix(cand_planes, cand_areas, cand_planes, cand_areas, threshold)
        sup &= upper
        if grouped:
            sup &= cand_groups[:, None] == cand_groups[None, :]

        alive = (_sequential_pass if self_suppression == "sequential" else _fixed_point_pass)(
            sup, alive)

        # Append this tile's kept boxes to the buffer (positions past its end are dropped).
        pos = jnp.where(alive, count + jnp.cumsum(alive) - 1, buf_len)
        kept_planes = kept_planes.at[:, pos].set(cand_planes, mode="drop")
        kept_areas = kept_areas.at[pos].set(cand_areas, mode="drop")
        if grouped:
            kept_groups = kept_groups.at[pos].set(cand_groups, mode="drop")
        cand_index = lax.dynamic_slice_in_dim(order, start, tile)
        kept_index = kept_index.at[pos].set(cand_index, mode="drop")
        count = count + jnp.sum(alive, dtype=jnp.int32)
        return t + 1, count, kept_planes, kept_areas, kept_groups, kept_index

    def tile_cond(state):
        t, count = state[0], state[1]
        return (t < num_tiles) & (count < max_output)

    init = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
            kept_planes, kept_areas, kept_groups, kept_index)
    _, count, _, _, _, kept_index = lax.while_loop(tile_cond, tile_body, init)
    count = jnp.minimum(count, max_output)
    indices = jnp.pad(kept_index[:capacity], (0, max_output - capacity), constant_values=-1)
    return indices, count


def _sequential_pass(sup: jnp.ndarray, alive: jnp.ndarray) -> jnp.ndarray:
    """Greedy NMS inside a tile, one row at a time: `sup (T, T)` "row i suppresses later column
    j", `alive (T,)` the candidates left after the earlier tiles -> those kept."""
    def self_body(i, alive):
        return alive & ~(alive[i] & sup[i])

    # Rows past the last alive candidate cannot change anything.
    last = sup.shape[0] - jnp.argmax(alive[::-1])
    return lax.fori_loop(0, jnp.where(jnp.any(alive), last, 0), self_body, alive)


def _fixed_point_pass(sup: jnp.ndarray, alive: jnp.ndarray) -> jnp.ndarray:
    """`_sequential_pass` by the fixed-point iteration (module docstring): keep the live boxes
    no live predecessor overlaps, drop what they overlap, until nothing changes."""
    def body(state):
        alive, _ = state
        kept = alive & ~jnp.any(sup & alive[:, None], axis=0)
        new = alive & ~jnp.any(sup & kept[:, None], axis=0)
        return new, jnp.any(new != alive)

    return lax.while_loop(lambda state: state[1], body, (alive, jnp.any(alive)))[0]
