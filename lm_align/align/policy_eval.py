"""Evaluating a policy on a verifiable task: greedy accuracy, pass@k, best-of-N, KL, length.

    report = evaluate_policy(model, params, tokenizer, prompts, scorer,
                             num_samples=8, ks=(1, 4, 8), reference_params=ref,
                             slices=arithmetic.problem_slices)
    report["greedy_accuracy"], report["pass@4"], report["bon@8"], report["kl"]
    report["slices"]["carry"]   # {"count": 93, "greedy_accuracy": ..., "pass@1": ...}

Greedy accuracy decodes each prompt once greedily; its confidence is the
model's probability of that greedy answer (eos included), and `ece` the
expected calibration error of those confidences (10 equal-width bins). The
other numbers use `num_samples` samples per prompt from
`lm_align.sampling.sample_texts` (its default distribution, the model's own:
temperature 1, no top-k or nucleus cut, so the KL estimate is unbiased).
pass@k is the unbiased estimator of Chen et al. 2021 averaged over prompts;
correctness is `scorer(...) > 0.5`.

Best-of-n is the accuracy of the sample a selector scores highest among the
first n samples of each prompt (ties to the first), under two selectors:

- `bon@n`: the `selector` (default "verifier": the scorer's own scores, the
  best-of-N policy of Chow et al. 2024 with the task's verifier; with a
  binary verifier it is correct iff one of the n samples is, the realised
  counterpart of pass@n). Pass a callable, e.g. a reward model's scores, to
  select with that instead; `bon_selector` in the report names it.
- `bon_likelihood@n`: the model's own mean token log-prob, as a best-of-N
  without any verifier would choose.

With `slices(prompt) -> names` (e.g. `lm_align.data.arithmetic.problem_slices`:
op, digits, carry / no_carry), `report["slices"][name]` holds the slice's
prompt count, greedy accuracy and pass@1. The KL estimate to a reference is
the mean over samples of log pi(y|x) - log ref(y|x) summed over response
tokens (`sampling.rescore`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lm_align import sampling
from lm_align.align import evaluation
from lm_align.sampling import Samples, rescore, sample_texts

SELECTORS = ("verifier", "likelihood")


def evaluate_policy(
    model,
    params,
    tokenizer,
    prompts: Sequence[str],
    scorer: Callable[[list[str], list[str]], np.ndarray],
    *,
    num_samples: int = 8,
    ks: Sequence[int] = (1,),
    max_new_tokens: int = 8,
    temperature: float = sampling.DEFAULT_TEMPERATURE,
    top_k: int = sampling.DEFAULT_TOP_K,
    top_p: float = sampling.DEFAULT_TOP_P,
    seed: int = 0,
    batch_size: int = sampling.DEFAULT_BATCH_SIZE,
    reference_params=None,
    selector: str | Callable[[Samples, int], np.ndarray] | None = "verifier",
    slices: Callable[[str], Sequence[str]] | None = None,
    per_prompt: bool = False,
) -> dict[str, Any]:
    """Greedy accuracy, pass@k, bon@n, sampled accuracy, length and KL (see the module doc).

    `selector` picks bon@k's best-of-k sample: "verifier" (the scorer's
    scores), "likelihood" (mean token log-prob, as bon_likelihood@k) or
    `selector(samples, k) -> scores [P, num_samples]` with `samples` the
    `Samples` drawn (e.g. a reward model's scores); None is "verifier".
    `slices(prompt)` names the slices a prompt belongs to (report["slices"]).
    `per_prompt` adds report["per_prompt"]: each prompt's greedy correctness
    sample accuracy and pass@n (lists in prompt order), for paired comparisons of two
    policies on the same prompts (`lm_align.align.evaluation.paired_bootstrap`).
    """
    selector = "verifier" if selector is None else selector
    prompts = list(prompts)
    _check_arguments(prompts, ks, num_samples, selector)
    greedy = sample_texts(
        model, params, tokenizer, prompts, max_new_tokens=max_new_tokens, greedy=True,
        batch_size=batch_size,
    )  # fmt: skip
    greedy_correct = np.asarray(scorer(prompts, [r[0] for r in greedy.responses])) > 0.5
    # The model's probability of its own greedy answer, as its confidence.
    confidence = np.exp(np.minimum(greedy.logps[:, 0].astype(np.float64), 0.0))
    s = sample_texts(
        model, params, tokenizer, prompts, num_samples=num_samples,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, batch_size=batch_size,
    )  # fmt: skip
    flat_prompts = [p for p in prompts for _ in range(num_samples)]
    flat = [r for rs in s.responses for r in rs]
    scores_PN = np.asarray(scorer(flat_prompts, flat), dtype=np.float64)
    scores_PN = scores_PN.reshape(len(prompts), num_samples)
    correct = scores_PN > 0.5
    report: dict[str, Any] = {
        "num_prompts": len(prompts),
        "num_samples": num_samples,
        "greedy_accuracy": float(np.mean(greedy_correct)),
        "greedy_confidence": float(np.mean(confidence)),
        "ece": float(evaluation.expected_calibration_error(confidence, greedy_correct)),
        "sample_accuracy": float(np.mean(correct)),
        "mean_length": float(np.mean(s.response_lengths)),
        "bon_selector": selector if isinstance(selector, str) else "custom",
    }
    c = correct.sum(axis=1)
    mean_token_logp = s.logps / np.maximum(s.lengths, 1)
    for k in ks:
        report[f"pass@{k}"] = float(evaluation.pass_at_k_array(num_samples, c, k, mean=True))
        chosen = _selection_scores(selector, s, k, scores_PN, mean_token_logp)
        report[f"bon@{k}"] = float(evaluation.best_of_n_accuracy(correct, chosen, k))
        report[f"bon_likelihood@{k}"] = float(
            evaluation.best_of_n_accuracy(correct, mean_token_logp, k)
        )
    if per_prompt:
        report["per_prompt"] = _per_prompt(greedy_correct, correct)
    if slices is not None:
        report["slices"] = slice_accuracy(prompts, slices, greedy_correct, correct)
    if reference_params is not None:
        ref = rescore(model, reference_params, tokenizer, prompts, s.token_ids)
        report["kl"] = float(np.mean(s.logps.astype(np.float64) - ref))
    return report


def _check_arguments(prompts, ks, num_samples: int, selector) -> None:
    if not prompts:
        raise ValueError("no prompts to evaluate")
    bad = [k for k in ks if not 1 <= k <= num_samples]
    if bad:
        raise ValueError(f"ks {bad} must lie in [1, num_samples={num_samples}]")
    if isinstance(selector, str) and selector not in SELECTORS:
        raise ValueError(f"selector={selector!r}; use one of {SELECTORS} or a callable")


def _per_prompt(greedy_correct_P: np.ndarray, correct_PN: np.ndarray) -> dict[str, list]:
    """Each prompt's greedy correctness (0/1), sample accuracy and pass@n (0/1: any of
    its n samples correct), in prompt order."""
    return {
        "greedy_correct": greedy_correct_P.astype(int).tolist(),
        "sample_accuracy": correct_PN.mean(axis=1).tolist(),
        f"pass@{correct_PN.shape[1]}": correct_PN.any(axis=1).astype(int).tolist(),
    }


def _selection_scores(selector, samples: Samples, k: int, verifier_PN, likelihood_PN):
    """The scores bon@k selects by: the verifier's, the likelihood, or the callable's."""
    if selector == "verifier":
        return verifier_PN
    if selector == "likelihood":
        return likelihood_PN
    return selector(samples, k)


def slice_accuracy(
    prompts: Sequence[str],
    slices: Callable[[str], Sequence[str]],
    greedy_correct_P: np.ndarray,
    correct_PN: np.ndarray,
) -> dict[str, dict[str, float]]:
    """Per slice: its prompt count, greedy accuracy and pass@1 (mean sample accuracy).

    A prompt counts in every slice `slices(prompt)` names; slices come out
    sorted by name.
    """
    members: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        for name in slices(prompt):
            members.setdefault(name, []).append(i)
    return {
        name: {
            "count": len(idx),
            "greedy_accuracy": float(np.mean(greedy_correct_P[idx])),
            "pass@1": float(np.mean(correct_PN[idx])),
        }
        for name, idx in sorted(members.items())
    }
