"""Balanced positive/negative sampling with static shapes, from an explicit PRNG key.

Same counts as torchvision's `BalancedPositiveNegativeSampler` (models/detection/_utils.py);
the random choice differs (torch's `randperm` stream cannot be reproduced) but is likewise
uniform without replacement. Selection follows the TF TPU Mask R-CNN's `sampling_ops`: give
every candidate an iid uniform score and take the `top_k` scores among the candidates, which is
a uniformly random subset in uniformly random order.
"""

from typing import Tuple

import jax
import jax.numpy as jnp


def _random_members(key: jax.Array, is_member: jnp.ndarray, k: int) -> jnp.ndarray:
    """Indices of `k` members in uniformly random order (members first; non-members after).

    Args:
      key: PRNG key.
      is_member: `(N,)` bool.
      k: static number of indices to return, `<= N`.

    Returns:
      `(k,)` int32 indices; the first `min(k, #members)` are distinct random members.
    """
    scores = jax.random.uniform(key, is_member.shape, dtype=jnp.float32)
    # Members score in [0, 1), non-members -1: every member outranks every non-member.
    scores = jnp.where(is_member, scores, -1.0)
    _, indices = jax.lax.top_k(scores, k)
    return indices.astype(jnp.int32)


def sample_balanced(
    key: jax.Array,
    labels: jnp.ndarray,
    num_samples: int,
    positive_fraction: float,
) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Pick up to `num_samples` entries, at most `positive_fraction` of them positive.

    Counts as torchvision: `num_pos = min(#positive, int(num_samples * positive_fraction))`,
    `num_neg = min(#negative, num_samples - num_pos)`; both chosen uniformly at random without
    replacement.

    Args:
      key: PRNG key.
      labels: `(N,)` int labels: `>= 1` positive, `0` negative, `-1` ignored (padded entries
        must be -1).
      num_samples: static sample count S per image (torchvision's `batch_size_per_image`).
      positive_fraction: static fraction of S allowed to be positive.

    Returns:
      indices: `(S,)` int32 — the sampled positives first, then the sampled negatives, then
        padding index 0.
      is_positive: `(S,)` bool, True for the sampled positives.
      valid: `(S,)` bool, True for sampled entries (False for padding).
    """
    num_items = labels.shape[0]
    max_pos = int(num_samples * positive_fraction)
    positive = labels >= 1
    negative = labels == 0
    num_pos = jnp.minimum(jnp.sum(positive, dtype=jnp.int32), max_pos)
    num_neg = jnp.minimum(jnp.sum(negative, dtype=jnp.int32), num_samples - num_pos)

    key_pos, key_neg = jax.random.split(key)
    pos_idx = _random_members(key_pos, positive, min(max_pos, num_items))
    neg_idx = _random_members(key_neg, negative, min(num_samples, num_items))
    # Pad both candidate lists to S so slots can gather from them with static shapes.
    pos_idx = jnp.pad(pos_idx, (0, num_samples - pos_idx.shape[0]))
    neg_idx = jnp.pad(neg_idx, (0, num_samples - neg_idx.shape[0]))

    slot = jnp.arange(num_samples, dtype=jnp.int32)
    is_positive = slot < num_pos
    valid = slot < num_pos + num_neg
    neg_slot = jnp.clip(slot - num_pos, 0, num_samples - 1)
    indices = jnp.where(is_positive, pos_idx, neg_idx[neg_slot])
    indices = jnp.where(valid, indices, 0).astype(jnp.int32)
    return indices, is_positive, valid


def sampled_mask(indices: jnp.ndarray, valid: jnp.ndarray, num_items: int) -> jnp.ndarray:
    """Boolean membership mask of the sampled entries (torchvision's per-image binary mask).

    Args:
      indices: `(S,)` int indices from `sample_balanced`.
      valid: `(S,)` bool, False for padding slots (their index is ignored).
      num_items: static N.

    Returns:
      `(N,)` bool, True at every valid sampled index.
    """
    # Scatter-add (not set): padding slots point at index 0 and must not erase a real sample.
    counts = jnp.zeros((num_items,), jnp.int32).at[indices].add(valid.astype(jnp.int32))
    return counts > 0
