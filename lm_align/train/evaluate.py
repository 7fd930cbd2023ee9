"""Held-out evaluation for the train loop: eval loss, greedy exact match, unigram baseline.

Greedy answers use the KV-cache decoder of `lm_align.sampling`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lm_align import data as data_lib
from lm_align import parallel


def eval_loss(
    eval_step: Callable,
    params,
    data_cfg,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    batch_sharding,
    seed: int,
) -> dict:
    """Token-mean loss and accuracy over the first `num_batches` held-out batches."""
    it = data_lib.make_batch_iterator(
        data_cfg,
        split="eval",
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    ce_sum = correct = tokens = 0.0
    for _, batch in zip(range(num_batches), it):
        sums = jax.device_get(eval_step(params, parallel.global_batch(batch, batch_sharding)))
        ce_sum += float(sums["ce_sum"])
        correct += float(sums["correct_sum"])
        tokens += float(sums["num_tokens"])
    tokens = max(tokens, 1.0)
    return {"eval_loss": ce_sum / tokens, "eval_accuracy": correct / tokens}


def unigram_entropy(data_cfg, *, seq_len: int, num_batches: int = 8, batch_size: int = 32) -> float:
    """Cross-entropy (nats/token) of the best context-free predictor: the entropy of the
    target-token distribution, estimated on training batches, evaluated on eval ones."""

    def counts(split):
        it = data_lib.make_batch_iterator(
            data_cfg, split=split, seq_len=seq_len, batch_size=batch_size, seed=0
        )
        c = {}
        for _, b in zip(range(num_batches), it):
            t = b["targets"][b["loss_mask"] > 0]
            for tok, n in zip(*np.unique(t, return_counts=True)):
                c[int(tok)] = c.get(int(tok), 0) + int(n)
        return c

    train, held = counts("train"), counts("eval")
    total = sum(train.values())
    vocab = len(set(train) | set(held))
    # Add-one smoothing so eval tokens unseen in training have finite cost.
    logp = {t: math.log((train.get(t, 0) + 1) / (total + vocab)) for t in set(train) | set(held)}
    n = sum(held.values())
    return -sum(c * logp[t] for t, c in held.items()) / max(n, 1)


def answer_accuracy(
    model,
    params,
    data_cfg,
    *,
    num_examples: int,
    max_new_tokens: int,
    verbose_examples: int = 0,
) -> dict[str, Any]:
    """Greedy exact match of completions on held-out prompt/completion records.

    Each prompt is fed as [bos] + prompt and decoded greedily by the one
    sampler (`lm_align.sampling.sample_texts`, KV cache, all prompts in one
    call) until eos; the continuation is compared with the record's completion
    (surrounding whitespace ignored). Returns {} when the source has no
    prompt/completion records.
    """
    from lm_align.sampling import sample_texts

    records = data_lib.make_source(data_cfg, "eval")
    n = min(num_examples, len(records))
    examples = [records[i] for i in range(n)]
    if not examples or "prompt" not in examples[0]:
        return {}
    tok = data_lib.make_tokenizer(data_lib.config.get(data_cfg, "tokenizer"))
    prompts = [r["prompt"] for r in examples]
    answers = sample_texts(
        model, params, tok, prompts, max_new_tokens=max_new_tokens, greedy=True, batch_size=n
    ).responses
    correct, shown = 0, []
    for i, rec in enumerate(examples):
        (answer,) = answers[i]
        ok = answer.strip() == rec["completion"].strip()
        correct += ok
        if len(shown) < verbose_examples:
            shown.append(
                f"{rec['prompt']}{answer}  ({'ok' if ok else 'want ' + rec['completion']})"
            )
    return {"answer_exact_match": correct / n, "answer_examples": n, "samples": shown}
