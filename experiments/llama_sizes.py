"""Llama-style models of about 125M, 1B, 8B and 70B parameters, for `lm-align compile`.

RMSNorm, SwiGLU, RoPE (theta 500k), grouped-query attention, no biases;
bfloat16 compute with float32 parameters and AdamW state; layers scanned and
fully rematerialised; sequences of 2048 tokens. The 1B, 8B and 70B shapes are
Llama 3.2 1B and Llama 3 8B / 70B (vocabulary 128,256); 125m is a GPT-3
Small-sized model with a 32,000-token vocabulary. All chips shard the
parameters (mesh fsdp = -1, data = 1).

    lm-align compile --topology v5e:4x4 --config experiments/llama_sizes.py:8b
    lm-align compile --topology v5e:4x4 --num-slices 2 \\
        --config experiments/llama_sizes.py:8b,batch=128 --config.mesh.data=2

docs/tpu_compile.md has the table these produce. The data is the built-in
arithmetic task with the byte tokenizer (compiling needs no data); to train,
point data.source and data.tokenizer at a corpus and its tokenizer.

Variant options (`lm_align.config.parse_arg`): the size first (`125m`, `1b`,
`8b`, `70b`; default `1b`), then `batch` (int, default 64: sequences per
step, divisible by the chips), `seq_len` (int, default 2048) and `dpo`
(bool): the DPO step instead, on `batch` pairs of `seq_len`-token rows with
the reference's forward pass in every step (`:125m,dpo`; give
align.policy_checkpoint and align.train_file to train it).
"""

from lm_align.align.config import align_base_config
from lm_align.config import OneOf, parse_arg
from lm_align.train.config import base_config

# size: (d_model, n_layers, n_heads, n_kv_heads, d_ff, vocab_size, tie_embeddings)
SIZES = {
    "125m": (768, 12, 12, 4, 2048, 32_000, False),
    "1b": (2048, 16, 32, 8, 8192, 128_256, True),
    "8b": (4096, 32, 32, 8, 14_336, 128_256, False),
    "70b": (8192, 80, 64, 8, 28_672, 128_256, False),
}


def get_config(arg=None):
    opts = parse_arg(arg, size=OneOf("1b", tuple(SIZES)), batch=64, seq_len=2048, dpo=False)
    d_model, n_layers, n_heads, n_kv_heads, d_ff, vocab, tied = SIZES[opts.size]
    cfg = align_base_config() if opts.dpo else base_config()
    if opts.dpo:
        cfg.align.loss = "dpo"
        cfg.align.max_len = opts.seq_len  # tokens per (prompt, response) row
        cfg.align.precompute_reference = False  # the reference's forward in every step

    cfg.model.d_model = d_model
    cfg.model.n_layers = n_layers
    cfg.model.n_heads = n_heads  # head_dim 64 (125m) or 128
    cfg.model.n_kv_heads = n_kv_heads
    cfg.model.d_ff = d_ff
    cfg.model.vocab_size = vocab
    cfg.model.tie_embeddings = tied
    cfg.model.activation = "swiglu"
    cfg.model.norm = "rmsnorm"
    cfg.model.norm_eps = 1e-5
    cfg.model.position = "rope"
    cfg.model.rope_theta = 500_000.0
    cfg.model.use_bias = False
    cfg.model.dtype = "bfloat16"  # compute; parameters and optimizer state stay float32
    cfg.model.param_dtype = "float32"
    cfg.model.scan_layers = True  # one layer body to compile, whatever the depth
    cfg.model.remat = "full"  # keep each layer's input, recompute the rest in the backward

    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1  # every chip holds 1/N of the parameters and optimizer state
    cfg.mesh.tensor = 1

    cfg.data.seq_len = opts.seq_len
    cfg.train.batch_size = opts.batch  # sequences per step: batch * seq_len tokens
    cfg.train.steps = 10_000
    cfg.optimizer.name = "adamw"
    cfg.optimizer.lr = 3e-4
    cfg.optimizer.warmup_steps = 1000
    return cfg
