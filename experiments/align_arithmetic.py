"""Alignment on arithmetic: SFT a policy, preferences from its own samples, six methods.

    lm-align align-study --config experiments/align_arithmetic.py --workdir runs/align_arithmetic
    lm-align align-study --config experiments/align_arithmetic.py:quick ...   # minutes, for CI

Stages (lm_align/align/study.py): the default 2-digit addition model trained
for 320 steps (greedy held-out accuracy about 0.47, clearly between 0 and 1);
8 samples per train prompt at temperature 0.7, top-k 40 scored by the
exact-match verifier; pairs by first-round rank with soft labels
p = sigmoid((g_w - g_l) / 0.25) from the graded scorer (a near miss is a less
certain loser than garbage), lists of the distinct samples labelled by the
graded scorer; then DPO, SLiC-HF, IPO, RSO hinge-norm, geometric DPO and
LiPO-lambda from the same start, each 100 steps of 32 records.

Variant options (`lm_align.config.parse_arg`; docs/configs.md, "Variants"):
- `stage`: `sft` (the starting policy's training config) or a preference loss
  name (that method's align config); default `dpo`. A bare first item is the
  stage: `:dpo` is `:stage=dpo`.
- `quick`: the shortened study of the tests (fewer prompts, steps, methods).

Single runs: `lm-align align --config experiments/align_arithmetic.py:dpo
--config.align.policy_checkpoint=runs/align_arithmetic/sft
--config.align.train_file=runs/align_arithmetic/prefs/pairs.jsonl`.
"""

from lm_align.align.config import (
    LISTWISE_LOSSES,
    PAIRWISE_LOSSES,
    REWARD_LOSSES,
    align_base_config,
)
from lm_align.config import OneOf, parse_arg
from lm_align.presets import arithmetic_lm, arithmetic_start_policy

METHODS = ("dpo", "slic", "ipo", "rso_hinge_norm", "geometric_dpo", "lipo_lambda")
STAGES = ("sft", *PAIRWISE_LOSSES, *LISTWISE_LOSSES, *REWARD_LOSSES)


def _options(arg):
    return parse_arg(arg, stage=OneOf("dpo", STAGES), quick=False)


def get_study(arg=None):
    quick = _options(arg).quick
    return {
        "methods": ("dpo", "lipo_lambda") if quick else METHODS,
        "preferences": {
            "num_prompts": 256 if quick else 4096,
            "num_samples": 4 if quick else 8,
            "max_new_tokens": 8,
            "temperature": 0.7,
            "top_k": 40,
            "seed": 0,
            "scorer": "arithmetic_exact",
            "label_scorer": "arithmetic_graded",
            "soft_label_temperature": 0.25,
            "pairs_method": "first_round",
        },
    }


def get_config(arg=None):
    opts = _options(arg)
    quick = opts.quick
    if opts.stage == "sft":
        cfg = arithmetic_start_policy(quick)
        cfg.train.answer_eval_examples = 64 if quick else 512
        return cfg

    cfg = align_base_config()
    cfg.data = arithmetic_lm().data  # held-out prompts for greedy accuracy and samples
    cfg.align.loss = opts.stage
    cfg.align.beta = 0.1
    cfg.align.gamma = 0.05
    cfg.align.slic_reg_weight = 0.1
    cfg.align.eval_scorer = "arithmetic_exact"
    cfg.align.eval_prompts = 32 if quick else 256
    cfg.align.eval_max_new_tokens = 8
    cfg.align.max_len = 24
    cfg.train.steps = 10 if quick else 100
    cfg.train.batch_size = 16 if quick else 32
    cfg.train.log_every = 5 if quick else 25
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 50
    cfg.train.answer_eval_examples = 64 if quick else 512
    cfg.optimizer.name = "adamw"
    cfg.optimizer.lr = 3e-5
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.warmup_steps = 10
    cfg.optimizer.weight_decay = 0.0
    cfg.optimizer.clip_norm = 1.0
    return cfg
