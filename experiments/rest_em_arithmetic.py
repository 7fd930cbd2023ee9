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

Variant options (`lm_align.config.parse_arg`; docs/configs.md, "Variants"):
- `stage`: `base` (the base policy's training config, the default) or `mstep`
  (the fine-tuning config of each iteration); a bare first item is the stage.
- `quick`: the shortened run of the tests.
"""

from lm_align.config import OneOf, parse_arg
from lm_align.presets import arithmetic_start_policy


def _options(arg):
    return parse_arg(arg, stage=OneOf("base", ("base", "mstep")), quick=False)


def get_rest_em(arg=None):
    quick = _options(arg).quick
    return {
        "iterations": 2 if quick else 3,
        "num_problems": 128 if quick else 2048,
        "num_samples": 4 if quick else 8,
        "temperature": 0.7,
        "top_k": 40,
        "max_new_tokens": 8,
        "max_per_problem": 10,
        "scorer": "arithmetic_exact",
        "eval_problems": 32 if quick else 512,
        "eval_samples": 4 if quick else 8,
        "seed": 0,
    }


def get_config(arg=None):
    opts = _options(arg)
    quick = opts.quick
    cfg = arithmetic_start_policy(quick)
    if opts.stage == "base":
        cfg.train.answer_eval_examples = 0  # evaluated by rest-em itself
        return cfg
    cfg.train.steps = 15 if quick else 150
    cfg.train.eval_batches = 1
    cfg.optimizer.lr = 1e-3
    cfg.optimizer.warmup_steps = 10 if quick else 20
    cfg.optimizer.schedule = "cosine"
    return cfg
