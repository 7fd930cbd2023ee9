"""Direct preference pairs: the source's reference completion over one of the policy's mistakes.

For each prompt the policy samples `num_samples` responses; the first
non-blank one the scorer rejects (score <= 0.5) becomes the rejected response
and the data source's own completion the chosen one. A prompt the policy
always answers correctly gives no pair. Compared with pairs of two samples
(`lm_align.align.datagen`), the chosen response is always right, so the pair's
label is certain; the price is a chosen response that is off-policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lm_align import sampling
from lm_align.align.datagen import PreferenceStats, sample_and_score
from lm_align.data.preference import PairwiseRecord
from lm_align.data.scorers import Scorer

REJECT_AT_OR_BELOW = 0.5  # a sample scoring at most this is a mistake


def direct_pairs(
    prompts: Sequence[str],
    completions: Sequence[str],
    samples: Sequence[Sequence[str]],
    scores: Sequence[np.ndarray],
) -> tuple[list[PairwiseRecord], PreferenceStats]:
    """(pairs, stats): per prompt, its reference completion over its first wrong sample.

    `samples[i]` are prompt i's responses and `scores[i]` their scores; a
    wrong sample identical to the reference (a scorer stricter than the
    reference) is not paired.
    """
    records = []
    for i, (prompt, gold) in enumerate(zip(prompts, completions, strict=True)):
        wrong = [
            c
            for c, x in zip(samples[i], scores[i], strict=True)
            if x <= REJECT_AT_OR_BELOW and c.strip()
        ]
        if wrong and wrong[0] != gold:
            records.append(PairwiseRecord(prompt, gold, wrong[0], origin=f"prompt {i}"))
    all_scores = np.concatenate([np.asarray(s, np.float64) for s in scores]) if scores else []
    stats = PreferenceStats(
        num_prompts=len(prompts),
        num_samples=sum(len(s) for s in samples),
        mean_score=float(np.mean(all_scores)) if len(all_scores) else float("nan"),
        prompts_with_records=len(records),
        num_records=len(records),
    )
    return records, stats


def direct_preferences(
    model: Any,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    scorer: Scorer,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = sampling.DEFAULT_TEMPERATURE,
    top_k: int = sampling.DEFAULT_TOP_K,
    top_p: float = sampling.DEFAULT_TOP_P,
    seed: int = 0,
) -> tuple[list[PairwiseRecord], PreferenceStats]:
    """Samples with `sampling.sample_texts`, scores with `scorer`, then `direct_pairs`."""
    samples, scores = sample_and_score(
        model, params, tokenizer, prompts, scorer, num_samples=num_samples,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed,
    )  # fmt: skip
    return direct_pairs(prompts, completions, samples, scores)
