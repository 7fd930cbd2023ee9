"""pass@k, BoN@N, calibration error and the BoN-aware RL weight, against closed forms."""

import math
from fractions import Fraction

import numpy as np
import pytest

from lm_align.align.evaluation import (
    best_of_n_accuracy,
    bon_weight,
    calibration_bins,
    expected_calibration_error,
    pass_at_k,
    pass_at_k_array,
)


def _pass_at_k_comb(n, c, k):
    """Chen et al. 2021, eq. 1, with exact integers."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 0.4),  # 1 - C(3,1)/C(5,1) = 1 - 3/5
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 0, 3, 0.0),  # no correct sample
        (10, 10, 1, 1.0),  # all correct
        (4, 1, 4, 1.0),  # n - c = 3 < k: every 4-subset holds the correct one
    ],
)
def test_pass_at_k_worked_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15)


def test_pass_at_k_equals_the_binomial_form_for_all_small_cases():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_pass_at_k_comb(n, c, k)))


def test_pass_at_k_is_stable_for_large_n():
    value = pass_at_k(1000, 5, 100)
    assert math.isfinite(value)
    assert value == pytest.approx(float(_pass_at_k_comb(1000, 5, 100)), rel=1e-12)


def test_pass_at_k_array_matches_the_binomial_form_and_averages():
    c_P = np.arange(21)
    expected = [float(_pass_at_k_comb(20, int(c), 5)) for c in c_P]
    np.testing.assert_allclose(pass_at_k_array(20, c_P, 5), expected, rtol=1e-12, atol=1e-15)
    assert pass_at_k_array(20, c_P, 5, mean=True) == pytest.approx(np.mean(expected))
    assert pass_at_k_array(20, [17, 20], 5).tolist() == [1.0, 1.0]  # n - c < k


@pytest.mark.parametrize(
    "n, c, k, match",
    [(5, 6, 1, "c must be in"), (5, -1, 1, "c must be in"), (5, 2, 0, "k must be in"),
     (5, 2, 6, "k must be in"), (0, 0, 1, "n must be"), (5, 2.5, 1, "c must be an integer")],
)  # fmt: skip
def test_pass_at_k_validates(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_best_of_n_picks_the_highest_score_first_index_on_ties():
    correct_PN = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=bool)
    scores_PN = np.array([[0.1, 0.9, 0.5], [0.3, 0.3, 0.8], [0.5, 0.5, 0.2]])
    # n=3 picks samples 1, 2, 0 (tie -> first): correct, wrong, wrong.
    assert best_of_n_accuracy(correct_PN, scores_PN, n=3) == pytest.approx(1 / 3)
    # n=2 picks 1, 0 (tie), 0 (tie): correct, correct, wrong.
    assert best_of_n_accuracy(correct_PN, scores_PN, n=2) == pytest.approx(2 / 3)
    # n=1 is the accuracy of the first sample.
    assert best_of_n_accuracy(correct_PN, scores_PN, n=1) == pytest.approx(1 / 3)
    # An oracle verifier (score = correctness) gives the any-correct rate, pass@n.
    assert best_of_n_accuracy(correct_PN, correct_PN.astype(float), n=3) == 1.0


def test_best_of_n_validates():
    with pytest.raises(ValueError, match="same shape"):
        best_of_n_accuracy(np.ones((2, 3)), np.ones((2, 4)), n=1)
    with pytest.raises(ValueError, match="n must be in"):
        best_of_n_accuracy(np.ones((2, 3)), np.ones((2, 3)), n=4)
    with pytest.raises(ValueError, match="finite"):
        best_of_n_accuracy(np.ones((1, 2)), [[0.0, np.nan]], n=2)


def test_ece_on_a_hand_made_case():
    confidence_M = np.array([0.2, 0.3, 0.7, 0.9])
    correct_M = np.array([0, 1, 1, 1])
    # Bin [0, 0.5): conf 0.25, acc 0.5; bin [0.5, 1]: conf 0.8, acc 1.0.
    # ECE = 2/4 * 0.25 + 2/4 * 0.2 = 0.225.
    assert expected_calibration_error(confidence_M, correct_M, num_bins=2) == pytest.approx(0.225)
    bins = calibration_bins(confidence_M, correct_M, num_bins=2)
    np.testing.assert_allclose(bins.edges, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(bins.count, [2, 2])
    np.testing.assert_allclose(bins.accuracy, [0.5, 1.0])
    np.testing.assert_allclose(bins.confidence, [0.25, 0.8])


def test_empty_bins_are_nan_and_do_not_count():
    bins = calibration_bins([0.05, 1.0], [0, 1], num_bins=10)
    assert bins.count.tolist() == [1] + [0] * 8 + [1]  # 1.0 falls in the last bin
    assert np.isnan(bins.accuracy[1:9]).all() and np.isnan(bins.confidence[1:9]).all()
    assert expected_calibration_error([0.05, 1.0], [0, 1], num_bins=10) == pytest.approx(0.025)


def test_ece_vanishes_for_calibrated_and_flags_overconfident_predictions():
    rng = np.random.default_rng(0)
    confidence_M = rng.uniform(size=200_000)
    calibrated_M = rng.uniform(size=confidence_M.size) < confidence_M
    assert expected_calibration_error(confidence_M, calibrated_M) < 0.01
    # Correct with probability conf^2 < conf: ECE ~ E[conf - conf^2] = 1/6.
    overconfident_M = rng.uniform(size=confidence_M.size) < confidence_M**2
    assert expected_calibration_error(confidence_M, overconfident_M) == pytest.approx(
        1 / 6, abs=0.01
    )


def test_calibration_validates():
    with pytest.raises(ValueError, match="same shape"):
        expected_calibration_error([0.5, 0.5], [1])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        expected_calibration_error([1.5], [1])
    with pytest.raises(ValueError, match="bool or 0/1"):
        expected_calibration_error([0.5], [2])
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error([0.5], [1], num_bins=0)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32])
def test_bon_weight_equals_the_closed_form_inside(n):
    p = np.linspace(0.01, 0.99, 99)
    closed_form = n * p ** (n - 1) * (1 - p) / (1 - p**n)
    np.testing.assert_allclose(bon_weight(p, n), closed_form, rtol=1e-10)


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_bon_weight_limits_are_finite(n):
    at_zero, at_one = bon_weight(np.array([0.0, 1.0]), n)
    assert at_zero == (1.0 if n == 1 else 0.0)
    assert at_one == pytest.approx(1.0, abs=1e-4)  # p clipped to 1 - 1e-6
    assert bon_weight(1.0, n, eps=0.0) == 1.0  # unclipped: the exact limit
    assert np.isfinite(bon_weight(np.linspace(0, 1, 1001), n)).all()


@pytest.mark.parametrize("n", [2, 4, 16])
def test_bon_weight_increases_with_the_failure_probability(n):
    g = bon_weight(np.linspace(0.0, 1.0, 1001), n, eps=0.0)
    assert np.all(np.diff(g) > 0)
    assert g[0] == 0.0 and g[-1] == 1.0


def test_bon_weight_is_vectorised_and_validates():
    p_PxS = np.array([[0.0, 0.5], [0.75, 1.0]])
    g_PxS = bon_weight(p_PxS, 2, eps=0.0)  # N=2: g = 2p / (1 + p)
    np.testing.assert_allclose(g_PxS, [[0.0, 2 / 3], [6 / 7, 1.0]])
    with pytest.raises(ValueError, match="p_fail must lie"):
        bon_weight([0.5, 1.1], 4)
    with pytest.raises(ValueError, match="n must be"):
        bon_weight(0.5, 0)
