"""LR transfer across widths under different parameterizations (Everett et al. 2024).

Each variant sweeps width x peak LR for one parameterization; `lm-align plot`
then finds the optimal LR per width and how many grid steps it moves:

    lm-align sweep --config experiments/transfer.py:mup --workdir runs/transfer_mup
    lm-align sweep --config experiments/transfer.py:sp  --workdir runs/transfer_sp
    lm-align plot  --sweep runs/transfer_mup
    lm-align plot  --sweep runs/transfer_sp

Variants (the `param` group; widths 32, 64, 128 with head_dim 16, d_ff = 4 d):
- `sp`: standard parameterization, one LR for every layer and width (what most
  code does; `param.base_width = None`, so nothing depends on width).
- `sp_per_layer`: standard with Everett et al.'s per-layer Adam exponents
  (embedding 0, hidden 1, readout 1), base width 32.
- `mup`, `ntk`, `mfp`: those parameterizations with their table LR exponents,
  base width 32 (the smallest model is the tuned proxy).
Any optimizer can be swept the same way, e.g. `--config.optimizer.name=adam_atan2`
or `--config.optimizer.name=muon` (Muon on the hidden matrices at LR scale 1 at
every width, Adam at the variant's scales on the rest; docs/optim.md, "Muon").
The variant is the `variant` option of `lm_align.config.parse_arg` (`:mup` is
`:variant=mup`; docs/configs.md, "Variants"); the default is `mup`. The
`quick` option (`:mup,quick`) is the test suite's version: widths 16 and 32
(base width 16), one LR, 10 steps. `extend=K` adds K factor-2 LRs above the
grid (0.256, ...) for an optimum at the grid's edge, after the grid's runs: the
same workdir then runs only the new ones.
"""

from lm_align.config import OneOf, parse_arg
from lm_align.train.config import base_config

WIDTHS = (32, 64, 128)
# Factor-2 grid: fine enough to see a 4x width change move the SP optimum.
LR_GRID = tuple(round(1e-3 * 2**k, 6) for k in range(8))  # 0.001 ... 0.128
HEAD_DIM = 16
VARIANTS = ("sp", "sp_per_layer", "mup", "ntk", "mfp")
QUICK_WIDTHS = (16, 32)
QUICK_LR_GRID = (0.032,)


def _options(arg):
    return parse_arg(arg, variant=OneOf("mup", VARIANTS), quick=False, extend=0)


def get_config(arg=None):
    opts = _options(arg)
    variant, widths = opts.variant, (QUICK_WIDTHS if opts.quick else WIDTHS)
    cfg = base_config()

    cfg.train.steps = 200
    cfg.train.batch_size = 16
    cfg.train.log_every = 25
    cfg.train.eval_every = 0
    cfg.train.eval_batches = 4
    cfg.train.checkpoint_every = 0
    cfg.train.answer_eval_examples = 0
    cfg.train.z_loss_coef = 1e-4

    cfg.model.d_model = widths[0]
    cfg.model.n_layers = 2
    cfg.model.head_dim = HEAD_DIM
    cfg.model.n_heads = widths[0] // HEAD_DIM
    cfg.model.d_ff = 4 * widths[0]
    cfg.model.qk_layernorm = True

    cfg.optimizer.name = "adamw"
    cfg.optimizer.lr = 1e-2
    cfg.optimizer.b2 = 0.95
    cfg.optimizer.clip_norm = 1.0
    cfg.optimizer.weight_decay = 1e-4
    cfg.optimizer.warmup_steps = 20
    cfg.optimizer.schedule = "cosine"

    cfg.data.seq_len = 64
    cfg.data.arithmetic_digits = 3
    cfg.data.arithmetic_operators = "+*"

    if variant == "sp":
        cfg.param.name = "standard"
        cfg.param.base_width = None
    else:
        cfg.param.name = "standard" if variant == "sp_per_layer" else variant
        cfg.param.base_width = widths[0]
    if opts.quick:
        cfg.train.steps = 10
        cfg.train.log_every = 5
        cfg.train.eval_batches = 1
        cfg.optimizer.warmup_steps = 2
    return cfg


def get_sweep(arg=None):
    opts = _options(arg)
    widths, grid = (QUICK_WIDTHS, QUICK_LR_GRID) if opts.quick else (WIDTHS, LR_GRID)
    # `extend`: more factor-2 LRs above the grid, appended after the grid's runs so that
    # rerunning a finished sweep's workdir with it starts only the new runs.
    above = [round(grid[-1] * 2**k, 6) for k in range(1, opts.extend + 1)]
    return [
        {
            "model.d_model": w,
            "model.n_heads": w // HEAD_DIM,
            "model.d_ff": 4 * w,
            "optimizer.lr": lr,
        }
        for lrs in (grid, above)
        for w in widths
        for lr in lrs
    ]
