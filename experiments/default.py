"""Default experiment: a small decoder learns 2-digit addition from scratch.

    lm-align train                      # this file, workdir runs/default
    lm-align train --config.train.steps=2000 --config.optimizer.lr=3e-3

Data: built-in arithmetic problems ("37+5=42"), byte tokens, packed into rows
of 64 tokens. Fits in about 2 minutes on 2 CPU cores.
"""

from lm_align.train.config import base_config


def get_config(arg=None):
    cfg = base_config()

    cfg.train.steps = 600  # optimizer updates
    cfg.train.batch_size = 32  # global sequences per update
    cfg.train.seed = 0
    cfg.train.log_every = 50
    cfg.train.eval_every = 200
    cfg.train.checkpoint_every = 200
    cfg.train.z_loss_coef = 1e-4

    cfg.model.vocab_size = 259  # byte tokenizer: 256 bytes + pad/bos/eos
    cfg.model.d_model = 128
    cfg.model.n_layers = 2
    cfg.model.n_heads = 4
    cfg.model.d_ff = 512
    cfg.model.qk_layernorm = True
    cfg.model.position = "rope"

    cfg.optimizer.name = "adamw"
    cfg.optimizer.lr = 3e-3  # peak
    cfg.optimizer.warmup_steps = 50
    cfg.optimizer.schedule = "cosine"
    cfg.optimizer.end_lr = 1e-5
    cfg.optimizer.weight_decay = 1e-4  # independent: per-step decay 1e-4 * lr_t/lr
    cfg.optimizer.clip_norm = 1.0

    cfg.data.source = "arithmetic"
    cfg.data.seq_len = 64
    cfg.data.arithmetic_digits = 2
    cfg.data.arithmetic_operators = "+"
    return cfg
