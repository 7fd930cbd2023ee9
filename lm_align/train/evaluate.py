"""Held-out evaluation for the train loop: eval loss, greedy exact match, unigram baseline.

Greedy answers here recompute the full prefix each step (no KV cache) in one
jitted loop of fixed shape; it is exact and fast enough for short answers.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
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


def make_greedy_fn(apply_fn: Callable, max_new_tokens: int, eos_id: int) -> Callable:
    """`(params, tokens [B, T], lengths [B]) -> tokens [B, T]`, filling positions
    lengths..lengths+max_new_tokens-1 greedily (stops per row after eos)."""

    def greedy(params, tokens_BT, lengths_B):
        B = tokens_BT.shape[0]

        def step(i, carry):
            tokens_BT, done_B = carry
            logits_BTV = apply_fn(params, tokens_BT)
            pos_B = lengths_B + i
            next_B = jnp.argmax(logits_BTV[jnp.arange(B), pos_B - 1], axis=-1).astype(
                tokens_BT.dtype
            )
            next_B = jnp.where(done_B, 0, next_B)
            tokens_BT = tokens_BT.at[jnp.arange(B), pos_B].set(next_B)
            return tokens_BT, done_B | (next_B == eos_id)

        tokens_BT, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens_BT, jnp.zeros(B, bool)))
        return tokens_BT

    return jax.jit(greedy)


def answer_accuracy(
    apply_fn: Callable,
    params,
    data_cfg,
    *,
    num_examples: int,
    max_new_tokens: int,
    batch_size: int = 64,
    verbose_examples: int = 0,
) -> dict[str, Any]:
    """Greedy exact match of completions on held-out prompt/completion records.

    Each prompt is fed as [bos] + prompt; the decoded continuation up to eos is
    compared with the record's completion (surrounding whitespace ignored).
    Returns {} when the source has no prompt/completion records.
    """
    records = data_lib.make_source(data_cfg, "eval")
    n = min(num_examples, len(records))
    examples = [records[i] for i in range(n)]
    if not examples or "prompt" not in examples[0]:
        return {}
    tok = data_lib.make_tokenizer(data_lib.config.get(data_cfg, "tokenizer"))
    prompts = [[tok.bos_id] + tok.encode(r["prompt"]) for r in examples]
    width = max(map(len, prompts)) + max_new_tokens
    greedy = make_greedy_fn(apply_fn, max_new_tokens, tok.eos_id)
    correct, shown = 0, []
    for start in range(0, n, batch_size):
        chunk = prompts[start : start + batch_size]
        rows = len(chunk)
        tokens = np.full((batch_size, width), tok.pad_id, np.int32)
        lengths = np.ones(batch_size, np.int32)
        for i, p in enumerate(chunk):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        out = np.asarray(jax.device_get(greedy(params, tokens, lengths)))
        for i in range(rows):
            answer = tok.decode(out[i, lengths[i] :].tolist())
            rec = examples[start + i]
            ok = answer.strip() == rec["completion"].strip()
            correct += ok
            if len(shown) < verbose_examples:
                shown.append(
                    f"{rec['prompt']}{answer}  ({'ok' if ok else 'want ' + rec['completion']})"
                )
    return {"answer_exact_match": correct / n, "answer_examples": n, "samples": shown}
