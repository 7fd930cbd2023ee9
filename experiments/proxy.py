"""Small-scale proxy for attention-logit-growth instability (Wortsman et al. 2023).

The paper's proxy setup, scaled down to run on a CPU: AdamW (b1 0.9, b2 0.95,
eps 1e-8), gradient clipping at global norm 1, linear warmup then cosine to
1e-5, independent weight decay 1e-4, z-loss 1e-4, pre-LN, no biases, RoPE,
untied embeddings, GeLU MLP of width 4d, LayerNorm eps 1e-6.

    lm-align train --config experiments/proxy.py                 # one run, qk-layernorm on
    lm-align train --config experiments/proxy.py:no_qk_ln        # the same without it
    lm-align sweep --config experiments/proxy.py --workdir runs/proxy_sweep
    lm-align plot  --sweep runs/proxy_sweep --compare model.qk_layernorm

The sweep crosses the paper's LR grid {3e-4 ... 3e-1} with qk-layernorm on and
off; docs/scaling.md shows the resulting loss-vs-LR curves, LR sensitivity and
max attention logits.

Variant options (`lm_align.config.parse_arg`; docs/configs.md, "Variants"):
`qk_ln` (bool, default true): qk-layernorm on; `:no_qk_ln` is `:qk_ln=false`.
"""

from lm_align.config import parse_arg
from lm_align.train.config import base_config

LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def get_config(arg=None):
    opts = parse_arg(arg, qk_ln=True)
    cfg = base_config()

    cfg.train.steps = 300
    cfg.train.batch_size = 16
    cfg.train.log_every = 25
    cfg.train.eval_every = 0  # held-out loss at the end only
    cfg.train.eval_batches = 4
    cfg.train.checkpoint_every = 0
    cfg.train.z_loss_coef = 1e-4
    cfg.train.answer_eval_examples = 0
    cfg.train.nonfinite = "halt"  # a diverged run is recorded as diverged by `sweep`

    cfg.model.d_model = 128
    cfg.model.n_layers = 3
    cfg.model.n_heads = 4  # head_dim 32
    cfg.model.d_ff = 512  # 4d
    cfg.model.activation = "gelu"
    cfg.model.position = "rope"
    cfg.model.norm = "layernorm"
    cfg.model.norm_eps = 1e-6
    cfg.model.use_bias = False
    cfg.model.tie_embeddings = False
    cfg.model.qk_layernorm = opts.qk_ln

    cfg.optimizer.name = "adamw"
    cfg.optimizer.lr = 1e-2
    cfg.optimizer.b1 = 0.9
    cfg.optimizer.b2 = 0.95
    cfg.optimizer.eps = 1e-8
    cfg.optimizer.clip_norm = 1.0
    cfg.optimizer.weight_decay = 1e-4
    cfg.optimizer.independent_weight_decay = True
    cfg.optimizer.warmup_steps = 30
    cfg.optimizer.schedule = "cosine"
    cfg.optimizer.end_lr = 1e-5

    cfg.data.source = "arithmetic"
    cfg.data.seq_len = 64
    cfg.data.arithmetic_digits = 3
    cfg.data.arithmetic_operators = "+*"
    return cfg


def get_sweep(arg=None):
    return [
        {"optimizer.lr": lr, "model.qk_layernorm": qk} for qk in (True, False) for lr in LR_GRID
    ]
