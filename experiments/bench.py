"""Benchmark model: 4 layers, d_model 256, 4 heads, d_ff 1024, vocab 8192,
seq 256, batch 16, float32 (the shape the engine's MFU target is stated for).

    lm-align bench                       # this file
    lm-align bench --json --config.train.batch_size=32
"""

from lm_align.train.config import base_config


def get_config(arg=None):
    cfg = base_config()
    cfg.train.batch_size = 16
    cfg.train.steps = 1000  # only shapes the LR schedule here

    cfg.model.vocab_size = 8192
    cfg.model.d_model = 256
    cfg.model.n_layers = 4
    cfg.model.n_heads = 4
    cfg.model.d_ff = 1024
    cfg.model.activation = "gelu"
    cfg.model.dtype = "float32"  # use bfloat16 on GPU/TPU
    cfg.model.param_dtype = "float32"

    cfg.data.seq_len = 256
    return cfg
