"""The `align` config group: which preference loss, on which data, from which policy.

An alignment experiment is a full experiment config (train, mesh, model,
optimizer, param, data) plus this group:

    from lm_align.align.config import align_base_config

    def get_config(arg=None):
        cfg = align_base_config()
        cfg.align.loss = "dpo"
        cfg.align.train_file = "runs/prefs/train.jsonl"
        cfg.align.policy_checkpoint = "runs/sft"
        return cfg

With a policy checkpoint the `model` and `param` groups are taken from that
run (the experiment's own are ignored), so the policy loads as it was
trained. ``train.batch_size`` counts preference records (pairs or lists).
"""

from __future__ import annotations

from lm_align.align.objectives import OBJECTIVES, names

PAIRWISE_LOSSES = names("pairwise")
LISTWISE_LOSSES = names("listwise")
REWARD_LOSSES = names("reward")  # trains a reward model (scalar head), not a policy
# On sampled responses with rewards (format "samples"): lm_align.losses.policy_gradient.
POLICY_GRADIENT_LOSSES = names("policy_gradient")
LOSSES = tuple(OBJECTIVES)
FORMATS = ("auto", "pairwise", "listwise", "samples")
LIPO_REDUCTIONS = ("paper", "rax")

ALIGN_DEFAULTS = {
    "loss": "dpo",  # one of LOSSES
    "beta": 0.1,  # DPO/IPO/geometric-DPO temperature; listwise scores s = beta * rho
    "label_smoothing": 0.0,  # cDPO epsilon (dpo only)
    "gamma": 0.05,  # RSO losses' scale (separate from the sampling beta)
    "margin": 1.0,  # SLiC-HF hinge margin delta
    "slic_reg_weight": 0.1,  # SLiC-HF lambda_reg: adds lambda * -log pi(chosen)
    "nll_weight": 0.0,  # adds nll_weight * per-token NLL of the best response (RPO-style anchor)
    "ipo_length_normalized": False,  # IPO: divide each log-ratio by its completion length
    "lipo_reduction": "paper",  # LiPO-lambda: paper (sum per list) | rax (authors' code)
    "reward_margin": 0.0,  # Bradley-Terry margin
    "reward_centering": 0.0,  # Bradley-Terry eta * mean((r_w + r_l)^2)
    "train_file": "",  # preference JSON Lines (glob allowed); see docs/alignment.md
    "eval_file": "",  # held-out preference JSON Lines ('' = none)
    "format": "auto",  # auto | pairwise | listwise | samples; auto follows the loss
    "max_len": 64,  # tokens per (prompt, response) row
    "num_responses": 0,  # listwise K (lists padded to it); 0 = the largest list in the data
    "overlong": "error",  # error | truncate: rows longer than max_len
    "on_tie": "error",  # error | skip: tied pairs/lists in the files
    "policy_checkpoint": "",  # workdir (or checkpoint dir) of the starting policy; '' = fresh init
    "reference_checkpoint": "",  # the frozen reference; '' = the starting policy
    "precompute_reference": True,  # reference log-probs once up front (else every step)
    "eval_prompts": 64,  # held-out prompts sampled for KL, response length and reward
    "eval_samples": 1,  # samples per prompt
    "eval_temperature": 1.0,  # sampling temperature of those samples (1.0: KL is unbiased)
    "eval_max_new_tokens": 8,  # generation budget per sample
    "eval_scorer": "",  # scorer of the samples' reward, e.g. arithmetic_exact ('' = none)
    "eval_at_start": True,  # also evaluate the starting policy (row at step 0)
}


def resolved_format(align_cfg) -> str:
    """'pairwise', 'listwise' or 'samples': the data layout the loss trains on."""
    if align_cfg.format != "auto":
        return align_cfg.format
    if align_cfg.loss in POLICY_GRADIENT_LOSSES:
        return "samples"
    return "listwise" if align_cfg.loss in LISTWISE_LOSSES else "pairwise"


def check_align(align_cfg) -> list[str]:
    """Problems with the `align` group, each naming the field, its value and the fix."""
    a, errors = align_cfg, []
    unknown = sorted(set(a.keys()) - set(ALIGN_DEFAULTS))
    if unknown:
        errors.append(f"unknown align fields {unknown}; valid: {sorted(ALIGN_DEFAULTS)}")
    if a.loss not in LOSSES:
        errors.append(f"align.loss={a.loss!r}; use one of {', '.join(LOSSES)}")
    if a.format not in FORMATS:
        errors.append(f"align.format={a.format!r}; use one of {FORMATS}")
    elif a.loss in PAIRWISE_LOSSES + REWARD_LOSSES and a.format == "listwise":
        errors.append(
            f"align.loss={a.loss!r} is pairwise but align.format='listwise'; use a listwise "
            f"loss ({', '.join(LISTWISE_LOSSES)}) or pairwise data"
        )
    elif (a.loss in POLICY_GRADIENT_LOSSES) != (resolved_format(a) == "samples"):
        errors.append(
            f"align.loss={a.loss!r} with align.format={a.format!r}: the policy-gradient losses "
            f"({', '.join(POLICY_GRADIENT_LOSSES)}) and only they train on 'samples' files"
        )
    if a.lipo_reduction not in LIPO_REDUCTIONS:
        errors.append(f"align.lipo_reduction={a.lipo_reduction!r}; use one of {LIPO_REDUCTIONS}")
    for name in ("beta", "gamma"):
        if not a[name] > 0:
            errors.append(f"align.{name}={a[name]} must be > 0")
    if not 0.0 <= a.label_smoothing < 0.5:
        errors.append(f"align.label_smoothing={a.label_smoothing} must be in [0, 0.5)")
    for name in (
        "slic_reg_weight",
        "nll_weight",
        "reward_centering",
        "num_responses",
        "eval_prompts",
    ):
        if a[name] < 0:
            errors.append(f"align.{name}={a[name]} must be >= 0")
    for name in ("eval_samples", "eval_max_new_tokens"):
        if a[name] < 1:
            errors.append(f"align.{name}={a[name]} must be >= 1")
    if a.max_len < 2:
        errors.append(f"align.max_len={a.max_len} must be >= 2")
    if not a.eval_temperature > 0:
        errors.append(f"align.eval_temperature={a.eval_temperature} must be > 0")
    if a.overlong not in ("error", "truncate"):
        errors.append(f"align.overlong={a.overlong!r}; use 'error' or 'truncate'")
    if a.on_tie not in ("error", "skip"):
        errors.append(f"align.on_tie={a.on_tie!r}; use 'error' or 'skip'")
    if not a.train_file:
        errors.append(
            "align.train_file is empty; point it at preference JSON Lines (make them with "
            "`lm-align preferences`, see docs/alignment.md)"
        )
    if a.nll_weight and a.loss in REWARD_LOSSES:
        errors.append(
            f"align.nll_weight={a.nll_weight} applies to policies; a reward model "
            f"(align.loss={a.loss!r}) has no likelihood to anchor, set it to 0"
        )
    if a.eval_scorer:
        from lm_align.data.scorers import SCORERS

        if a.eval_scorer not in SCORERS:
            errors.append(f"align.eval_scorer={a.eval_scorer!r}; use one of {sorted(SCORERS)}")
    return errors


def align_base_config():
    """`lm_align.train.base_config()` plus the `align` group with its defaults."""
    from lm_align.train.config import base_config

    cfg = base_config()
    cfg.align = dict(ALIGN_DEFAULTS)
    return cfg
