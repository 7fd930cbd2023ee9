"""LR x width x qk-layernorm: does the optimal LR transfer, and does qk-LN lower LR sensitivity?

    lm-align sweep --config experiments/lr_width.py --workdir runs/lr_width --parallel 2
    lm-align plot --sweep runs/lr_width

24 runs of 150 steps (about 8 minutes on 2 CPU cores); see docs/sweeps.md.
"""

from lm_align.config import parse_arg
from lm_align.train.config import base_config


def get_config(arg=None):
    parse_arg(arg)  # no variants: any `:arg` is an error
    cfg = base_config()
    cfg.train.steps = 150
    cfg.train.batch_size = 16
    cfg.train.log_every = 1  # a metrics row every step
    cfg.train.eval_every = 0  # evaluate once, at the end
    cfg.train.answer_eval_examples = 0
    cfg.train.progress = False
    cfg.train.tensorboard = False
    cfg.model.vocab_size = 259  # byte tokenizer
    cfg.model.n_layers = 2
    cfg.model.n_heads = 2
    cfg.model.d_model = 32
    cfg.model.d_ff = 128
    cfg.optimizer.name = "adamw"
    cfg.optimizer.warmup_steps = 15
    cfg.optimizer.schedule = "cosine"
    cfg.optimizer.end_lr = 1e-5
    cfg.data.source = "arithmetic"
    cfg.data.seq_len = 32
    return cfg


def get_sweep(arg=None):
    return [
        {"optimizer.lr": lr, "model.d_model": d, "model.d_ff": 4 * d, "model.qk_layernorm": qk}
        for qk in (True, False)
        for d in (32, 64)
        for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    ]
