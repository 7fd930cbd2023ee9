"""Preference, self-training and BoN-aware methods on arithmetic, against continued SFT.

    lm-align align-study --config experiments/align_arithmetic.py --workdir runs/align_study
    lm-align align-study --config experiments/align_arithmetic.py:quick ...   # minutes, for CI

The start policy (`:base`, `lm_align.presets.arithmetic_corrupted_policy`) is
the default 2-digit-addition model trained to convergence (600 steps) on
demonstrations that drop the lowest carry in 80% of the carry problems; the
exact-match verifier checks the true sum, so the policy's own samples carry a
signal its demonstrations lack. The study (`lm_align/align/study.py`) samples
16 responses to each of 1024 distinct train problems from it (temperature 1,
its own distribution) and builds every method's data from those samples:
pairs are one verified-correct vs one incorrect response of a problem (soft
labels from the graded score at temperature 0.25). Every method starts from
the same policy and sees about 32 records per update for 100 updates (AdamW,
constant learning rate after 5 warmup steps, chosen per method on validation
problems: `LEARNING_RATES`); every policy is evaluated on the same 512
distinct held-out problems.

Rows (`METHODS`), each with its paper and the hyperparameters chosen for
answers of 2-4 tokens (a sequence log-ratio of a few nats; the published
settings are sized for responses of hundreds of tokens):
- `control`: continued SFT on the same corrupted demonstrations (the control
  that shows what more training alone does);
- `sft_chosen`: SFT on the chosen response of every pair (the honest baseline
  of the pairwise methods: the same data, no negative);
- `rest_em`: ReST-EM iteration 1 (Singh et al. 2024): SFT from the start on
  up to 4 verified samples per problem;
- `dpo` (beta 1), `ipo` (tau 0.5: a target margin of 1 nat), `slic`
  (SLiC-HF, margin 1, regularizer 0.1), `geometric_dpo` (beta 1, soft
  labels) on sample-and-rank pairs;
- `dpo_beta01`: DPO at the published beta 0.1, the negative control (on
  2-token answers the loss never saturates);
- `rso`: RSO (Liu et al. 2024) with hinge-norm loss (gamma 1) on pairs of
  statistically rejection-sampled responses (8 of 16, beta 0.5), against
  `rso_sr`, the same loss on sample-and-rank pairs;
- `lipo_lambda`: LiPO-lambda (beta 1) on lists of the same samples DPO's
  pairs came from;
- `bon_rlb`, `bon_rlb_p`, `bon_aware_sft`, `bon_imitation`: the BoN-aware
  methods (Chow et al. 2024) with N = 8, against `reinforce` (the same
  samples without BoN weighting) and `bon_sft` (SFT on the verifier's best of 8).

Beside the rows, the study trains a Bradley-Terry reward model on the pairs
(stage `bradley_terry`, from the start policy, lr 1e-4) and reports bon@8 with
it as the selector for every policy.

Variant options (`lm_align.config.parse_arg`; docs/configs.md, "Variants"):
- `stage`: `base` (the start policy), a method of `METHODS` or any other
  `align.loss` (its config at beta 1); default `dpo`. A bare first item is
  the stage: `:dpo` is `:stage=dpo`.
- `quick`: the shortened study of the tests (a 250-step base, 4 methods,
  10-step runs, 64 problems).

Single runs from a finished study: `lm-align align --config
experiments/align_arithmetic.py:dpo --config.align.policy_checkpoint=runs/align_study/base
--config.align.train_file=runs/align_study/data/pairs.jsonl`.
"""

from lm_align.align.config import LOSSES, POLICY_GRADIENT_LOSSES, align_base_config
from lm_align.config import OneOf, parse_arg
from lm_align.presets import arithmetic_corrupted_policy

# method -> (loss or "sft", data file of the study's data stage, the paper's claim, target)
METHODS = {
    "control": ("sft", None, "more SFT on the demonstrations gains little (control)", None),
    "sft_chosen": ("sft", "chosen", "baseline: SFT on the chosen answers", None),
    "rest_em": ("sft", "kept", "ReST-EM iteration 1 beats the start", None),
    "dpo": ("dpo", "pairs", "DPO beats the SFT start", None),
    "dpo_beta01": ("dpo", "pairs", "negative control: beta 0.1 is sized for long answers", None),
    "ipo": ("ipo", "pairs", "IPO beats the SFT start", None),
    "slic": ("slic", "pairs", "SLiC-HF beats the SFT start", None),
    "rso": ("rso_hinge_norm", "rso_pairs", "RSO beats sample-and-rank (rso_sr)", None),
    "rso_sr": ("rso_hinge_norm", "pairs", "sample-and-rank with RSO's loss", None),
    "geometric_dpo": ("geometric_dpo", "pairs", "soft labels help DPO", None),
    "lipo_lambda": ("lipo_lambda", "lists", "LiPO-lambda beats DPO on the same samples", None),
    "bon_rlb": ("bon_rlb", "samples", "BoN-aware RL raises pass@N", "pass@8"),
    "bon_rlb_p": ("bon_rlb_p", "samples", "BoN-RLB(P) raises pass@N", "pass@8"),
    "bon_aware_sft": ("bon_aware_sft", "samples", "BoN-aware SFT raises pass@N", "pass@8"),
    "bon_imitation": ("bon_imitation", "samples", "BoN imitation raises pass@N", "pass@8"),
    "reinforce": ("reinforce", "samples", "REINFORCE raises pass@1 (not BoN-aware)", "pass@1"),
    "bon_sft": ("bon_sft", "samples", "SFT on the best of N", None),
}
# The claims that compare two methods: method -> the method it should beat.
COMPARISONS = {
    "sft_chosen": "control", "rest_em": "sft_chosen", "dpo": "sft_chosen",
    "dpo_beta01": "dpo", "rso": "rso_sr", "geometric_dpo": "dpo", "lipo_lambda": "dpo",
    "bon_rlb": "bon_sft", "bon_rlb_p": "bon_sft", "bon_aware_sft": "bon_sft",
    "bon_imitation": "bon_sft", "reinforce": "bon_sft",
}  # fmt: skip

# Learning rates (AdamW, constant after 5 warmup steps), each method's best of
# {1e-5, 3e-5, 1e-4} on its target metric, seed 0, measured on 512 validation
# problems: distinct train-split problems the data stage did not sample
# (docs/alignment.md, "Choosing the learning rates"). The control and the
# negative control take the rate of the method they control.
LEARNING_RATES = {
    "control": 1e-4, "sft_chosen": 1e-4, "rest_em": 1e-4, "dpo": 1e-5, "dpo_beta01": 1e-5,
    "ipo": 3e-5, "slic": 3e-5, "rso": 3e-5, "rso_sr": 3e-5, "geometric_dpo": 1e-5,
    "lipo_lambda": 1e-4, "bon_rlb": 1e-6, "bon_rlb_p": 1e-4, "bon_aware_sft": 1e-4,
    "bon_imitation": 1e-4, "reinforce": 1e-5, "bon_sft": 1e-4,
}  # fmt: skip
QUICK_METHODS = ("rest_em", "dpo", "lipo_lambda", "bon_rlb")  # the control's kind: rl-study


STAGES = ("base", *METHODS, *(loss for loss in LOSSES if loss not in METHODS))


def _options(arg):
    return parse_arg(arg, stage=OneOf("dpo", STAGES), quick=False)


def get_study(arg=None):
    quick = _options(arg).quick
    methods = QUICK_METHODS if quick else tuple(METHODS)
    k = 4 if quick else 8
    return {
        "methods": methods,
        "seeds": (0,) if quick else (0, 1),
        "one_seed": tuple(m for m in ("control",) if m in methods),
        "data": {
            "num_prompts": 256 if quick else 1024,
            "num_candidates": 8 if quick else 16,
            "num_samples": 4 if quick else 8,
            "temperature": 1.0,
            "top_k": 0,
            "max_new_tokens": 8,
            "scorer": "arithmetic_exact",
            "label_scorer": "arithmetic_graded",
            "pairing": "best_worst",
            "soft_label_temperature": 0.25,
            "rso_beta": 0.5,
            "max_per_problem": 4,
        },
        "method_data": {m: METHODS[m][1] for m in methods if METHODS[m][1]},
        "targets": {m: METHODS[m][3].replace("8", str(k)) for m in methods if METHODS[m][3]},
        "claims": {m: METHODS[m][2] for m in methods},
        "comparisons": {m: o for m, o in COMPARISONS.items() if m in methods and o in methods},
        "reward_model": "bradley_terry",  # bon@k's second selector, trained on the pairs
        "eval_problems": 64 if quick else 512,
        "eval_samples": k,
    }


def get_config(arg=None):
    opts = _options(arg)
    quick = opts.quick
    if opts.stage == "base":
        cfg = arithmetic_corrupted_policy(quick)
        if quick:  # accurate enough that a few hundred problems give correct samples
            cfg.train.steps = 250
        return cfg
    loss = METHODS[opts.stage][0] if opts.stage in METHODS else opts.stage
    if loss == "sft":
        cfg = arithmetic_corrupted_policy(quick)
        cfg.train.steps = 10 if quick else 100
        cfg.train.batch_size = 6  # packed rows of about 6 problems: ~32 records, as below
        cfg.optimizer.lr = LEARNING_RATES.get(opts.stage, 1e-4)
        cfg.optimizer.schedule = "constant"
        cfg.optimizer.warmup_steps = 5
        return cfg
    cfg = align_base_config()
    cfg.data = arithmetic_corrupted_policy().data  # the held-out split of the evaluations
    cfg.align.loss = loss
    cfg.align.beta = 0.1 if opts.stage == "dpo_beta01" else 1.0
    if loss == "ipo":
        cfg.align.beta = 0.5  # tau: target log-ratio margin 1 / (2 tau) = 1 nat
    cfg.align.gamma = 1.0
    cfg.align.margin = 1.0
    cfg.align.slic_reg_weight = 0.1
    cfg.align.max_len = 24
    if loss in POLICY_GRADIENT_LOSSES:
        cfg.align.format = "samples"
    cfg.train.steps = 10 if quick else 100
    cfg.train.batch_size = 16 if quick else 32
    cfg.train.log_every = 5 if quick else 25
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 0
    cfg.train.answer_eval_examples = 0
    cfg.optimizer.name = "adamw"
    cfg.optimizer.lr = LEARNING_RATES.get(opts.stage, 1e-4)
    cfg.optimizer.end_lr = 0.0
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.warmup_steps = 5
    cfg.optimizer.weight_decay = 0.0
    cfg.optimizer.clip_norm = 1.0
    return cfg
