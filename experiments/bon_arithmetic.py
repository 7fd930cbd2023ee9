"""BoN-aware RL and imitation vs REINFORCE vs SFT on best-of-N, on arithmetic.

    lm-align bon --config experiments/bon_arithmetic.py --workdir runs/bon
    lm-align bon --config experiments/bon_arithmetic.py:quick ...   # minutes, for CI

Start policy: the default 2-digit-addition model trained for 320 steps (greedy
held-out accuracy about 0.47). N = 8 samples per problem at temperature 1 on
4096 train problems, binary exact-match rewards; each method trains 128 steps
of 32 problems (x 8 samples: one pass over the problems) from the start
policy, AdamW lr 3e-4.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import default  # noqa: E402  (experiments/default.py)

from lm_align.align.config import align_base_config  # noqa: E402


def _quick(arg):
    return bool(arg) and "quick" in str(arg).split(",")


def get_bon(arg=None):
    quick = _quick(arg)
    return {
        "methods": ("bon_rl", "bon_imitation", "reinforce", "bon_sft"),
        "rounds": 1,
        "num_problems": 128 if quick else 4096,
        "num_samples": 4 if quick else 8,
        "temperature": 1.0,
        "max_new_tokens": 8,
        "scorer": "arithmetic_exact",
        "eval_problems": 64 if quick else 512,
        "seed": 0,
    }


def get_config(arg=None):
    stage = (arg or "base").split(",")[0]
    quick = _quick(arg)
    if stage == "base":
        cfg = default.get_config()
        cfg.train.steps = 250 if quick else 320
        cfg.train.eval_every = 0
        cfg.train.checkpoint_every = 0
        cfg.train.answer_eval_examples = 0
        return cfg
    cfg = align_base_config()
    cfg.data = default.get_config().data
    cfg.align.loss = stage
    cfg.align.format = "samples"
    cfg.align.max_len = 24
    cfg.align.eval_prompts = 0  # evaluated by `lm-align bon`
    cfg.align.eval_at_start = False
    cfg.train.answer_eval_examples = 0
    cfg.train.steps = 10 if quick else 128
    cfg.train.batch_size = 16 if quick else 32
    cfg.train.log_every = 5 if quick else 25
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 50
    cfg.optimizer.lr = 3e-4
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.warmup_steps = 10
    cfg.optimizer.weight_decay = 0.0
    return cfg
