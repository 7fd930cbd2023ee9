"""ReST-EM on arithmetic: three rounds of sample -> verify -> fine-tune from the base.

    lm-align rest-em --config experiments/rest_em_arithmetic.py --workdir runs/rest_em
    lm-align rest-em --config experiments/rest_em_arithmetic.py:quick ...   # minutes, for CI

Base policy: the default 2-digit-addition model trained for 320 steps (held-out
greedy accuracy about 0.47). E-step: 2048 fresh train problems per iteration,
8 samples each at temperature 0.7, top-k 40, kept when exactly right (at most
10 per problem). M-step: 150 steps from the base checkpoint on the kept samples,
loss on the completions only. Eval: 512 held-out problems, greedy and 8 samples
each (pass@1/4/8). Start from an existing policy instead with
`--config.`-style edits of get_rest_em(): set base_checkpoint there.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import default  # noqa: E402  (experiments/default.py)


def _quick(arg):
    return bool(arg) and "quick" in str(arg).split(",")


def get_rest_em(arg=None):
    quick = _quick(arg)
    return {
        "iterations": 2 if quick else 3,
        "num_problems": 256 if quick else 2048,
        "num_samples": 4 if quick else 8,
        "temperature": 0.7,
        "top_k": 40,
        "max_new_tokens": 8,
        "max_per_problem": 10,
        "scorer": "arithmetic_exact",
        "eval_problems": 64 if quick else 512,
        "eval_samples": 4 if quick else 8,
        "seed": 0,
    }


def get_config(arg=None):
    stage = (arg or "base").split(",")[0]
    quick = _quick(arg)
    cfg = default.get_config()
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 0
    if stage == "base":
        cfg.train.steps = 250 if quick else 320
        cfg.train.answer_eval_examples = 0  # evaluated by rest-em itself
        return cfg
    if stage != "mstep":
        raise ValueError(f"stage {stage!r}: use base or mstep")
    cfg.train.steps = 30 if quick else 150
    cfg.train.eval_batches = 1
    cfg.optimizer.lr = 1e-3
    cfg.optimizer.warmup_steps = 10 if quick else 20
    cfg.optimizer.schedule = "cosine"
    return cfg
