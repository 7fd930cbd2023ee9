"""Online RL (GRPO, Dr. GRPO, DAPO, RLOO) on arithmetic with the exact-match verifier.

    lm-align rl-study --config experiments/rl_arithmetic.py --workdir runs/rl_study
    lm-align train --config experiments/rl_arithmetic.py:base --workdir runs/rl_base
    lm-align rl --config experiments/rl_arithmetic.py:grpo,policy=runs/rl_base --workdir runs/grpo
    lm-align rl --config experiments/rl_arithmetic.py:dapo,policy=runs/rl_base,lora=8 ...

The start policy (`:base`) is the default 2-digit-addition model trained to
convergence (600 steps) on demonstrations with a systematic error: in 80% of
the problems whose sum carries, the demonstrated answer drops the lowest carry
(`data.arithmetic_corruption = dropped_carry`). The verifier checks the true
sum, so it rewards what the demonstrations do not teach. The control
(`:control`) continues SFT from the base on the same demonstrations for as
many updates as an RL run. Each RL run samples 8 responses to each of 16
train prompts per rollout (temperature 1, the policy's own distribution),
rewards them 1/0 with the exact-match verifier, and takes one AdamW update per
rollout (lr 1e-4, constant after 5 warmup steps), 300 rollouts; greedy accuracy,
pass@1 and pass@4 on 256 distinct held-out problems every 100 steps.

Variant options (`lm_align.config.parse_arg`; docs/configs.md, "Variants"):
- `stage`: `base` (the start policy's `lm-align train` config), `control`
  (continued SFT, `train.init_from` set by the study) or an algorithm of
  `lm_align.align.rl_config.ALGORITHMS` (its recipe); a bare first item is the stage.
- `policy`: the start policy's workdir (for the RL stages).
- `lora`: LoRA rank (0 = train every weight); the reference is then the base.
- `quick`: the shortened run of the tests (10 rollouts of 8 prompts x 4).
"""

from lm_align.align.rl_config import ALGORITHMS, rl_base_config
from lm_align.config import OneOf, parse_arg
from lm_align.presets import arithmetic_corrupted_policy


def _options(arg):
    return parse_arg(
        arg, stage=OneOf("grpo", ("base", "control", *ALGORITHMS)), policy="", lora=0,
        quick=False,
    )  # fmt: skip


def get_rl_study(arg=None):
    quick = _options(arg).quick
    algorithms = ("grpo",) if quick else ("grpo", "dr_grpo", "dapo")
    return {
        "methods": ("control", *algorithms),
        "seeds": (0,) if quick else (0, 1),
        "one_seed": ("control",),
        "eval_problems": 32 if quick else 512,
        "eval_samples": 4 if quick else 8,
    }


def get_config(arg=None):
    opts = _options(arg)
    quick = opts.quick
    if opts.stage in ("base", "control"):
        cfg = arithmetic_corrupted_policy(quick)
        if opts.stage == "control":  # as many updates as an RL run, at its learning rate
            rl = get_config("grpo,quick" if quick else "grpo")
            cfg.train.steps = rl.train.steps
            cfg.optimizer.lr = rl.optimizer.lr
            cfg.optimizer.schedule = "constant"
            cfg.optimizer.warmup_steps = rl.optimizer.warmup_steps
        return cfg
    cfg = rl_base_config(opts.stage)
    cfg.data = arithmetic_corrupted_policy().data  # prompts: train split; evaluation: eval split
    cfg.rl.policy_checkpoint = opts.policy
    cfg.rl.scorer = "arithmetic_exact"
    cfg.rl.group_size = 4 if quick else 8
    cfg.rl.max_new_tokens = 8
    cfg.rl.max_len = 24
    cfg.rl.eval_prompts = 32 if quick else 256
    cfg.rl.eval_samples = 4
    cfg.train.batch_size = 8 if quick else 16  # prompts per rollout
    cfg.train.steps = 10 if quick else 300
    cfg.train.log_every = 5 if quick else 25
    cfg.train.eval_every = 0 if quick else 100
    cfg.train.checkpoint_every = 5 if quick else 100
    cfg.train.answer_eval_examples = 0
    cfg.optimizer.name = "adamw"
    cfg.optimizer.lr = 1e-4
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.warmup_steps = 5
    cfg.optimizer.weight_decay = 0.0
    cfg.lora.rank = opts.lora
    if opts.lora:
        cfg.lora.alpha = 2.0 * opts.lora
        cfg.optimizer.lr = 1e-3
    return cfg
