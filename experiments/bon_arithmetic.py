"""BoN-aware RL and imitation (Chow et al. 2024) vs REINFORCE vs SFT on best-of-N, on arithmetic.

    lm-align bon --config experiments/bon_arithmetic.py --workdir runs/bon
    lm-align bon --config experiments/bon_arithmetic.py:quick ...   # minutes, for CI

Start policy: the default 2-digit-addition model trained for 320 steps (greedy
held-out accuracy about 0.47). N = 8 samples per problem at temperature 1 on
4096 train problems, binary exact-match rewards; each method trains 128 steps
of 32 problems (x 8 samples: one pass over the problems) from the start
policy, AdamW lr 3e-4.

Variant options (`lm_align.config.parse_arg`; docs/configs.md, "Variants"):
- `stage`: `base` (the start policy's training config, the default) or a
  policy-gradient loss (`bon_rlb_p`, `bon_rlb`, `bon_aware_sft`,
  `bon_imitation`, `reinforce`, `bon_sft`: that method's align config); a bare
  first item is the stage.
- `quick`: the shortened run of the tests.
"""

from lm_align.align.config import POLICY_GRADIENT_LOSSES, align_base_config
from lm_align.config import OneOf, parse_arg
from lm_align.presets import arithmetic_lm, arithmetic_start_policy


def _options(arg):
    return parse_arg(arg, stage=OneOf("base", ("base", *POLICY_GRADIENT_LOSSES)), quick=False)


def get_bon(arg=None):
    quick = _options(arg).quick
    return {
        "methods": (
            "bon_rlb_p",
            "bon_rlb",
            "bon_aware_sft",
            "bon_imitation",
            "reinforce",
            "bon_sft",
        ),
        "rounds": 1,
        "num_problems": 64 if quick else 4096,
        "num_samples": 4 if quick else 8,
        "temperature": 1.0,
        "max_new_tokens": 8,
        "scorer": "arithmetic_exact",
        "eval_problems": 32 if quick else 512,
        "seed": 0,
    }


def get_config(arg=None):
    opts = _options(arg)
    quick = opts.quick
    if opts.stage == "base":
        cfg = arithmetic_start_policy(quick)
        cfg.train.answer_eval_examples = 0
        return cfg
    cfg = align_base_config()
    cfg.data = arithmetic_lm().data
    cfg.align.loss = opts.stage
    cfg.align.format = "samples"
    cfg.align.max_len = 24
    cfg.align.eval_prompts = 0  # evaluated by `lm-align bon`
    cfg.align.eval_at_start = False
    cfg.train.answer_eval_examples = 0
    cfg.train.steps = 4 if quick else 128
    cfg.train.batch_size = 16 if quick else 32
    cfg.train.log_every = 5 if quick else 25
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 50
    cfg.optimizer.lr = 3e-4
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.warmup_steps = 2 if quick else 10
    cfg.optimizer.weight_decay = 0.0
    return cfg
