"""The `rl` config group of `lm-align rl` (`lm_align.align.rl`): fields, recipes, checks.

    from lm_align.align.rl_config import rl_base_config

    def get_config(arg=None):
        cfg = rl_base_config("grpo")          # or dr_grpo, dapo, rloo (ALGORITHMS)
        cfg.rl.policy_checkpoint = "runs/sft"
        cfg.rl.scorer = "arithmetic_exact"
        return cfg

``train.batch_size`` counts prompts per rollout; ``train.steps`` optimizer
updates (``rl.epochs x rl.minibatches`` per rollout). Every field:
docs/configs.md.
"""

from __future__ import annotations

from typing import Any

import jax

from lm_align.config import ConfigError
from lm_align.losses import rl as rl_losses

RL_DEFAULTS: dict[str, Any] = {
    "policy_checkpoint": "",  # workdir of the starting policy ('' = fresh init)
    "reference_checkpoint": "",  # the KL reference ('' = the starting policy)
    "scorer": "arithmetic_exact",  # the verifier: lm_align.data.scorers.SCORERS
    "group_size": 8,  # G: responses per prompt
    "max_new_tokens": 8,  # generation budget per response (eos included)
    "max_len": 32,  # tokens per (prompt, response) row; prompt + max_new_tokens must fit
    "temperature": 1.0,  # sampling (1.0, no top-k/top-p: the policy's own distribution)
    "top_k": 0,
    "top_p": 1.0,
    "epochs": 1,  # optimisation passes over each rollout
    "minibatches": 1,  # updates per pass (the rollout's rows split this many ways)
    "advantage": "grpo",  # grpo | dr_grpo | rloo (lm_align.losses.rl.advantages)
    "aggregation": "sequence_mean",  # sequence_mean | token_mean | constant
    "constant_normalizer": 0,  # aggregation=constant: the constant (0 = max_new_tokens)
    "eps_low": 0.2,  # clip range [1 - eps_low, 1 + eps_high]
    "eps_high": 0.2,
    "kl_coef": 0.0,  # beta of the per-token KL penalty to the reference
    "kl_estimator": "k3",  # k1 | k3
    "dynamic_sampling": False,  # DAPO: resample until groups with differing rewards fill
    "max_sampling_rounds": 4,  # prompt batches drawn per rollout at most (dynamic sampling)
    "overlong_buffer": 0,  # DAPO soft overlong penalty over the last N tokens (0 = off)
    "eval_prompts": 256,  # eval-split prompts for greedy accuracy, pass@k, KL
    "eval_samples": 4,  # samples per eval prompt (pass@1 and pass@eval_samples)
    "eval_at_start": True,  # evaluate the starting policy (row at step 0)
}

# The published recipes, as `rl` field values (rl_base_config(algorithm)).
ALGORITHMS: dict[str, dict[str, Any]] = {
    # Shao et al. 2024 (arXiv:2402.03300): std-normalised group advantages, per-response
    # token means, KL to the reference with the k3 estimator (beta 0.04).
    "grpo": {"advantage": "grpo", "aggregation": "sequence_mean", "kl_coef": 0.04},
    # Liu et al. 2025 (arXiv:2503.20783): no std division, no length normalisation
    # (a constant normaliser), no KL term.
    "dr_grpo": {"advantage": "dr_grpo", "aggregation": "constant", "kl_coef": 0.0},
    # Yu et al. 2025 (arXiv:2503.14476): clip-higher, token-level mean, dynamic
    # sampling, overlong shaping, no KL term.
    "dapo": {
        "advantage": "grpo",
        "aggregation": "token_mean",
        "eps_high": 0.28,
        "kl_coef": 0.0,
        "dynamic_sampling": True,
        "overlong_buffer": 2,
    },
    # Ahmadian et al. 2024 (arXiv:2402.14740): leave-one-out baseline, one update per
    # rollout (no clipping in effect), per-response token means.
    "rloo": {"advantage": "rloo", "aggregation": "sequence_mean", "kl_coef": 0.0},
}


def rl_base_config(algorithm: str = "grpo"):
    """`lm_align.train.base_config()` plus the `rl` group set to `algorithm`'s recipe."""
    from lm_align.train.config import base_config

    if algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm={algorithm!r}; use one of {sorted(ALGORITHMS)}")
    cfg = base_config()
    cfg.rl = {**RL_DEFAULTS, **ALGORITHMS[algorithm]}
    return cfg


def matching_algorithm(r) -> str:
    """The name of the recipe `r` (the rl group) follows, or 'custom'."""
    for name, recipe in ALGORITHMS.items():
        if all(r[k] == v for k, v in {**RL_DEFAULTS, **recipe}.items() if k in _RECIPE_FIELDS):
            return name
    return "custom"


_RECIPE_FIELDS = ("advantage", "aggregation", "eps_low", "eps_high", "kl_coef",
                  "dynamic_sampling", "overlong_buffer")  # fmt: skip


def updates_per_rollout(r) -> int:
    return int(r.epochs * r.minibatches)


def check_rl(cfg) -> list[str]:
    """Problems with the `rl` group (and the batch layout it implies), each naming the fix."""
    from lm_align.data.scorers import SCORERS

    r, t, errors = cfg.rl, cfg.train, []
    unknown = sorted(set(r.keys()) - set(RL_DEFAULTS))
    if unknown:
        errors.append(f"unknown rl fields {unknown}; valid: {sorted(RL_DEFAULTS)}")
        return errors
    choices = {
        "advantage": rl_losses.ADVANTAGES,
        "aggregation": rl_losses.AGGREGATIONS,
        "kl_estimator": rl_losses.KL_ESTIMATORS,
    }
    for name, valid in choices.items():
        if r[name] not in valid:
            errors.append(f"rl.{name}={r[name]!r}; use one of {valid}")
    if r.scorer not in SCORERS:
        errors.append(f"rl.scorer={r.scorer!r}; use one of {sorted(SCORERS)}")
    for name in ("group_size", "max_new_tokens", "epochs", "minibatches", "eval_samples",
                 "max_sampling_rounds"):  # fmt: skip
        if r[name] < 1:
            errors.append(f"rl.{name}={r[name]} must be >= 1")
    if r.group_size < 2:
        errors.append(
            f"rl.group_size={r.group_size}: group-relative advantages need at least 2 "
            "responses per prompt"
        )
    for name in ("eps_low", "eps_high", "kl_coef", "overlong_buffer", "eval_prompts",
                 "constant_normalizer"):  # fmt: skip
        if r[name] < 0:
            errors.append(f"rl.{name}={r[name]} must be >= 0")
    if r.eps_low >= 1:
        errors.append(f"rl.eps_low={r.eps_low} must be < 1 (the ratio's lower clip is 1 - eps_low)")
    if r.overlong_buffer >= r.max_new_tokens:
        errors.append(
            f"rl.overlong_buffer={r.overlong_buffer} must be < rl.max_new_tokens="
            f"{r.max_new_tokens} (the penalty ramps over the last overlong_buffer tokens)"
        )
    if not r.temperature > 0:
        errors.append(f"rl.temperature={r.temperature} must be > 0")
    if r.max_len < r.max_new_tokens + 2:
        errors.append(
            f"rl.max_len={r.max_len} leaves no room for a prompt and rl.max_new_tokens="
            f"{r.max_new_tokens}; raise rl.max_len"
        )
    rows = t.batch_size * r.group_size
    per_update, rem = divmod(rows, r.minibatches)
    if rem:
        errors.append(
            f"train.batch_size x rl.group_size = {rows} rows do not split into "
            f"rl.minibatches={r.minibatches}; choose a divisor of {rows}"
        )
    elif per_update % t.grad_accum_steps:
        errors.append(
            f"{per_update} rows per update do not split into train.grad_accum_steps="
            f"{t.grad_accum_steps} micro-batches; choose a divisor of {per_update}"
        )
    if jax.process_count() > 1:
        errors.append(
            f"lm-align rl runs in one process (this is process {jax.process_index()} of "
            f"{jax.process_count()}); use the devices of one host"
        )
    return errors
