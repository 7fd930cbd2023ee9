"""Adam's epsilon across widths: a fixed epsilon, per-layer epsilon, Adam-atan2 (Everett et al. 2024).

Adam's step is m / (sqrt(v) + eps). Under muP the hidden layers' gradients
shrink like 1/width, so a fixed eps that is negligible at the base width
grows relative to them as the model widens and quietly shrinks their steps.
A CPU cannot reach the widths where eps = 1e-8 matters, so this study raises
eps instead (to 1e-6 ... 1e-4, the size of this model's gradients, ~1e-4 per
entry) and widens 8x, from the base width 32 to 256: each width trained with

- a fixed eps (`param.per_layer_eps=false`): the same eps at every width;
- per-layer eps (`param.per_layer_eps=true`): eps * (n / 32)^(-g_l), scaled
  like each layer's gradient (the parameterization's epsilon exponents);
- Adam-atan2 (`optimizer.name=adam_atan2`): no epsilon at all.

Everything else is `experiments/transfer.py:mup` (muP, base width 32, 2 layers,
head_dim 16, AdamW b2 0.95, 200 steps on 3-digit arithmetic) at LR 0.02, its
optimum at every width (docs/scaling.md, "Study 2"). At width 32 the fixed and
per-layer runs are the same run (a check: their losses must agree exactly).

    lm-align sweep --config experiments/adam_eps.py --workdir runs/adam_eps
    lm-align plot  --sweep runs/adam_eps --lines --x optimizer.eps \
        --group model.d_model --compare param.per_layer_eps

Variant options (`lm_align.config.parse_arg`; docs/configs.md, "Variants"):
`width` (int): only that width's runs (the seed repeats:
`lm-align sweep --config experiments/adam_eps.py:width=256 --config.train.seed=1`);
`quick` (bool): the test suite's version (widths 16 and 32, eps 1e-4,
Adam-atan2 at width 32 only, 10 steps).
"""

import os

from lm_align.config import load_experiment_module, parse_arg

_transfer = load_experiment_module(os.path.join(os.path.dirname(__file__), "transfer.py"))
HEAD_DIM = _transfer.HEAD_DIM

WIDTHS = (32, 64, 128, 256)
EPS_GRID = (1e-8, 1e-6, 1e-5, 1e-4)
QUICK_WIDTHS = (16, 32)
QUICK_EPS_GRID = (1e-4,)
LR = 0.02


def _options(arg):
    return parse_arg(arg, quick=False, width=0)


def get_config(arg=None):
    quick = _options(arg).quick
    cfg = _transfer.get_config("mup")
    cfg.optimizer.lr = LR
    if quick:
        cfg.train.steps = 10
        cfg.train.log_every = 5
        cfg.optimizer.warmup_steps = 2
        cfg.train.eval_batches = 1
        cfg.param.base_width = QUICK_WIDTHS[0]
        cfg.model.d_model = QUICK_WIDTHS[0]
        cfg.model.n_heads = QUICK_WIDTHS[0] // HEAD_DIM
        cfg.model.d_ff = 4 * QUICK_WIDTHS[0]
    return cfg


def get_sweep(arg=None):
    opts = _options(arg)
    widths, grid = (QUICK_WIDTHS, QUICK_EPS_GRID) if opts.quick else (WIDTHS, EPS_GRID)
    widths = [w for w in widths if w == opts.width] if opts.width else widths
    size = [
        {"model.d_model": w, "model.n_heads": w // HEAD_DIM, "model.d_ff": 4 * w} for w in widths
    ]
    runs = [
        {**s, "param.per_layer_eps": per_layer, "optimizer.eps": eps}
        for s in size
        for per_layer in (False, True)
        for eps in grid
    ]
    atan2 = size[-1:] if opts.quick else size  # quick: at the wider width only
    return runs + [{**s, "optimizer.name": "adam_atan2"} for s in atan2]
