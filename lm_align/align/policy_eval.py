"""Evaluating a policy on a verifiable task: greedy accuracy, pass@k, best-of-N, KL, length.

    report = evaluate_policy(model, params, tokenizer, prompts, scorer,
                             num_samples=8, ks=(1, 4, 8), reference_params=ref)
    report["greedy_accuracy"], report["pass@4"], report["bon@8"], report["kl"]

Greedy accuracy decodes each prompt once greedily; its confidence is the
model's probability of that greedy answer (eos included), and `ece` the
expected calibration error of those confidences (10 equal-width bins). The
other numbers use `num_samples` samples per prompt from
`lm_align.sampling.sample_texts` (its default distribution, the model's own:
temperature 1, no top-k or nucleus cut, so the KL estimate is unbiased).
pass@k is the unbiased estimator of Chen et al. 2021 averaged over prompts;
bon@n is the accuracy of the sample a `selector` scores highest among the
first n (by default the model's own mean token log-prob, as an
inference-time best-of-N without a verifier would choose; pass the verifier
itself to get the oracle, which equals pass@n); correctness is
`scorer(...) > 0.5`. The KL estimate to a reference is the mean over samples
of log pi(y|x) - log ref(y|x) summed over response tokens (`sampling.rescore`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lm_align import sampling
from lm_align.align import evaluation
from lm_align.sampling import Samples, rescore, sample_texts


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
    selector: Callable[[Samples, int], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Greedy accuracy, pass@k, bon@n, sampled accuracy, length and KL (see the module doc).

    `selector(samples, k) -> scores [P, num_samples]` picks the best-of-k
    sample (default: mean token log-prob); `samples` is the `Samples` drawn.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to evaluate")
    bad = [k for k in ks if not 1 <= k <= num_samples]
    if bad:
        raise ValueError(f"ks {bad} must lie in [1, num_samples={num_samples}]")
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
    correct = (np.asarray(scorer(flat_prompts, flat)) > 0.5).reshape(len(prompts), num_samples)
    report: dict[str, Any] = {
        "num_prompts": len(prompts),
        "num_samples": num_samples,
        "greedy_accuracy": float(np.mean(greedy_correct)),
        "greedy_confidence": float(np.mean(confidence)),
        "ece": float(evaluation.expected_calibration_error(confidence, greedy_correct)),
        "sample_accuracy": float(np.mean(correct)),
        "mean_length": float(np.mean(s.response_lengths)),
    }
    c = correct.sum(axis=1)
    mean_token_logp = s.logps / np.maximum(s.lengths, 1)
    for k in ks:
        report[f"pass@{k}"] = float(evaluation.pass_at_k_array(num_samples, c, k, mean=True))
        scores = mean_token_logp if selector is None else selector(s, k)
        report[f"bon@{k}"] = float(evaluation.best_of_n_accuracy(correct, scores, k))
    if reference_params is not None:
        ref = rescore(model, reference_params, tokenizer, prompts, s.token_ids)
        report["kl"] = float(np.mean(s.logps.astype(np.float64) - ref))
    return report
