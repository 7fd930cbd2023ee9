"""Scorers of sampled responses, by name: ``make_scorer("arithmetic_exact")``.

A scorer maps N (prompt, response) pairs to N scores, higher is better::

    scorer(prompts: list[str], responses: list[str]) -> np.ndarray float64 [N]

It labels a policy's samples: winners of preference pairs, list labels,
ReST-EM's kept samples, BoN rewards, sampled accuracy (a score > 0.5 counts
as correct). The verifiers live next to their tasks and are registered here:

- "arithmetic_exact": ``lm_align.data.arithmetic.arithmetic_exact``, 1.0 iff
  the response is the answer (``ArithmeticTask.score``).
- "arithmetic_graded": ``lm_align.data.arithmetic.arithmetic_graded``, 1.0
  for the answer, partial credit in [0, 0.5) for a near-miss integer.

Scorers that need more than the text: ``reference_scorer(records)`` (exact
match with each prompt's reference completion, any task with completions)
and ``lm_align.data.kg_facts.kg_facts_exact(graph)``. A reward model is a
scorer too (``lm_align.align.reward.reward_model_scorer``); any callable with
the signature above can be passed wherever a scorer is expected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lm_align.data.arithmetic import arithmetic_exact, arithmetic_graded

Scorer = Callable[[list[str], list[str]], np.ndarray]  # (prompts [N], responses [N]) -> [N]
Verifier = Callable[[str, str], float]  # (prompt, response) -> score

SCORERS: dict[str, Verifier] = {
    "arithmetic_exact": arithmetic_exact,
    "arithmetic_graded": arithmetic_graded,
}


def batched(verify: Verifier, name: str) -> Scorer:
    """``verify(prompt, response)`` applied pairwise: a scorer returning float64 [N]."""

    def scorer(prompts: list[str], responses: list[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return np.array([verify(p, r) for p, r in zip(prompts, responses, strict=True)], np.float64)

    scorer.__name__ = name
    return scorer


def make_scorer(name: str) -> Scorer:
    """The registered scorer ``name`` (a key of ``SCORERS``) as a batched callable."""
    if name not in SCORERS:
        raise ValueError(
            f"unknown scorer {name!r}; valid scorers: {sorted(SCORERS)}, or pass "
            "any callable (prompts: list[str], responses: list[str]) -> scores [N]"
        )
    return batched(SCORERS[name], name)


def reference_scorer(records: Iterable[Mapping[str, Any]]) -> Scorer:
    """1.0 iff ``response.strip()`` equals the stripped ``"completion"`` of the record
    whose ``"prompt"`` is the prompt, else 0.0.

    ``records`` are data-source records (``{"prompt", "completion"}``); a
    prompt asked twice must have one reference. Scoring a prompt that is not
    among them is an error naming it.
    """
    gold: dict[str, str] = {}
    for r in records:
        answer = r["completion"].strip()
        if gold.setdefault(r["prompt"], answer) != answer:
            raise ValueError(f"prompt {r['prompt']!r} has two reference completions")

    def verify(prompt: str, response: str) -> float:
        if prompt not in gold:
            raise ValueError(f"prompt {prompt!r} has no reference completion")
        return float(response.strip() == gold[prompt])

    return batched(verify, "reference")


def score_lists(
    scorer: Scorer, prompts: Sequence[str], responses: Sequence[Sequence[str]]
) -> list[np.ndarray]:
    """``scorer`` called once on every (prompt, response) pair; float64 scores per prompt.

    ``responses[p]`` are prompt p's responses (any number); item p of the
    result is their scores [len(responses[p])]. A scorer that does not return
    one score per response is an error naming it.
    """
    if not responses:
        return []
    flat_prompts = [p for p, resp in zip(prompts, responses, strict=True) for _ in resp]
    flat_responses = [r for resp in responses for r in resp]
    scores_N = np.asarray(scorer(flat_prompts, flat_responses), np.float64)
    if scores_N.shape != (len(flat_responses),):
        raise ValueError(
            f"scorer {getattr(scorer, '__name__', scorer)!r} returned shape {scores_N.shape} "
            f"for {len(flat_responses)} responses; a scorer returns one score per response"
        )
    return np.split(scores_N, np.cumsum([len(resp) for resp in responses])[:-1])
