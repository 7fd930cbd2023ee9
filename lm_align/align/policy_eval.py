"""Evaluating a policy on a verifiable task: greedy accuracy, pass@k, best-of-N, KL, length.

    report = evaluate_policy(model, params, tokenizer, prompts, scorer,
                             num_samples=8, ks=(1, 4, 8), reference_params=ref)
    report["greedy_accuracy"], report["pass@4"], report["bon@8"], report["kl"]

Greedy accuracy decodes each prompt once greedily; its confidence is the
model's probability of that greedy answer (eos included), and `ece` the
expected calibration error of those confidences (10 equal-width bins). The
other numbers use
`num_samples` samples per prompt at `temperature` (1.0 by default, so the KL
estimate is unbiased). pass@k is the unbiased estimator of Chen et al. 2021
averaged over prompts; bon@n is the accuracy of the sample a `selector`
scores highest among the first n (by default the model's own mean token
log-prob, as an inference-time best-of-N without a verifier would choose;
pass the verifier itself to get the oracle, which equals pass@n); correctness
is `scorer(...) > 0.5`. The KL estimate to a reference is the mean over
samples of log pi(y|x) - log ref(y|x) summed over response tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from lm_align.align import evaluation
from lm_align.data.pipeline import pad_features, token_features
from lm_align.sampling import generate


def _decode(tokenizer, ids, length) -> tuple[str, int]:
    gen = [int(t) for t in ids[:length]]
    ended = bool(gen) and gen[-1] == tokenizer.eos_id
    return tokenizer.decode(gen[:-1] if ended else gen), len(gen) - ended


def sample(
    model, params, tokenizer, prompts: Sequence[str], *, num_samples: int, max_new_tokens: int,
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
    greedy: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Responses [P][n] (text), their model log-probs [P, n] and lengths [P, n]."""
    prompt_ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    out = generate(
        model,
        params,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        rng=seed,
        num_samples=num_samples,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
        stop_tokens=[tokenizer.eos_id],
        pad_id=tokenizer.pad_id,
    )
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    logps = np.asarray(out.logps).sum(-1).reshape(len(prompts), num_samples)
    texts, n_tokens, ids = [], [], []
    for i in range(len(tokens)):
        text, n = _decode(tokenizer, tokens[i], lengths[i])
        texts.append(text)
        n_tokens.append(n)
        ids.append(tokens[i, : lengths[i]].tolist())
    P = len(prompts)
    return {
        "responses": [texts[p * num_samples : (p + 1) * num_samples] for p in range(P)],
        "token_ids": [ids[p * num_samples : (p + 1) * num_samples] for p in range(P)],
        "logps": logps,
        "lengths": np.asarray(n_tokens, np.float64).reshape(P, num_samples),
        "gen_lengths": lengths.reshape(P, num_samples),
    }


def rescore(model, params, tokenizer, prompts: Sequence[str], token_ids) -> np.ndarray:
    """log pi(y | x) of generated token lists (any params, e.g. a reference) [P, n]."""
    n = len(token_ids[0])
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    L = max(len(p) for p in prompt_ids) + max(len(t) for ts in token_ids for t in ts) + 1
    rows = []
    for p, ts in zip(prompt_ids, token_ids, strict=True):
        for t in ts:
            doc = [tokenizer.bos_id] + p + t
            features = token_features(doc, len(p), L)
            rows.append(pad_features(features, seq_len=L, pad_id=tokenizer.pad_id))
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return np.asarray(_scorer(model)(params, batch)).reshape(len(prompts), n)


@functools.lru_cache(maxsize=8)
def _scorer(model):
    """One jitted log-prob function per model (recompiled only for new shapes)."""
    from lm_align.align.logprobs import sequence_logprobs

    return jax.jit(lambda params, rows: sequence_logprobs(model, params, rows).logps)


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
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    reference_params=None,
    selector: Callable | None = None,
) -> dict[str, Any]:
    """Greedy accuracy, pass@k, bon@n, sampled accuracy, length and KL (see the module doc)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to evaluate")
    bad = [k for k in ks if not 1 <= k <= num_samples]
    if bad:
        raise ValueError(f"ks {bad} must lie in [1, num_samples={num_samples}]")
    greedy = sample(
        model, params, tokenizer, prompts, num_samples=1, max_new_tokens=max_new_tokens,
        greedy=True,
    )  # fmt: skip
    greedy_correct = np.asarray(scorer(prompts, [r[0] for r in greedy["responses"]])) > 0.5
    # The model's probability of its own greedy answer, as its confidence.
    confidence = np.exp(np.minimum(greedy["logps"][:, 0], 0.0))
    s = sample(
        model, params, tokenizer, prompts, num_samples=num_samples,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
    )  # fmt: skip
    flat_prompts = [p for p in prompts for _ in range(num_samples)]
    flat = [r for rs in s["responses"] for r in rs]
    correct = (np.asarray(scorer(flat_prompts, flat)) > 0.5).reshape(len(prompts), num_samples)
    report: dict[str, Any] = {
        "num_prompts": len(prompts),
        "num_samples": num_samples,
        "greedy_accuracy": float(np.mean(greedy_correct)),
        "greedy_confidence": float(np.mean(confidence)),
        "ece": float(evaluation.expected_calibration_error(confidence, greedy_correct)),
        "sample_accuracy": float(np.mean(correct)),
        "mean_length": float(np.mean(s["lengths"])),
    }
    c = correct.sum(axis=1)
    select = s["logps"] / np.maximum(s["gen_lengths"], 1) if selector is None else None
    for k in ks:
        report[f"pass@{k}"] = float(
            np.mean([evaluation.pass_at_k(num_samples, int(ci), k) for ci in c])
        )
        scores = select if selector is None else selector(s, k)
        report[f"bon@{k}"] = float(evaluation.best_of_n_accuracy(correct, scores, k))
    if reference_params is not None:
        ref = rescore(model, reference_params, tokenizer, prompts, s["token_ids"])
        report["kl"] = float(np.mean(s["logps"] - ref))
    return report
