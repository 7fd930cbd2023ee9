"""Preference data from a policy's own samples: SLiC-HF sample-and-rank, LiPO lists.

Sample m responses per prompt from the SFT policy, score them, and turn the
scores into preference pairs (DPO, SLiC-HF, RSO losses) or labelled lists
(LiPO losses)::

    records, stats = make_preferences(
        model, params, make_tokenizer("byte"), ["37+5=", "12*3="],
        scorer=make_scorer("arithmetic_exact"), num_samples=8, max_new_tokens=8)
    write_jsonl(records, "prefs.jsonl")       # read back with load_pairwise
    stats.mean_score, stats.fraction_with_records

The steps are separate functions, so each can be reused or replaced:

1. ``sample_responses``: m samples per prompt (temperature 0.7, top-k 40, as
   in SLiC-HF and RSO), prompts fed as ``[bos] + encode(prompt)``, each
   sample decoded up to (not including) eos.
2. A scorer ``(prompts: list[str], responses: list[str]) -> float [N]``:
   ``make_scorer("arithmetic_exact" | "arithmetic_graded")`` for the built-in
   arithmetic task, or any callable with that signature (e.g. a reward model).
3. ``build_pairwise`` / ``build_listwise``: per prompt, drop blank responses and
   repeats of an earlier identical response (identical texts are never paired
   or listed together), then form pairs with ``form_pairs`` or keep the list
   with the scores as labels. Prompts whose samples all score equally give no
   record; ``PreferenceStats`` counts them.
4. ``write_jsonl``: the JSON Lines format of ``lm_align.data.preference``.

Pairing methods (``form_pairs``), for m candidates with scores s:

- "first_round" (RSO's first-round rank): shuffle, pair neighbours (0,1),
  (2,3), ...; the higher score wins; tied pairs are dropped. At most m // 2
  disjoint pairs.
- "tournament": single elimination on a shuffled order; each decided match is
  a pair and its winner advances; a tied match gives no pair and a random
  player advances; an odd player out gets a bye. With distinct scores: m - 1
  pairs, and the best response never loses.
- "best_worst": one pair, a highest-scored vs a lowest-scored response.
- "all": every pair with different scores (up to m (m - 1) / 2).

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
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from lm_align.data.arithmetic import ArithmeticTask
from lm_align.data.preference import ListwiseRecord, PairwiseRecord
from lm_align.data.tokenizers import Tokenizer, make_tokenizer
from lm_align.sampling import generate

Scorer = Callable[[list[str], list[str]], np.ndarray]  # (prompts, responses) -> float [N]

PAIRING_METHODS = ("first_round", "tournament", "best_worst", "all")
FORMATS = ("pairs", "lists")

# ----------------------------------------------------------------------------
# Scorers
# ----------------------------------------------------------------------------

_INTEGER_RE = re.compile(r"[+-]?[0-9]+")


def arithmetic_exact(prompt: str, response: str) -> float:
    """1.0 if ``response.strip()`` is the exact answer to the arithmetic prompt, else 0.0.

    >>> arithmetic_exact("37+5=", " 42\\n"), arithmetic_exact("37+5=", "41")
    (1.0, 0.0)
    """
    return float(response.strip() == ArithmeticTask.solve(prompt))


def arithmetic_graded(prompt: str, response: str) -> float:
    """Exact answer 1.0; an integer ``pred`` gets partial credit; anything else 0.0.

    With ``truth`` the true answer, a response that is not exactly right but
    whose stripped text is an integer scores::

        0.5 * max(0, 1 - |pred - truth| / max(|truth|, 1))

    so near misses rank above far misses, and far misses (off by at least
    ``|truth|``) tie with garbage at 0. Every score lies in [0, 1], so the
    scores can be soft-label scores or list labels directly.

    >>> arithmetic_graded("37+5=", "42"), round(arithmetic_graded("37+5=", "41"), 4)
    (1.0, 0.4881)
    >>> arithmetic_graded("37+5=", "-3"), arithmetic_graded("37+5=", "x")
    (0.0, 0.0)
    """
    answer = ArithmeticTask.solve(prompt)
    text = response.strip()
    if text == answer:
        return 1.0
    if not _INTEGER_RE.fullmatch(text):
        return 0.0
    truth = int(answer)
    relative_error = abs(int(text) - truth) / max(abs(truth), 1)
    return 0.5 * max(0.0, 1.0 - relative_error)


SCORERS = {"arithmetic_exact": arithmetic_exact, "arithmetic_graded": arithmetic_graded}


def make_scorer(name: str) -> Scorer:
    """The scorer ``name`` as a batched callable ``(prompts, responses) -> float64 [N]``.

    Names: "arithmetic_exact" (1/0 exact match, e.g. to pick winners) and
    "arithmetic_graded" (exact 1, near misses partial credit; for soft labels
    and list labels). Any other callable with the same signature, e.g. a
    reward model, can be passed wherever a scorer is expected.
    """
    if name not in SCORERS:
        raise ValueError(
            f"unknown scorer {name!r}; valid scorers: {sorted(SCORERS)}, or pass "
            "any callable (prompts: list[str], responses: list[str]) -> scores [N]"
        )
    verify = SCORERS[name]

    def scorer(prompts: list[str], responses: list[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return np.array([verify(p, r) for p, r in zip(prompts, responses, strict=True)], np.float64)

    scorer.__name__ = name
    return scorer


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------


def sample_responses(
    model: Any,
    params: Any,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 0.7,
    top_k: int = 40,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[list[str]]:
    """``num_samples`` sampled responses per prompt, as text: ``[len(prompts)][num_samples]``.

    Each prompt is fed as ``[bos] + tokenizer.encode(prompt)`` and continued
    with the KV-cache decoder (``lm_align.sampling.generate``) until eos or
    ``max_new_tokens``; the response is the decoded continuation without the
    eos (a response cut at ``max_new_tokens`` is kept as it is).

    Prompts are decoded ``batch_size`` at a time (``batch_size * num_samples``
    rows); the last batch is padded with copies of one of its prompts, whose
    samples are dropped, so every batch has the same shape. Batches whose
    longest prompts differ in length compile separately.

    Args:
      model, params: a ``lm_align.models.pure.PureModel`` and its parameters.
      tokenizer: the model's tokenizer (bos, eos, pad and decode are used).
      prompts: prompt texts.
      num_samples: responses per prompt (SLiC-HF: 8).
      max_new_tokens: longest response, in tokens (eos included).
      temperature, top_k, top_p: sampling settings (defaults as SLiC-HF/RSO:
        temperature 0.7, top-k 40, no nucleus cut).
      seed: the responses are a pure function of (seed, batch_size, the
        inputs); batch b samples with key ``fold_in(key(seed), b)``.
      batch_size: prompts per decoding batch (at most ``len(prompts)`` used).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not prompts:
        return []
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    size = min(batch_size, len(ids))
    key = jax.random.key(seed)
    responses: list[list[str]] = []
    for b, start in enumerate(range(0, len(ids), size)):
        batch = ids[start : start + size]
        num_real = len(batch)
        batch = batch + [batch[0]] * (size - num_real)
        out = generate(
            model,
            params,
            batch,
            max_new_tokens=max_new_tokens,
            rng=jax.random.fold_in(key, b),
            num_samples=num_samples,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_tokens=[tokenizer.eos_id],
            pad_id=tokenizer.pad_id,
        )
        tokens_RT = np.asarray(jax.device_get(out.tokens))
        lengths_R = np.asarray(jax.device_get(out.lengths))
        for i in range(num_real):  # rows i * n ... i * n + n - 1 continue prompt i
            rows = range(i * num_samples, (i + 1) * num_samples)
            responses.append([_decode(tokenizer, tokens_RT[r, : lengths_R[r]]) for r in rows])
    return responses


def _decode(tokenizer: Tokenizer, ids_T: np.ndarray) -> str:
    ids = ids_T.tolist()
    if ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return tokenizer.decode(ids)


# ----------------------------------------------------------------------------
# Pairs, soft labels, lists
# ----------------------------------------------------------------------------


def _winner_loser(scores: np.ndarray, a: int, b: int) -> tuple[int, int]:
    return (a, b) if scores[a] > scores[b] else (b, a)


def form_pairs(
    scores: Sequence[float] | np.ndarray, *, method: str, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Preference pairs ``(winner, loser)`` (indices into ``scores``) of one prompt's responses.

    Every winner scores strictly higher than its loser; equal scores never form
    a pair. Methods (see the module docstring): "first_round" (shuffle with
    ``rng.permutation``, pair neighbours), "tournament" (single elimination on
    ``rng.permutation``; a tied match advances ``(a, b)[rng.integers(2)]``),
    "best_worst" (a highest vs a lowest, each drawn uniformly among ties) and
    "all" (every pair with different scores, in order ``(i, j), i < j``).
    The caller removes duplicate responses first.
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


def _check_scores(
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    name: str,
) -> list[np.ndarray]:
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
    return PreferenceStats(
        num_prompts=len(responses),
        num_samples=int(sum(len(r) for r in responses)),
        mean_score=float(every.mean()) if every.size else math.nan,
    )


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
      prompts: P prompt texts.
      responses: P lists of responses (any lengths).
      scores: P lists of scores, one per response; higher is better. They pick
        the winners.
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
    labels = (
        scores
        if label_scores is None
        else _check_scores(prompts, responses, label_scores, "label_scores")
    )
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
      prompts: P prompt texts.
      responses: P lists of responses.
      scores: P lists of labels, one per response, each in [0, 1] (higher is
        better), e.g. ``make_scorer("arithmetic_graded")``.
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


# ----------------------------------------------------------------------------
# Writing, and the whole pipeline
# ----------------------------------------------------------------------------


def write_jsonl(
    records: Sequence[PairwiseRecord] | Sequence[ListwiseRecord], path: str | os.PathLike
) -> int:
    """Writes records as JSON Lines that ``load_pairwise`` / ``load_listwise`` read back.

    Pairwise: ``{"prompt", "chosen", "rejected"}`` plus ``"p"`` when the record
    has a soft label. Listwise: ``{"prompt", "responses", "labels"}``. The
    origin is not written. Parent directories are created. Returns the number
    of lines written.
    """
    if not records:
        raise ValueError(
            "no records to write: no prompt gave a preference (see PreferenceStats); "
            "sample more responses per prompt, raise the temperature, or use a graded scorer"
        )
    kinds = {type(r) for r in records}
    if kinds == {PairwiseRecord}:
        lines = [_pairwise_json(r) for r in records]
    elif kinds == {ListwiseRecord}:
        lines = [
            {"prompt": r.prompt, "responses": list(r.responses), "labels": _floats(r.labels)}
            for r in records
        ]
    else:
        raise ValueError(
            f"got records of types {sorted(k.__name__ for k in kinds)}; "
            "write only PairwiseRecord or only ListwiseRecord"
        )
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for obj in lines:
            f.write(json.dumps(obj) + "\n")  # ASCII escapes: one line per record, always
    return len(lines)


def _pairwise_json(r: PairwiseRecord) -> dict[str, Any]:
    obj = {"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
    if r.soft_label is not None:
        obj["p"] = float(r.soft_label)
    return obj


def _floats(values: Any) -> list[float]:
    return [float(v) for v in np.asarray(values, np.float64)]


def _score(scorer: Scorer, prompts: Sequence[str], samples: list[list[str]]) -> list[np.ndarray]:
    """Calls ``scorer`` once on every (prompt, sample); scores per prompt."""
    if not samples:
        return []
    flat_prompts = [p for p, resp in zip(prompts, samples, strict=True) for _ in resp]
    flat_responses = [r for resp in samples for r in resp]
    scores_N = np.asarray(scorer(flat_prompts, flat_responses), np.float64)
    if scores_N.shape != (len(flat_responses),):
        raise ValueError(
            f"scorer {getattr(scorer, '__name__', scorer)!r} returned shape {scores_N.shape} "
            f"for {len(flat_responses)} responses; a scorer returns one score per response"
        )
    bounds = np.cumsum([len(resp) for resp in samples])[:-1]
    return np.split(scores_N, bounds)


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
    temperature: float = 0.7,
    top_k: int = 40,
    top_p: float = 1.0,
    seed: int = 0,
    label_scorer: Scorer | str | None = None,
    max_pairs_per_prompt: int | None = None,
    max_responses: int | None = None,
    batch_size: int = 64,
) -> tuple[list[PairwiseRecord] | list[ListwiseRecord], PreferenceStats]:
    """Sample, score and rank: preference records from the policy's own samples.

    ``sample_responses`` draws ``num_samples`` responses per prompt; ``scorer``
    scores them; then ``build_pairwise`` (format "pairs", winners picked by
    ``scorer``) or ``build_listwise`` (format "lists", labels in [0, 1]) makes
    the records. ``label_scorer`` (default: ``scorer``) supplies the soft-label
    scores of pairs and the labels of lists, e.g. ``scorer="arithmetic_exact"``
    picks correct answers as winners and ``label_scorer="arithmetic_graded"``
    makes a near miss a less certain loser.

    Returns ``(records, stats)``; ``stats.mean_score`` is the mean ``scorer``
    score of all samples (with an exact-match scorer: the sampled accuracy)
    and ``stats.fraction_with_records`` the fraction of prompts that gave a
    record. Scorers may be given by name (``make_scorer``), the tokenizer by
    name (``make_tokenizer``). Other arguments: see ``sample_responses``,
    ``build_pairwise`` and ``build_listwise``.
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
    samples = sample_responses(
        model,
        params,
        tokenizer,
        prompts,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
    )
    scores = _score(scorer, prompts, samples)
    labels = None if label_scorer is None else _score(label_scorer, prompts, samples)
    if format == "pairs":
        records, stats = build_pairwise(
            prompts,
            samples,
            scores,
            method=pairing,
            soft_label_temperature=soft_label_temperature,
            max_pairs_per_prompt=max_pairs_per_prompt,
            seed=seed,
            label_scores=labels,
        )
    else:
        records, stats = build_listwise(
            prompts,
            samples,
            scores if labels is None else labels,
            max_responses=max_responses,
            seed=seed,
        )
    stats.mean_score = float(np.concatenate(scores).mean()) if scores else math.nan
    return records, stats
