"""RSO statistical rejection sampling: pick responses as if drawn from the optimal policy.

Shape legend: P prompts, N candidates per prompt, K accepted samples.

The KL-regularised optimal policy is ``pi*(y|x) ∝ pi_sft(y|x) exp(r(x, y) / beta)``.
RSO (Liu et al. 2024) approximates samples from it with rejection sampling on
N candidates drawn from the SFT policy (the spec: N = 64 at temperature 0.7,
top-k 40, K = 8, beta = 0.5). Algorithm 1 of the paper, without replacement::

    accepted = []
    while len(accepted) < K:
        r_max = max(r[i] for i not in accepted)
        for i in (candidates not in accepted, in a fresh random order):
            u ~ U[0, 1)
            if u < exp((r[i] - r_max) / beta):
                accepted.append(i)
                if len(accepted) == K: stop

A sweep always accepts its best remaining candidate (its probability is
exp(0) = 1), so at most K sweeps are needed. The temperature beta moves the
result between two limits:

- beta -> 0: only the best remaining candidate passes each sweep, so the
  result is the top-K by reward, in descending reward order (ties resolved by
  the sweep's random order).
- beta -> inf: every candidate passes, so the result is the first K of a
  uniform random permutation: a uniform K-subset in uniform order.

Usage, one prompt or many::

    idx_K = rejection_sample(rewards_N, num_samples=8, beta=0.5, rng=0)
    idx_PK = rejection_sample_batch(rewards_PN, num_samples=8, beta=0.5, rng=0)
    acceptance_probabilities(rewards_N, beta=0.5)   # first-sweep probabilities
    rejection_sweep(rewards_N, beta=0.5, rng=0)     # one sweep, for diagnostics

The K accepted responses then form K / 2 pairs by RSO's "first-round rank"
(:func:`lm_align.align.datagen.form_pairs` with ``method="first_round"``),
labelled by the reward model (:func:`rso_pairs`). :func:`rso_preferences` is
the whole pipeline: sample N candidates per prompt from the policy
(``lm_align.sampling.sample_texts``), score them, accept, pair. Its default
proposal is the policy's own distribution (temperature 1, no top-k), the
pi_sft of the derivation above; the paper's runs sampled at temperature 0.7,
top-k 40 (pass them to reproduce that).

References:
  Liu et al. 2024, Statistical Rejection Sampling Improves Preference
    Optimization, ICLR 2024, arXiv:2309.06657 (Algorithm 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lm_align import sampling
from lm_align.align.datagen import PreferenceStats, build_pairwise, sample_and_score
from lm_align.data.preference import PairwiseRecord
from lm_align.data.scorers import Scorer, make_scorer


def _check_rewards(rewards: np.ndarray | list[float]) -> np.ndarray:
    r_N = np.asarray(rewards, dtype=np.float64)
    if r_N.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {r_N.shape}")
    if r_N.size == 0:
        raise ValueError("rewards is empty: need at least one candidate")
    if not np.all(np.isfinite(r_N)):
        raise ValueError("rewards must be finite (found NaN or inf)")
    return r_N


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"beta must be > 0 (np.inf allowed), got {beta}")
    return beta


def _probabilities(r_N: np.ndarray, r_max: float, beta: float) -> np.ndarray:
    """exp((r - r_max) / beta) for r <= r_max: the exponent is <= 0, so no overflow."""
    if np.isinf(beta):
        return np.ones_like(r_N)
    with np.errstate(over="ignore", under="ignore"):  # tiny beta: -inf, exp -> 0
        return np.exp((r_N - r_max) / beta)


def acceptance_probabilities(rewards: np.ndarray | list[float], beta: float) -> np.ndarray:
    """First-sweep acceptance probabilities ``exp((r - max r) / beta)``, float64 [N].

    The best candidate has probability 1; beta = np.inf gives all ones; a tiny
    beta gives 1 for the maximum and 0 elsewhere (never NaN or overflow). The
    expected number accepted in the first sweep (if it runs to the end) is
    their sum.

    Args:
      rewards: [N] finite rewards of one prompt's candidates.
      beta: temperature > 0 (np.inf allowed).
    """
    r_N = _check_rewards(rewards)
    return _probabilities(r_N, r_N.max(), _check_beta(beta))


def rejection_sample(
    rewards: np.ndarray | list[float],
    num_samples: int,
    beta: float,
    rng: np.random.Generator | int,
) -> np.ndarray:
    """Indices of the candidates RSO accepts, in acceptance order, int64 [num_samples].

    Runs Algorithm 1 of Liu et al. 2024 (see the module docstring): sweeps over
    the not-yet-accepted candidates in a fresh ``rng.permutation`` order, each
    sweep against the maximum reward among them, until ``num_samples`` are
    accepted. No index is returned twice. beta -> 0 gives the top-num_samples
    by reward in descending order; beta = np.inf gives a uniform random
    subset in uniform random order.

    Args:
      rewards: [N] finite rewards r(x, y_i) of one prompt's N candidates.
      num_samples: how many to accept, 1 <= num_samples <= N (the paper: 8 of 64).
      beta: temperature > 0 of the target ``pi_sft exp(r / beta)``; np.inf allowed.
        The paper samples with beta = 0.5.
      rng: a ``np.random.Generator`` (advanced in place) or an int seed.

    References:
      Liu et al. 2024, Statistical Rejection Sampling Improves Preference
        Optimization, arXiv:2309.06657.
    """
    r_N = _check_rewards(rewards)
    beta = _check_beta(beta)
    num_candidates = r_N.size
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    if num_samples > num_candidates:
        raise ValueError(
            f"num_samples={num_samples} > number of candidates {num_candidates}: "
            "sampling is without replacement"
        )
    num_samples = int(num_samples)
    rng = np.random.default_rng(rng)
    accepted: list[int] = []
    remaining = np.ones(num_candidates, dtype=bool)
    while len(accepted) < num_samples:
        passed = _sweep(r_N, remaining, beta, rng, num_samples - len(accepted))
        accepted.extend(passed.tolist())
        remaining[passed] = False
    return np.asarray(accepted, dtype=np.int64)


def _sweep(
    r_N: np.ndarray, remaining: np.ndarray, beta: float, rng: np.random.Generator, budget: int
) -> np.ndarray:
    order = rng.permutation(np.flatnonzero(remaining))
    prob = _probabilities(r_N[order], r_N[order].max(), beta)
    u = rng.random(order.size)  # in [0, 1): the sweep's best (prob 1) always passes
    # One uniform per candidate in sweep order, as in Algorithm 1; those drawn
    # after the sweep stops are unused.
    return order[u < prob][:budget]


def rejection_sweep(
    rewards: np.ndarray | list[float],
    beta: float,
    rng: np.random.Generator | int,
    *,
    remaining: np.ndarray | None = None,
    max_accept: int | None = None,
) -> np.ndarray:
    """One sweep of :func:`rejection_sample`: indices accepted, in acceptance order, int64.

    Visits the candidates with ``remaining`` True (default: all) in a random
    order and accepts each with probability ``exp((r - r_max) / beta)``, r_max
    the maximum over ``remaining``; stops after ``max_accept`` acceptances
    (default: none). Without a cap, a sweep over all N candidates accepts
    ``sum(acceptance_probabilities(rewards, beta))`` of them on average.
    """
    r_N = _check_rewards(rewards)
    beta = _check_beta(beta)
    if remaining is None:
        remaining = np.ones(r_N.size, dtype=bool)
    remaining = np.asarray(remaining, dtype=bool)
    if remaining.shape != r_N.shape or not remaining.any():
        raise ValueError("remaining must be a bool [N] mask with at least one True")
    budget = r_N.size if max_accept is None else int(max_accept)
    return _sweep(r_N, remaining, beta, np.random.default_rng(rng), budget).astype(np.int64)


def rejection_sample_batch(
    rewards_PN: np.ndarray,
    num_samples: int,
    beta: float,
    rng: np.random.Generator | int,
) -> np.ndarray:
    """:func:`rejection_sample` for each of P prompts, int64 [P, num_samples].

    Row p holds indices into ``rewards_PN[p]``. The prompts share one generator
    (built from ``rng`` once), so rows are independent draws and the whole
    batch is reproducible from one seed.
    """
    r_PN = np.asarray(rewards_PN, dtype=np.float64)
    if r_PN.ndim != 2:
        raise ValueError(f"rewards_PN must be 2-D [P, N], got shape {r_PN.shape}")
    rng = np.random.default_rng(rng)
    rows = [rejection_sample(r_N, num_samples, beta, rng) for r_N in r_PN]
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), int(num_samples))


def rso_pairs(
    prompts,
    responses,
    rewards,
    *,
    num_accept: int = 8,
    beta: float = 0.5,
    pairing: str = "first_round",
    seed: int = 0,
    soft_label_temperature: float | None = None,
    label_scores=None,
):
    """The RSO pipeline after sampling: accept `num_accept` of each prompt's N_c
    candidates with `rejection_sample` (reward-tilted towards pi_r*), then pair
    the accepted ones (first-round rank, as in the paper, or a tournament),
    labelled by the same rewards.

    Args:
      prompts: `[P]` strings; responses: `[P][N_c]` candidate texts from the SFT
        policy; rewards: `[P][N_c]` their rewards (reward model or verifier).
      label_scores: `[P][N_c]` scores for the pairs' soft labels (default `rewards`).
    Returns ``(records, stats)`` as ``lm_align.align.datagen.build_pairwise``.
    """
    rng = np.random.default_rng(seed)
    accepted_responses, accepted_rewards, accepted_labels = [], [], []
    labels = rewards if label_scores is None else label_scores
    for cand, r, g in zip(responses, rewards, labels, strict=True):
        r = np.asarray(r, np.float64)
        if num_accept > len(cand):
            raise ValueError(
                f"num_accept={num_accept} but a prompt has {len(cand)} candidates; "
                f"sample at least {num_accept} (N_c) per prompt"
            )
        index = rejection_sample(r, num_accept, beta, rng)
        accepted_responses.append([cand[i] for i in index])
        accepted_rewards.append(r[index])
        accepted_labels.append(np.asarray(g, np.float64)[index])
    return build_pairwise(
        prompts,
        accepted_responses,
        accepted_rewards,
        method=pairing,
        soft_label_temperature=soft_label_temperature,
        seed=seed,
        label_scores=accepted_labels,
    )


def rso_preferences(
    model: Any,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    scorer: Scorer | str,
    num_candidates: int,
    max_new_tokens: int,
    num_accept: int = 8,
    beta: float = 0.5,
    pairing: str = "first_round",
    soft_label_temperature: float | None = None,
    temperature: float = sampling.DEFAULT_TEMPERATURE,
    top_k: int = sampling.DEFAULT_TOP_K,
    top_p: float = sampling.DEFAULT_TOP_P,
    seed: int = 0,
    batch_size: int = sampling.DEFAULT_BATCH_SIZE,
) -> tuple[list[PairwiseRecord], PreferenceStats]:
    """RSO preference pairs from the policy's own samples: ``(records, stats)``.

    ``sample_texts`` draws ``num_candidates`` (N_c; the paper: 64) responses
    per prompt with ``seed``; ``scorer`` (a reward model or verifier, or a
    name for ``make_scorer``) gives their rewards; :func:`rso_pairs` accepts
    ``num_accept`` of them at temperature ``beta`` and pairs them.
    ``stats.mean_score`` is the mean reward of all candidates.
    """
    if not 2 <= num_accept <= num_candidates:
        raise ValueError(
            f"num_accept={num_accept} must lie in [2, num_candidates={num_candidates}]: "
            "pairs need two accepted responses, accepted ones are candidates"
        )
    scorer = make_scorer(scorer) if isinstance(scorer, str) else scorer
    candidates, rewards = sample_and_score(
        model, params, tokenizer, prompts, scorer, num_samples=num_candidates,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, batch_size=batch_size,
    )  # fmt: skip
    records, stats = rso_pairs(
        prompts, candidates, rewards, num_accept=num_accept, beta=beta, pairing=pairing,
        seed=seed, soft_label_temperature=soft_label_temperature,
    )  # fmt: skip
    stats.mean_score = float(np.mean(np.concatenate(rewards))) if rewards else float("nan")
    return records, stats
