"""maskrcnn_jax.ops.sampler against torchvision's BalancedPositiveNegativeSampler.

torch's randperm stream cannot be reproduced, so the per-draw comparison is on counts; the
selection itself is checked for validity (right classes, no duplicates, padding layout) and for
uniformity with a chi-square test over many keys.
"""

import jax
import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from maskrcnn_jax.ops.sampler import sample_balanced, sampled_mask

NUM_SAMPLES = 64
POSITIVE_FRACTION = 0.25
N = 200


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(7)


@pytest.fixture(scope="module")
def sample_batch():
    """Jitted, vmapped sampler over a batch of label vectors, one key each (compiled once)."""
    fn = jax.vmap(lambda k, l: sample_balanced(k, l, NUM_SAMPLES, POSITIVE_FRACTION))
    return jax.jit(fn)


def make_labels(rng, n, num_pos, num_neg):
    """Labels with `num_pos` positives (class ids >= 1), `num_neg` zeros, the rest -1."""
    labels = np.full(n, -1, np.int32)
    order = rng.permutation(n)
    labels[order[:num_pos]] = rng.integers(1, 91, num_pos)
    labels[order[num_pos : num_pos + num_neg]] = 0
    return labels


def label_cases(rng, n):
    cases = [
        (3, 150),  # few positives: all taken, negatives fill up
        (0, 120),  # no positives
        (40, 0),  # no negatives: only the positive quota is filled
        (0, 0),  # all ignored
        (n, 0),  # all positive
        (0, n),  # all negative
        (16, 48),  # exactly the quotas
        (10, 20),  # fewer than num_samples in total
    ]
    for _ in range(24):
        num_pos = int(rng.integers(0, n // 2 + 1))
        cases.append((num_pos, int(rng.integers(0, n - num_pos + 1))))
    # the fixed cases are written for n = 200; clamp them for smaller n
    return [make_labels(rng, n, min(p, n), min(q, n - min(p, n))) for p, q in cases]


def torchvision_counts(labels, num_samples, fraction):
    pos, neg = BalancedPositiveNegativeSampler(num_samples, fraction)([torch.from_numpy(labels)])
    return int(pos[0].sum()), int(neg[0].sum())


def check_sample(labels, indices, is_positive, valid, num_samples):
    """Validity of one sample: classes, duplicates, layout of positives/negatives/padding."""
    indices, is_positive, valid = map(np.asarray, (indices, is_positive, valid))
    assert indices.shape == is_positive.shape == valid.shape == (num_samples,)
    assert indices.dtype == np.int32 and is_positive.dtype == bool and valid.dtype == bool
    num_pos, num_valid = int(is_positive.sum()), int(valid.sum())
    # positives first, then negatives, then padding with index 0
    np.testing.assert_array_equal(is_positive, np.arange(num_samples) < num_pos)
    np.testing.assert_array_equal(valid, np.arange(num_samples) < num_valid)
    np.testing.assert_array_equal(indices[~valid], 0)
    assert np.all(labels[indices[is_positive]] >= 1)
    assert np.all(labels[indices[valid & ~is_positive]] == 0)
    assert len(np.unique(indices[valid])) == num_valid
    return num_pos, num_valid - num_pos


def test_counts_match_torchvision(rng, sample_batch):
    labels = np.stack(label_cases(rng, N))
    keys = jax.random.split(jax.random.PRNGKey(0), len(labels))
    indices, is_positive, valid = sample_batch(keys, labels)
    masks = np.asarray(jax.jit(jax.vmap(lambda i, v: sampled_mask(i, v, N)))(indices, valid))
    indices, is_positive, valid = map(np.asarray, (indices, is_positive, valid))
    for i in range(len(labels)):
        counts = check_sample(labels[i], indices[i], is_positive[i], valid[i], NUM_SAMPLES)
        assert counts == torchvision_counts(labels[i], NUM_SAMPLES, POSITIVE_FRACTION)
        # the mask helper marks exactly the sampled entries (padding slots at index 0 do not)
        expected = np.zeros(N, bool)
        expected[indices[i][valid[i]]] = True
        np.testing.assert_array_equal(masks[i], expected)


@pytest.mark.parametrize("n, num_samples, fraction", [(10, 64, 0.25), (5, 512, 0.25), (300, 256, 0.5), (1, 4, 1.0)])
def test_small_n_and_other_settings(rng, n, num_samples, fraction):
    fn = jax.jit(lambda k, l: sample_balanced(k, l, num_samples, fraction))
    for case, labels in enumerate(label_cases(rng, n)[:10]):
        out = fn(jax.random.PRNGKey(case), labels)
        counts = check_sample(labels, *out, num_samples)
        assert counts == torchvision_counts(labels, num_samples, fraction)


def test_different_keys_give_different_samples(rng):
    labels = make_labels(rng, N, 60, 120)
    fn = jax.jit(lambda k: sample_balanced(k, labels, NUM_SAMPLES, POSITIVE_FRACTION)[0])
    a, b = np.asarray(fn(jax.random.PRNGKey(1))), np.asarray(fn(jax.random.PRNGKey(2)))
    assert set(a[:16]) != set(b[:16]) and set(a[16:]) != set(b[16:])
    np.testing.assert_array_equal(a, np.asarray(fn(jax.random.PRNGKey(1))))  # same key, same sample


def test_selection_is_uniform(rng, sample_batch):
    # 40 positives compete for 16 slots, 100 negatives for 48: each candidate's inclusion
    # probability must be quota / #candidates.
    labels = make_labels(rng, N, 40, 100)
    draws = 3000
    keys = jax.random.split(jax.random.PRNGKey(42), draws)
    indices, is_positive, valid = sample_batch(keys, np.broadcast_to(labels, (draws, N)))
    indices, is_positive, valid = map(np.asarray, (indices, is_positive, valid))
    pos_counts = np.bincount(indices[is_positive], minlength=N)
    neg_counts = np.bincount(indices[valid & ~is_positive], minlength=N)
    # chi-square critical values at p = 1e-4 (df = 39 and 99); seeded, so deterministic
    for counts, members, quota, critical in ((pos_counts, labels >= 1, 16, 80.6), (neg_counts, labels == 0, 48, 160.1)):
        observed = counts[members]
        expected = draws * quota / members.sum()
        assert np.all(counts[~members] == 0)
        chi2 = np.sum((observed - expected) ** 2 / expected)
        assert chi2 < critical, chi2
    # order within the positives is random too: the first slot is not biased to low indices
    first = indices[:, 0]
    assert abs(np.mean(np.searchsorted(np.nonzero(labels >= 1)[0], first)) - 19.5) < 1.5
