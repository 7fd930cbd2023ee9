"""Evaluation on verifiable tasks: pass@k, best-of-N accuracy, calibration, BoN weights.

Shape legend: P problems, N samples per problem, M scored predictions, B bins.

- :func:`pass_at_k`, :func:`pass_at_k_array`: the unbiased pass@k estimator of
  Chen et al. 2021 from n samples of which c are correct::

      pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)

  The product form needs no large binomials, so it is exact to rounding for
  any n.
- :func:`best_of_n_accuracy`: BoN@N, the fraction of problems whose
  highest-scored sample (by a verifier, a reward model or the policy's own
  likelihood) among the first N is correct.
- :func:`expected_calibration_error`, :func:`calibration_bins`: equal-width-bin
  ECE (Guo et al. 2017), ``sum_b |B_b| / M * |acc_b - conf_b|``.
- :func:`bon_weight`: the weight ``g(p) = N p^(N-1) (1 - p) / (1 - p^N)`` of
  correct samples in BoN-RLB(P), the positive-only binary-reward BoN-aware RL
  of Chow et al. 2024 (``lm_align.losses.policy_gradient.bon_rlb_p``), finite
  on all of p in [0, 1].

Usage::

    pass_at_k(n=32, c=3, k=8)                              # one problem
    pass_at_k_array(32, correct_PN.sum(1), 8, mean=True)   # a benchmark
    best_of_n_accuracy(correct_PN, scores_PN, n=8)
    expected_calibration_error(confidence_M, correct_M, num_bins=10)
    bon_weight(p_fail_P, n=8)                              # RL weights [P]

References:
  Chen et al. 2021, Evaluating Large Language Models Trained on Code,
    arXiv:2107.03374.
  Guo et al. 2017, On Calibration of Modern Neural Networks, arXiv:1706.04599.
  Chow et al. 2024, Inference-Aware Fine-Tuning for Best-of-N Sampling in
    Large Language Models, ICLR 2025, arXiv:2412.15287.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def _check_int(name: str, value: int, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct.

    ``1 - C(n - c, k) / C(n, k)``: the probability that k samples drawn without
    replacement from the n contain at least one correct one. Computed as
    ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which is stable for large n;
    1.0 when ``n - c < k`` (every k-subset contains a correct sample).

    Args:
      n: samples generated for the problem, n >= 1.
      c: how many of them are correct, 0 <= c <= n.
      k: the k of pass@k, 1 <= k <= n.

    References:
      Chen et al. 2021, Evaluating Large Language Models Trained on Code,
        arXiv:2107.03374, eq. 1 and Figure 3.
    """
    n = _check_int("n", n, 1)
    c = _check_int("c", c, 0, n)
    k = _check_int("k", k, 1, n)
    if n - c < k:
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def pass_at_k_array(
    n: int, c_array: np.ndarray | list[int], k: int, *, mean: bool = False
) -> np.ndarray | float:
    """:func:`pass_at_k` for P problems with ``n`` samples each: float64 [P], or their mean.

    ``c_array`` [P] holds the number of correct samples per problem. With
    ``mean=True`` returns the benchmark's pass@k, the mean over problems.
    """
    n = _check_int("n", n, 1)
    k = _check_int("k", k, 1, n)
    c_P = np.asarray(c_array)
    if c_P.ndim != 1 or c_P.size == 0:
        raise ValueError(f"c_array must be a non-empty 1-D array [P], got shape {c_P.shape}")
    if not np.all(np.mod(c_P, 1) == 0) or c_P.min() < 0 or c_P.max() > n:
        raise ValueError(f"c_array must hold integers in [0, n={n}]")
    # fail_c[c] = prod_{j<c} (1 - k / (n - j)) = C(n - c, k) / C(n, k); the factor
    # at n - j = k is exactly 0, so fail_c is 0 whenever n - c < k.
    factors = 1.0 - k / np.arange(n, 0, -1, dtype=np.float64)
    fail_c = np.concatenate([[1.0], np.cumprod(factors)])
    fail_c[np.arange(n + 1) > n - k] = 0.0  # already +-0; make pass@k exactly 1.0 there
    pass_P = 1.0 - fail_c[c_P.astype(np.int64)]
    return float(pass_P.mean()) if mean else pass_P


def best_of_n_accuracy(correct_PN: np.ndarray, scores_PN: np.ndarray, n: int) -> float:
    """BoN@n: fraction of problems whose best-scored sample among the first n is correct.

    For each problem, pick ``argmax_{j < n} scores_PN[p, j]`` (ties go to the
    first index, like ``np.argmax``) and read ``correct_PN`` there. This is the
    accuracy of the Best-of-N policy with the scores as its verifier; with an
    oracle verifier it equals the fraction of problems with any correct sample.

    Args:
      correct_PN: [P, N] bool (or 0/1) correctness of each sample.
      scores_PN: [P, N] finite verifier or reward-model scores.
      n: samples the policy draws, 1 <= n <= N.
    """
    correct_PN = np.asarray(correct_PN)
    scores_PN = np.asarray(scores_PN, dtype=np.float64)
    if correct_PN.ndim != 2 or correct_PN.shape != scores_PN.shape:
        raise ValueError(
            f"correct_PN and scores_PN must be 2-D [P, N] of the same shape, "
            f"got {correct_PN.shape} and {scores_PN.shape}"
        )
    if correct_PN.size == 0:
        raise ValueError("need at least one problem and one sample")
    if not np.all(np.isin(correct_PN, (0, 1))):
        raise ValueError("correct_PN must be bool or 0/1")
    if not np.all(np.isfinite(scores_PN)):
        raise ValueError("scores_PN must be finite (found NaN or inf)")
    n = _check_int("n", n, 1, correct_PN.shape[1])
    best_P = np.argmax(scores_PN[:, :n], axis=1)
    return float(np.take_along_axis(correct_PN[:, :n], best_P[:, None], axis=1).mean())


class CalibrationBins(NamedTuple):
    """Per-bin statistics of a reliability diagram (B equal-width bins on [0, 1])."""

    edges: np.ndarray  # [B + 1] bin edges 0, 1/B, ..., 1
    count: np.ndarray  # [B] int64 predictions in the bin
    accuracy: np.ndarray  # [B] fraction correct in the bin; NaN where empty
    confidence: np.ndarray  # [B] mean confidence in the bin; NaN where empty


def calibration_bins(
    confidences: np.ndarray, correct: np.ndarray, num_bins: int = 10
) -> CalibrationBins:
    """Bin predictions by confidence into ``num_bins`` equal-width bins on [0, 1].

    Bin b holds confidences in ``[b / B, (b + 1) / B)``; the last bin also holds
    1.0. Empty bins have count 0 and NaN accuracy and confidence (plotting
    libraries skip NaN).

    Args:
      confidences: [M] predicted probabilities of being correct, in [0, 1].
      correct: [M] bool (or 0/1) outcomes.
      num_bins: B >= 1.
    """
    conf_M = np.asarray(confidences, dtype=np.float64)
    correct_M = np.asarray(correct)
    if conf_M.ndim != 1 or conf_M.shape != correct_M.shape:
        raise ValueError(
            f"confidences and correct must be 1-D [M] of the same shape, "
            f"got {conf_M.shape} and {correct_M.shape}"
        )
    if conf_M.size == 0:
        raise ValueError("need at least one prediction")
    if not np.all((conf_M >= 0) & (conf_M <= 1)):  # also rejects NaN
        raise ValueError("confidences must lie in [0, 1]")
    if not np.all(np.isin(correct_M, (0, 1))):
        raise ValueError("correct must be bool or 0/1")
    num_bins = _check_int("num_bins", num_bins, 1)
    bin_M = np.minimum((conf_M * num_bins).astype(np.int64), num_bins - 1)
    count = np.bincount(bin_M, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins -> NaN
        accuracy = np.bincount(bin_M, weights=correct_M.astype(np.float64), minlength=num_bins)
        confidence = np.bincount(bin_M, weights=conf_M, minlength=num_bins)
        accuracy, confidence = accuracy / count, confidence / count
    return CalibrationBins(np.linspace(0.0, 1.0, num_bins + 1), count, accuracy, confidence)


def expected_calibration_error(
    confidences: np.ndarray, correct: np.ndarray, num_bins: int = 10
) -> float:
    """Expected calibration error with equal-width bins, in [0, 1].

    ``ECE = sum_b (|B_b| / M) |acc_b - conf_b|`` over the non-empty bins of
    :func:`calibration_bins` (same arguments): the mean gap between stated
    confidence and observed accuracy. 0 for a perfectly calibrated predictor
    (up to sampling noise and binning).

    References:
      Guo et al. 2017, On Calibration of Modern Neural Networks,
        arXiv:1706.04599, eq. 3.
    """
    bins = calibration_bins(confidences, correct, num_bins)
    full = bins.count > 0
    gap = np.abs(bins.accuracy[full] - bins.confidence[full])
    return float(np.sum(bins.count[full] / bins.count.sum() * gap))


def bon_weight(p_fail: np.ndarray | float, n: int, eps: float = 1e-6) -> np.ndarray:
    """Weight of correct samples in BoN-RLB(P) (positive-only), same shape as ``p_fail``.

    ``g(p) = N p^(N-1) (1 - p) / (1 - p^N)`` with ``p = P_fail(x)``, the
    probability that one sample from the policy is wrong (estimated from the N
    samples), clipped to ``[0, 1 - eps]``.

    Derivation: Best-of-N with a perfect verifier succeeds with probability
    ``1 - p^N``. A REINFORCE update on the correct samples alone (reward 1,
    positive-only) follows the gradient of the single-sample success ``1 - p``;
    by the chain rule ``d log(1 - p^N) = N p^(N-1) / (1 - p^N) d(1 - p)``, and
    scaling by ``1 - p`` (the mass of correct samples) gives g. N = 1 gives
    g = 1, plain positive-only REINFORCE.

    Computation: ``1 - p^N = (1 - p) sum_{j<N} p^j``, so
    ``g(p) = N p^(N-1) / sum_{j=0}^{N-1} p^j`` exactly, with no 0/0 anywhere:
    g(0) = 1 if N = 1 else 0, and g(p) -> 1 as p -> 1. Dividing through by
    p^(N-1) gives ``g = N / sum_{m=0}^{N-1} p^-m``, increasing in p for N >= 2:
    problems the policy mostly fails get the largest weight (up to 1), problems
    it already solves get little (down to 0), since one correct sample among N
    is enough for Best-of-N.

    Args:
      p_fail: P_fail(x) in [0, 1], a float or an array of any shape.
      n: the N of Best-of-N, n >= 1.
      eps: clip p to at most 1 - eps (0 <= eps < 1); eps = 0 allows p = 1 (g = 1).

    References:
      Chow et al. 2024, Inference-Aware Fine-Tuning for Best-of-N Sampling in
        Large Language Models, ICLR 2025, arXiv:2412.15287.
    """
    n = _check_int("n", n, 1)
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    p = np.asarray(p_fail, dtype=np.float64)
    if not np.all((p >= 0) & (p <= 1)):  # also rejects NaN
        raise ValueError("p_fail must lie in [0, 1]")
    p = np.clip(p, 0.0, 1.0 - eps)
    powers = p[..., None] ** np.arange(n)  # [..., N]: p^0 (= 1 at p = 0), ..., p^(N-1)
    return n * powers[..., -1] / powers.sum(axis=-1)


class PairedInterval(NamedTuple):
    """The mean per-problem difference of two policies and its 95% bootstrap interval."""

    mean: float
    lo: float
    hi: float
    n: int

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def paired_bootstrap(
    after_P: np.ndarray, before_P: np.ndarray, *, num_resamples: int = 2000, seed: int = 0
) -> PairedInterval:
    """Mean of ``after - before`` over P problems, with the 95% percentile interval of
    the bootstrap over problems (each resample draws P problems with replacement
    and keeps their pairs together, so the interval reflects the problems' own
    variation in difficulty, not only the sampling noise; Efron & Tibshirani 1993).

    ``after_P`` / ``before_P``: a per-problem metric of two policies on the same
    problems (0/1 greedy correctness, a sample accuracy, ...); several seeds of
    one method are averaged per problem first.
    """
    after = np.asarray(after_P, np.float64)
    before = np.asarray(before_P, np.float64)
    if after.shape != before.shape or after.ndim != 1 or not len(after):
        raise ValueError(
            f"after {after.shape} and before {before.shape} must be the same non-empty [P]"
        )
    diff = after - before
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (num_resamples, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return PairedInterval(float(diff.mean()), float(lo), float(hi), len(diff))
