"""Online RL (GRPO, Dr. GRPO, DAPO, RLOO) on arithmetic with the exact-match verifier.

    lm-align train --config experiments/rl_arithmetic.py:base --workdir runs/rl_base
    lm-align rl --config experiments/rl_arithmetic.py:grpo,policy=runs/rl_base --workdir runs/grpo
    lm-align rl --config experiments/rl_arithmetic.py:dapo,policy=runs/rl_base,lora=8 ...

The start policy (`:base`) is the 2-digit-addition model of the alignment
studies, trained for 320 steps. Each RL run samples 8 responses to each of 16
train prompts per rollout (temperature 1, the policy's own distribution),
rewards them 1/0 with the exact-match verifier, and takes one AdamW update per
rollout (lr 1e-4, constant after 5 warmup steps), 100 rollouts; greedy accuracy,
pass@1 and pass@4 on 256 held-out problems at steps 0, 50 and 100.

Variant options (`lm_align.config.parse_arg`; docs/configs.md, "Variants"):
- `stage`: `base` (the start policy's `lm-align train` config) or an algorithm
  of `lm_align.align.rl.ALGORITHMS` (its recipe); a bare first item is the stage.
- `policy`: the start policy's workdir (for the RL stages).
- `lora`: LoRA rank (0 = train every weight); the reference is then the base.
- `quick`: the shortened run of the tests (10 rollouts of 8 prompts x 4).
"""

from lm_align.align.rl_config import ALGORITHMS, rl_base_config
from lm_align.config import OneOf, parse_arg
from lm_align.presets import arithmetic_lm, arithmetic_start_policy


def _options(arg):
    return parse_arg(
        arg, stage=OneOf("grpo", ("base", *ALGORITHMS)), policy="", lora=0, quick=False
    )


def get_config(arg=None):
    opts = _options(arg)
    quick = opts.quick
    if opts.stage == "base":
        cfg = arithmetic_start_policy(quick)
        cfg.train.answer_eval_examples = 0
        return cfg
    cfg = rl_base_config(opts.stage)
    cfg.data = arithmetic_lm().data  # prompts: the train split; evaluation: the eval split
    cfg.rl.policy_checkpoint = opts.policy
    cfg.rl.scorer = "arithmetic_exact"
    cfg.rl.group_size = 4 if quick else 8
    cfg.rl.max_new_tokens = 8
    cfg.rl.max_len = 24
    cfg.rl.eval_prompts = 32 if quick else 256
    cfg.rl.eval_samples = 4
    cfg.train.batch_size = 8 if quick else 16  # prompts per rollout
    cfg.train.steps = 10 if quick else 100
    cfg.train.log_every = 5 if quick else 10
    cfg.train.eval_every = 0 if quick else 50
    cfg.train.checkpoint_every = 5 if quick else 50
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
