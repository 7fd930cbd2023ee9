"""Reward accuracy counts only the records that have a label-ordered pair."""

import jax.numpy as jnp
import numpy as np
import pytest

from lm_align.align.objectives import means_of_sums, pair_metrics, weighted_means, weighted_sums

# Three lists of K = 3, scores s and labels:
# 0: labels (1, 0, 0), s = (2, 1, 3): pairs (0 > 1) right, (0 > 2) wrong -> accuracy 1/2,
#    margin ((2 - 1) + (2 - 3)) / 2 = 0.
# 1: labels all 1: no label-ordered pair -> no accuracy at all (not 0).
# 2: labels (2, 1, 0), the third response padding, s = (1, 0, 9): the one pair
#    (0 > 1) is right -> accuracy 1, margin 1.
SCORES = jnp.array([[2.0, 1.0, 3.0], [5.0, 0.0, 1.0], [1.0, 0.0, 9.0]])
LABELS = jnp.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 1.0, 0.0]])
MASK = jnp.array([[True, True, True], [True, True, True], [True, True, False]])


def test_pair_metrics_by_hand():
    m = pair_metrics(SCORES, LABELS, MASK)
    np.testing.assert_allclose(np.asarray(m["reward_accuracy"])[[0, 2]], [0.5, 1.0])
    np.testing.assert_allclose(np.asarray(m["reward_margin"])[[0, 2]], [0.0, 1.0])
    np.testing.assert_array_equal(m["reward_pairs"], [1.0, 0.0, 1.0])


def test_records_without_an_ordered_pair_are_left_out_of_the_means():
    m = pair_metrics(SCORES, LABELS, MASK)
    loss = jnp.array([1.0, 2.0, 3.0])
    means = weighted_means(loss, m, jnp.ones(3))
    # Over records 0 and 2 only: (1/2 + 1) / 2 = 3/4 (counted as 0 it would be 1/2).
    assert float(means["reward_accuracy"]) == pytest.approx(0.75)
    assert float(means["reward_margin"]) == pytest.approx(0.5)
    assert float(means["reward_pairs"]) == pytest.approx(2 / 3)
    assert float(means["loss"]) == pytest.approx(2.0)  # the loss keeps every record
    # A zero batch weight (padding row) removes a record from both counts.
    padded = weighted_means(loss, m, jnp.array([1.0, 1.0, 0.0]))
    assert float(padded["reward_accuracy"]) == pytest.approx(0.5)
    assert float(padded["loss"]) == pytest.approx(1.5)


def test_sums_over_batches_give_the_same_means():
    # Batch A holds records 0 and 1, batch B record 2; B alone has no record without
    # pairs, A half of them: per-batch means averaged by batch size would give
    # (2 * 0.5 + 1 * 1) / 3 = 2/3, not 3/4.
    m = pair_metrics(SCORES, LABELS, MASK)
    loss = jnp.array([1.0, 2.0, 3.0])

    def sums(idx):
        return weighted_sums(loss[idx], {k: v[idx] for k, v in m.items()}, jnp.ones(len(idx)))

    a, b = sums(np.array([0, 1])), sums(np.array([2]))
    total = means_of_sums({k: a[k] + b[k] for k in a})
    assert float(total["reward_accuracy"]) == pytest.approx(0.75)
    assert float(total["loss"]) == pytest.approx(2.0)
    # A batch whose only records have no pair reports 0 over 0 records, not a count of 0s.
    only_ties = sums(np.array([1]))
    assert float(only_ties["reward_accuracy/count"]) == 0.0
