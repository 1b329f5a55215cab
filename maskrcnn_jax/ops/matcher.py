"""Ground-truth to prediction matching with torchvision's `Matcher` semantics, over padded gt.

Reproduces models/detection/_utils.py `Matcher.__call__` and `set_low_quality_matches_`
exactly, quirks included, with static shapes: ground truth is padded to a fixed count and
marked by a validity mask.
"""

import jax.numpy as jnp

# Same codes as torchvision's Matcher.
BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def match(
    quality: jnp.ndarray,
    gt_valid: jnp.ndarray,
    high_threshold: float,
    low_threshold: float,
    allow_low_quality_matches: bool,
) -> jnp.ndarray:
    """Assign each prediction the index of its best ground truth, or a negative code.

    Same rules as torchvision's `Matcher`:
      * best gt per prediction = argmax over gt (ties -> lowest gt index, as torch CPU `max`);
      * best quality `< low_threshold` -> `BELOW_LOW_THRESHOLD` (-1);
      * `low_threshold <= best < high_threshold` -> `BETWEEN_THRESHOLDS` (-2);
      * with `allow_low_quality_matches`, every prediction whose quality with some gt equals
        that gt's highest quality (ties included, even when that highest is 0) gets its argmax
        gt back, whatever its own best quality was.
    Padded gt rows never win an argmax and never contribute a low-quality maximum. With no valid
    gt at all every prediction is `BELOW_LOW_THRESHOLD` (torchvision's callers treat such images
    as all background).

    Args:
      quality: `(G, N)` float match quality (IoU of gt x predictions); padded rows may hold
        anything (box_iou gives -1).
      gt_valid: `(G,)` bool, False marks padded gt rows.
      high_threshold: quality `>=` this is a match (Python float).
      low_threshold: quality below this is background (Python float), `<= high_threshold`.
      allow_low_quality_matches: static bool, enables `set_low_quality_matches_`.

    Returns:
      `(N,)` int32 matched gt index in `[0, G)`, or -1 / -2.
    """
    if low_threshold > high_threshold:
        raise ValueError("low_threshold should be <= high_threshold")
    num_gt, num_pred = quality.shape
    if num_gt == 0 or num_pred == 0:
        return jnp.full((num_pred,), BELOW_LOW_THRESHOLD, dtype=jnp.int32)

    gt_valid = gt_valid.astype(bool)
    # -inf loses every argmax against real qualities (>= 0 for IoU), so padding never matches.
    masked = jnp.where(gt_valid[:, None], quality, -jnp.inf)

    # jnp.argmax returns the first maximal index (and the first NaN, like torch's max).
    matches = jnp.argmax(masked, axis=0).astype(jnp.int32)
    matched_vals = jnp.max(masked, axis=0)
    all_matches = matches

    below_low_threshold = matched_vals < low_threshold
    between_thresholds = (matched_vals >= low_threshold) & (matched_vals < high_threshold)
    matches = jnp.where(below_low_threshold, BELOW_LOW_THRESHOLD, matches)
    matches = jnp.where(between_thresholds, BETWEEN_THRESHOLDS, matches)

    if allow_low_quality_matches:
        # Highest quality of each gt over all predictions; a prediction is re-enabled when it
        # attains that maximum for at least one valid gt (torch.where(q == max[:, None])[1]).
        highest_quality_foreach_gt = jnp.max(masked, axis=1)
        attains_max = (masked == highest_quality_foreach_gt[:, None]) & gt_valid[:, None]
        pred_to_update = jnp.any(attains_max, axis=0)
        matches = jnp.where(pred_to_update, all_matches, matches)

    any_valid_gt = jnp.any(gt_valid)
    return jnp.where(any_valid_gt, matches, BELOW_LOW_THRESHOLD).astype(jnp.int32)
