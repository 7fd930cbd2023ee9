"""Held-out evaluation of a policy during preference training (the `eval_*` metrics).

At eval steps (and at step 0 with ``align.eval_at_start``) `evaluate_policy`
reports, on ``align.eval_file``, the trainer's own loss and metrics; on policy
samples for held-out prompts of the data source, the KL estimate to the
reference, the response length and the samples' reward under
``align.eval_scorer``; and greedy exact match (``train.answer_eval_examples``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm_align import data as data_lib
from lm_align import parallel
from lm_align.align.batches import map_records
from lm_align.align.config import REWARD_LOSSES
from lm_align.align.objectives import means_of_sums, objective, weighted_sums
from lm_align.align.setup import AlignSetup
from lm_align.data.scorers import make_scorer, score_lists
from lm_align.sampling import rescore, sample_texts
from lm_align.train import evaluate


def make_align_eval(a, score_rows: Callable, *, online_reference: bool = False) -> Callable:
    """`(params, batch[, ref_params]) -> sums`: weighted sums over held-out records
    (`objectives.weighted_sums`: reward accuracy counts only lists with a
    label-ordered pair)."""

    def eval_fn(params, batch, ref_params=None):
        scores = score_rows(params, batch["rows"])
        if online_reference:
            ref = score_rows(ref_params, batch["rows"])
        else:
            ref = batch.get("ref_logps", jnp.zeros_like(scores))
        loss_B, metrics = objective(a, scores, ref, batch)
        return weighted_sums(loss_B, metrics, batch["weight"])

    return eval_fn


def _eval_prompts(cfg) -> list[str]:
    """Held-out prompts for sampling: the data source's eval split (if it has prompts);
    on arithmetic, distinct problems (`experiment.held_out_prompts`)."""
    from lm_align.align.experiment import held_out_prompts

    try:
        records = data_lib.make_source(cfg.data, "eval")
        if not len(records) or "prompt" not in records[0]:
            return []
        return held_out_prompts(cfg.data, cfg.align.eval_prompts)[0]
    except ValueError:
        return []


def sample_metrics(model, params, ref_params, tokenizer, prompts, a, *, seed: int = 0) -> dict:
    """KL(policy || reference), response length and reward on policy samples.

    `eval_samples` samples per prompt at `eval_temperature`. The KL estimate
    is mean over samples of log pi(y|x) - log ref(y|x) (summed over response
    tokens); it is unbiased at temperature 1. Response length counts tokens
    before the eos.
    """
    out = sample_texts(
        model, params, tokenizer, prompts, num_samples=a.eval_samples,
        max_new_tokens=a.eval_max_new_tokens, temperature=a.eval_temperature, seed=seed,
    )  # fmt: skip
    ref_logps = rescore(model, ref_params, tokenizer, prompts, out.token_ids)
    result = {
        "kl": float(np.mean(out.logps.astype(np.float64) - ref_logps)),
        "response_length": float(np.mean(out.response_lengths)),
    }
    if a.eval_scorer:
        scores = score_lists(make_scorer(a.eval_scorer), prompts, out.responses)
        result["sample_reward"] = float(np.mean(np.concatenate(scores)))
    return result


def evaluate_policy(s: AlignSetup, params, ref_params, eval_data, *, seed: int = 0) -> dict:
    """Eval metrics (keys `eval_*`) of `params`: held-out records, samples, greedy accuracy."""
    cfg, a = s.cfg, s.cfg.align
    online = not a.precompute_reference and ref_params is not None
    out: dict[str, Any] = {}
    if eval_data is not None:
        fn = _eval_fn(s, online)
        sums = None
        for o, _ in map_records(
            lambda b: fn(params, b, ref_params) if online else fn(params, b),
            eval_data,
            cfg.train.batch_size,
            s.batch_sharding,
        ):
            sums = o if sums is None else jax.tree.map(np.add, sums, o)
        out.update({f"eval_{k}": float(v) for k, v in means_of_sums(sums).items()})
    if a.loss in REWARD_LOSSES:
        return out
    tokenizer = data_lib.make_tokenizer(cfg.data.tokenizer)
    prompts = _eval_prompts(cfg)
    if prompts and a.eval_prompts:
        m = sample_metrics(s.policy_model, params, ref_params, tokenizer, prompts, a, seed=seed)
        out.update({f"eval_{k}": v for k, v in m.items()})
    if cfg.train.answer_eval_examples:
        acc = evaluate.answer_accuracy(
            s.policy_model,
            params,
            cfg.data,
            num_examples=cfg.train.answer_eval_examples,
            max_new_tokens=cfg.train.answer_max_new_tokens,
        )
        if acc:
            out["eval_answer_exact_match"] = acc["answer_exact_match"]
    return out


def _eval_fn(s: AlignSetup, online: bool) -> Callable:
    name = f"eval_online={online}"
    if name not in s.jitted:
        fn = make_align_eval(s.cfg.align, s.score_rows, online_reference=online)
        s.jitted[name] = jax.jit(fn, out_shardings=parallel.replicated(s.mesh))
    return s.jitted[name]


def describe(row: dict) -> str:
    """A one-line summary of the eval metrics in `row`."""
    names = (
        ("eval_answer_exact_match", "greedy accuracy"),
        ("eval_sample_reward", "sample reward"),
        ("eval_kl", "KL"),
        ("eval_response_length", "length"),
        ("eval_reward_accuracy", "held-out reward acc"),
        ("eval_loss", "held-out loss"),
    )
    parts = [f"{label} {row[k]:.4g}" for k, label in names if k in row]
    return ", ".join(parts) or "no eval metrics"
