"""One-to-one matching of detections between two detectors (NumPy only), for parity checks."""

import numpy as np


def match_rows(ours, theirs, tol):
    """One-to-one matching of rows (greedy, nearest first) with max-abs distance <= tol.

    Args:
      ours: (N, F) float array.
      theirs: (M, F) float array.
      tol: largest max-abs difference of a matched pair.

    Returns:
      (M,) int array: the index into `ours` matched to each row of `theirs`, -1 where none is
      left within `tol`.
    """
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    match = np.full(len(theirs), -1)
    if len(ours) == 0 or len(theirs) == 0:
        return match
    dist = np.abs(ours[:, None, :] - theirs[None, :, :]).max(-1)
    used = np.zeros(len(ours), bool)
    for flat in np.argsort(dist, axis=None, kind="stable"):
        i, j = np.unravel_index(flat, dist.shape)
        if dist[i, j] > tol:
            break
        if not used[i] and match[j] < 0:
            used[i], match[j] = True, i
    return match


def compare_detections(ours, theirs, box_tol=1e3):
    """How two detectors' outputs on one image differ, pairing detections of the same label.

    Args:
      ours, theirs: dicts of NumPy arrays `boxes (N, 4)` float, `scores (N,)`, `labels (N,)`
        int and optionally `masks (N, 1, H, W)` float (torchvision's output format).
      box_tol: largest max-abs box coordinate difference (pixels) of a matched pair; the default
        pairs every same-label detection nearest first (labels are kept apart by 1e4 px).

    Returns:
      dict of floats/ints: `count_ours`, `count_theirs`, `unmatched` (rows of `theirs` without a
      partner), and over the matched pairs `max_box_diff` (px), `max_score_diff`,
      `max_mask_mae` (per-detection mean absolute mask difference; 0.0 without masks), plus
      `match` ((M,) int, see `match_rows`).
    """
    keyed = lambda d: np.concatenate(  # noqa: E731
        [np.asarray(d["boxes"], np.float64), 1e4 * np.asarray(d["labels"], np.float64)[:, None]], 1)
    match = match_rows(keyed(ours), keyed(theirs), box_tol)
    pairs = match >= 0
    mine = match[pairs]

    def max_diff(a, b):
        return float(np.abs(a - b).max()) if a.size else 0.0

    out = dict(
        count_ours=len(ours["boxes"]), count_theirs=len(theirs["boxes"]),
        unmatched=int((~pairs).sum()), match=match,
        max_box_diff=max_diff(np.asarray(ours["boxes"])[mine], np.asarray(theirs["boxes"])[pairs]),
        max_score_diff=max_diff(np.asarray(ours["scores"])[mine],
                                np.asarray(theirs["scores"])[pairs]),
        max_mask_mae=0.0,
    )
    if "masks" in ours and "masks" in theirs and pairs.any():
        mae = np.abs(np.asarray(ours["masks"])[mine] - np.asarray(theirs["masks"])[pairs])
        out["max_mask_mae"] = float(mae.mean(axis=tuple(range(1, mae.ndim))).max())
    return out
