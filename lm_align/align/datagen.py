"""Preference data from a policy's own samples: SLiC-HF sample-and-rank, LiPO lists.

Sample m responses per prompt from the SFT policy, score them, and turn the
scores into preference pairs (DPO, SLiC-HF, RSO losses) or labelled lists
(LiPO losses)::

    records, stats = make_preferences(
        model, params, make_tokenizer("byte"), ["37+5=", "12*3="],
        scorer="arithmetic_exact", num_samples=8, max_new_tokens=8,
        temperature=0.7, top_k=40)
    write_records(records, "prefs.jsonl")     # read back with load_pairwise
    stats.mean_score, stats.fraction_with_records

The steps, each replaceable: ``lm_align.sampling.sample_texts`` (SLiC-HF and
RSO sample at temperature 0.7, top-k 40); a scorer from
``lm_align.data.scorers`` or any ``(prompts, responses) -> float [N]`` callable
(e.g. ``lm_align.align.reward.reward_model_scorer``); ``build_pairwise`` /
``build_listwise``, which drop blank and repeated responses per prompt (identical
texts are never paired or listed together) and form pairs with ``form_pairs``
("first_round", "tournament", "best_worst", "all") or keep lists with the
scores as labels; ``lm_align.data.preference.write_records``. Prompts whose
samples all score equally give no record; ``PreferenceStats`` counts them.

Soft labels (geometric-averaged DPO, Furuta et al. 2024) are
``p = sigmoid((s_w - s_l) / T)`` in [0.5, 1]; ``T = None`` gives hard labels.

References:
  Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
  Feedback" (sample-and-rank). Liu et al. 2024, "Statistical Rejection Sampling
  Improves Preference Optimization" (first-round-rank pairs, tournament).
  Liu et al. 2024, "LiPO: Listwise Preference Optimization through
  Learning-to-Rank".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lm_align import sampling
from lm_align.data.preference import ListwiseRecord, PairwiseRecord
from lm_align.data.scorers import Scorer, make_scorer, score_lists
from lm_align.data.tokenizers import Tokenizer, make_tokenizer

PAIRING_METHODS = ("first_round", "tournament", "best_worst", "all")
FORMATS = ("pairs", "lists")


def _winner_loser(scores: np.ndarray, a: int, b: int) -> tuple[int, int]:
    return (a, b) if scores[a] > scores[b] else (b, a)


def form_pairs(
    scores: Sequence[float] | np.ndarray, *, method: str, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Preference pairs ``(winner, loser)`` (indices into ``scores``) of one prompt's responses.

    Every winner scores strictly higher than its loser; equal scores never form
    a pair. The caller removes duplicate responses first. For m scores:

    - "first_round" (RSO's first-round rank): shuffle (``rng.permutation``),
      pair neighbours (0,1), (2,3), ...; the higher score wins, ties are
      dropped. At most m // 2 disjoint pairs.
    - "tournament": single elimination on ``rng.permutation``; each decided
      match is a pair and its winner advances; a tied match gives no pair and
      ``(a, b)[rng.integers(2)]`` advances; an odd player out gets a bye. With
      distinct scores: m - 1 pairs, and the best response never loses.
    - "best_worst": one pair, a highest vs a lowest (each uniform among ties).
    - "all": every pair with different scores, in order ``(i, j), i < j``
      (up to m (m - 1) / 2).
    """
    if method not in PAIRING_METHODS:
        raise ValueError(f"unknown pairing method {method!r}; valid methods: {PAIRING_METHODS}")
    s = np.asarray(scores, np.float64)
    if s.ndim != 1 or not np.all(np.isfinite(s)):
        raise ValueError(f"scores must be a 1-D array of finite numbers, got {s!r}")
    n = len(s)
    if method == "first_round":
        order = [int(i) for i in rng.permutation(n)]
        neighbours = [(order[k], order[k + 1]) for k in range(0, n - 1, 2)]
        return [_winner_loser(s, a, b) for a, b in neighbours if s[a] != s[b]]
    if method == "tournament":
        return _tournament(s, rng)
    if method == "best_worst":
        if n < 2 or s.max() == s.min():
            return []
        best = int(rng.choice(np.flatnonzero(s == s.max())))
        worst = int(rng.choice(np.flatnonzero(s == s.min())))
        return [(best, worst)]
    return [_winner_loser(s, i, j) for i in range(n) for j in range(i + 1, n) if s[i] != s[j]]


def _tournament(s: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int]]:
    alive = [int(i) for i in rng.permutation(len(s))]
    pairs = []
    while len(alive) > 1:
        advancing = []
        for k in range(0, len(alive) - 1, 2):
            a, b = alive[k], alive[k + 1]
            if s[a] == s[b]:
                advancing.append((a, b)[int(rng.integers(2))])
            else:
                winner, loser = _winner_loser(s, a, b)
                pairs.append((winner, loser))
                advancing.append(winner)
        if len(alive) % 2:
            advancing.append(alive[-1])  # bye
        alive = advancing
    return pairs


def soft_label(score_w: float, score_l: float, temperature: float | None) -> float | None:
    """``p = P(winner beats loser) = sigmoid((score_w - score_l) / temperature)``, in [0.5, 1].

    Equal scores give 0.5, a gap much larger than ``temperature`` gives ~1.
    ``temperature=None`` gives None, a hard label (p = 1). A loser scored
    higher than its winner (possible when labels come from another scorer than
    the one that picked the winner) gives 0.5, never a reversed label.
    """
    if temperature is None:
        return None
    if not temperature > 0:
        raise ValueError(f"soft-label temperature={temperature} must be > 0 (or None: hard labels)")
    z = (float(score_w) - float(score_l)) / temperature
    return 0.5 if z <= 0 else 1.0 / (1.0 + math.exp(-z))


@dataclasses.dataclass
class PreferenceStats:
    """What became of the samples when building preference records."""

    num_prompts: int = 0  # prompts given
    num_samples: int = 0  # responses given, all prompts together
    mean_score: float = math.nan  # mean score of all samples (exact scorer: sampled accuracy)
    duplicates_removed: int = 0  # responses identical to an earlier one of the same prompt
    blank_removed: int = 0  # empty or whitespace-only responses (the loaders reject them)
    prompts_too_few: int = 0  # prompts with < 2 distinct non-blank responses
    prompts_all_equal: int = 0  # prompts whose distinct responses all scored equally
    prompts_with_records: int = 0  # prompts giving at least one pair / a list
    num_records: int = 0  # pairs or lists made
    label_disagreements: int = 0  # pairs whose label scores rank the loser higher (p = 0.5)

    @property
    def fraction_with_records(self) -> float:
        """Fraction of prompts that gave at least one pair / a list."""
        return self.prompts_with_records / self.num_prompts if self.num_prompts else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The fields and ``fraction_with_records``, e.g. for logging as JSON."""
        return {**dataclasses.asdict(self), "fraction_with_records": self.fraction_with_records}


def _check_scores(prompts, responses, scores, name: str) -> list[np.ndarray]:
    """Scores as float64 arrays, one per prompt, checked against ``responses``."""
    if not len(prompts) == len(responses) == len(scores):
        raise ValueError(
            f"{len(prompts)} prompts, {len(responses)} response lists and {len(scores)} "
            f"{name} lists; give one response list and one {name} list per prompt"
        )
    out = []
    for i, (resp, sc) in enumerate(zip(responses, scores, strict=True)):
        if not prompts[i].strip():
            raise ValueError(f"prompt {i} is blank; the preference loaders reject blank prompts")
        s = np.asarray(sc, np.float64)
        if s.shape != (len(resp),):
            raise ValueError(
                f"prompt {i}: {len(resp)} responses but {name} of shape {s.shape}; "
                "give one score per response"
            )
        if not np.all(np.isfinite(s)):
            raise ValueError(f"prompt {i}: {name} {s.tolist()} are not all finite numbers")
        out.append(s)
    return out


def _distinct(responses: Sequence[str], stats: PreferenceStats) -> list[int]:
    """Indices of the first occurrence of each distinct non-blank response."""
    seen, keep = set(), []
    for k, text in enumerate(responses):
        if not text.strip():
            stats.blank_removed += 1
        elif text in seen:
            stats.duplicates_removed += 1
        else:
            seen.add(text)
            keep.append(k)
    return keep


def _new_stats(responses: Sequence[Sequence[str]], scores: list[np.ndarray]) -> PreferenceStats:
    every = np.concatenate(scores) if scores else np.zeros(0)
    mean = float(every.mean()) if every.size else math.nan
    return PreferenceStats(len(responses), sum(len(r) for r in responses), mean)


def build_pairwise(
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    *,
    method: str = "first_round",
    soft_label_temperature: float | None = None,
    max_pairs_per_prompt: int | None = None,
    seed: int = 0,
    label_scores: Sequence[Sequence[float]] | None = None,
) -> tuple[list[PairwiseRecord], PreferenceStats]:
    """Preference pairs from per-prompt responses and scores: ``(records, stats)``.

    For prompt i: blank responses and repeats of an earlier identical response
    are dropped, then ``form_pairs(scores, method=method, rng)`` picks (winner,
    loser) pairs with ``rng = np.random.default_rng([seed, i])`` (so a prompt's
    pairs do not depend on the other prompts). With ``max_pairs_per_prompt``, a
    uniformly drawn subset of that many pairs is kept (in order). Records have
    ``origin = "prompt i"``.

    Args:
      prompts, responses, scores: P prompts, P lists of responses (any
        lengths) and P lists of scores, one per response (higher is better;
        they pick the winners).
      method: "first_round", "tournament", "best_worst" or "all".
      soft_label_temperature: T of ``soft_label``; None: hard labels.
      max_pairs_per_prompt: keep at most this many pairs per prompt.
      seed: seeds the shuffles, tie-breaks and subsets.
      label_scores: scores for the soft labels (default ``scores``), e.g. exact
        match picks the winners and graded scores set how sure the label is.
        Unused with hard labels.
    """
    if method not in PAIRING_METHODS:
        raise ValueError(f"unknown pairing method {method!r}; valid methods: {PAIRING_METHODS}")
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt={max_pairs_per_prompt} must be >= 1 or None")
    soft_label(0.0, 0.0, soft_label_temperature)  # checks the temperature
    scores = _check_scores(prompts, responses, scores, "scores")
    labels = scores
    if label_scores is not None:
        labels = _check_scores(prompts, responses, label_scores, "label_scores")
    stats = _new_stats(responses, scores)
    records = []
    for i, prompt in enumerate(prompts):
        keep = _distinct(responses[i], stats)
        if len(keep) < 2:
            stats.prompts_too_few += 1
            continue
        s = scores[i][keep]
        if np.all(s == s[0]):
            stats.prompts_all_equal += 1
            continue
        rng = np.random.default_rng([seed, i])
        pairs = form_pairs(s, method=method, rng=rng)
        if max_pairs_per_prompt is not None and len(pairs) > max_pairs_per_prompt:
            subset = np.sort(rng.choice(len(pairs), max_pairs_per_prompt, replace=False))
            pairs = [pairs[k] for k in subset]
        for win, lose in pairs:
            win, lose = keep[win], keep[lose]
            p = soft_label(labels[i][win], labels[i][lose], soft_label_temperature)
            if p is not None and labels[i][win] < labels[i][lose]:
                stats.label_disagreements += 1
            records.append(
                PairwiseRecord(prompt, responses[i][win], responses[i][lose], p, f"prompt {i}")
            )
        stats.prompts_with_records += bool(pairs)
    stats.num_records = len(records)
    return records, stats


def build_listwise(
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    *,
    max_responses: int | None = None,
    seed: int = 0,
) -> tuple[list[ListwiseRecord], PreferenceStats]:
    """LiPO lists from per-prompt responses and scores: ``(records, stats)``.

    For prompt i: blank responses and repeats of an earlier identical response
    are dropped; with ``max_responses``, a uniformly drawn subset of that many
    (in sample order, ``rng = np.random.default_rng([seed, i])``) is kept. The
    list's labels are the responses' scores. Lists with fewer than 2 responses
    or with all labels equal (nothing to learn) are dropped. Records have
    ``origin = "prompt i"``.

    Args:
      prompts, responses, scores: P prompts, P lists of responses and P lists
        of labels in [0, 1] (higher is better), e.g. "arithmetic_graded" scores.
      max_responses: K, the longest list kept (>= 2); None: all distinct ones.
      seed: seeds the subsets.
    """
    if max_responses is not None and max_responses < 2:
        raise ValueError(f"max_responses={max_responses} must be >= 2 or None")
    scores = _check_scores(prompts, responses, scores, "scores")
    for i, s in enumerate(scores):
        outside = np.flatnonzero((s < 0) | (s > 1))
        if outside.size:
            k = int(outside[0])
            raise ValueError(
                f"list labels must lie in [0, 1] (higher is better), but prompt {i} "
                f"response {k} scored {s[k]:g}; use a scorer with scores in [0, 1] "
                "(e.g. make_scorer('arithmetic_graded')) or rescale the scores "
                "(e.g. sigmoid of a reward-model score, or (s - min) / (max - min))"
            )
    stats = _new_stats(responses, scores)
    records = []
    for i, prompt in enumerate(prompts):
        keep = _distinct(responses[i], stats)
        if max_responses is not None and len(keep) > max_responses:
            rng = np.random.default_rng([seed, i])
            keep = sorted(int(k) for k in rng.choice(keep, max_responses, replace=False))
        if len(keep) < 2:
            stats.prompts_too_few += 1
            continue
        labels_K = scores[i][keep]
        if np.all(labels_K == labels_K[0]):
            stats.prompts_all_equal += 1
            continue
        records.append(
            ListwiseRecord(prompt, [responses[i][k] for k in keep], labels_K, f"prompt {i}")
        )
        stats.prompts_with_records += 1
    stats.num_records = len(records)
    return records, stats


def sample_and_score(
    model: Any, params: Any, tokenizer: Tokenizer, prompts: Sequence[str], scorer: Scorer,
    **sampling_args,
) -> tuple[list[list[str]], list[np.ndarray]]:
    """(responses [P][n], their scores [P] of [n]): `sampling.sample_texts` with
    `sampling_args`, then `scorer` on every (prompt, response) pair."""
    samples = sampling.sample_texts(model, params, tokenizer, prompts, **sampling_args).responses
    return samples, score_lists(scorer, prompts, samples)


def make_preferences(
    model: Any,
    params: Any,
    tokenizer: Tokenizer | str,
    prompts: Sequence[str],
    *,
    scorer: Scorer | str,
    num_samples: int,
    max_new_tokens: int,
    format: str = "pairs",
    pairing: str = "first_round",
    soft_label_temperature: float | None = None,
    temperature: float = sampling.DEFAULT_TEMPERATURE,
    top_k: int = sampling.DEFAULT_TOP_K,
    top_p: float = sampling.DEFAULT_TOP_P,
    seed: int = 0,
    label_scorer: Scorer | str | None = None,
    max_pairs_per_prompt: int | None = None,
    max_responses: int | None = None,
    batch_size: int = sampling.DEFAULT_BATCH_SIZE,
) -> tuple[list[PairwiseRecord] | list[ListwiseRecord], PreferenceStats]:
    """Sample, score and rank: preference records from the policy's own samples.

    ``sample_texts`` draws ``num_samples`` responses per prompt (default: the
    model's own distribution); ``scorer`` scores them; ``build_pairwise``
    (format "pairs", winners picked by ``scorer``) or ``build_listwise``
    (format "lists", labels in [0, 1]) makes the records. ``label_scorer``
    (default ``scorer``) gives the soft-label scores of pairs and the labels of
    lists: e.g. "arithmetic_exact" picks winners and "arithmetic_graded" makes a
    near miss a less certain loser. ``stats.mean_score`` is the mean ``scorer``
    score (exact match: the sampled accuracy). Scorers and the tokenizer may be
    given by name. Other arguments: ``sample_texts``, ``build_pairwise``,
    ``build_listwise``.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; valid formats: {FORMATS}")
    if pairing not in PAIRING_METHODS:
        raise ValueError(f"unknown pairing method {pairing!r}; valid methods: {PAIRING_METHODS}")
    soft_label(0.0, 0.0, soft_label_temperature)  # fail before sampling, not after
    tokenizer = make_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    scorer = make_scorer(scorer) if isinstance(scorer, str) else scorer
    if isinstance(label_scorer, str):
        label_scorer = make_scorer(label_scorer)
    samples, scores = sample_and_score(
        model, params, tokenizer, prompts, scorer, num_samples=num_samples,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, batch_size=batch_size,
    )  # fmt: skip
    labels = None if label_scorer is None else score_lists(label_scorer, prompts, samples)
    if format == "pairs":
        records, stats = build_pairwise(
            prompts, samples, scores, method=pairing,
            soft_label_temperature=soft_label_temperature,
            max_pairs_per_prompt=max_pairs_per_prompt, seed=seed, label_scores=labels,
        )  # fmt: skip
    else:
        labels = scores if labels is None else labels
        records, stats = build_listwise(
            prompts, samples, labels, max_responses=max_responses, seed=seed
        )
    stats.mean_score = float(np.concatenate(scores).mean()) if scores else math.nan
    return records, stats
