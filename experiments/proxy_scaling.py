"""The small-scale-proxies figures across model sizes, on real text (Wortsman et al. 2023).

Four model sizes, width and depth scaled together (non-embedding parameters
12 d^2 L: 12K, 98K, 332K, 786K), each trained at the paper's LR grid
{3e-4 ... 3e-1} on this Python's standard library (`data.source=stdlib`, byte
tokens, nothing to download) with the proxy setup of `experiments/proxy.py`
(AdamW b1 0.9, b2 0.95, eps 1e-8, clip 1, linear warmup then cosine to 1e-5,
independent weight decay 1e-4, z-loss 1e-4, pre-LN, no biases, RoPE, untied
embeddings, GeLU MLP of width 4d). Each variant's sweep crosses size x LR with
the one intervention it studies:

    lm-align sweep --config experiments/proxy_scaling.py:qk_ln  --workdir runs/ps_qk_ln
    lm-align sweep --config experiments/proxy_scaling.py:z_loss --workdir runs/ps_z_loss
    lm-align sweep --config experiments/proxy_scaling.py:warmup --workdir runs/ps_warmup
    lm-align sweep --config experiments/proxy_scaling.py:decay  --workdir runs/ps_decay
    lm-align plot  --sweep runs/ps_qk_ln --group params_non_embedding

- `qk_ln`: qk-layernorm on / off (attention-logit growth; LR sensitivity vs size).
- `z_loss`: z-loss 1e-4 / 0, qk-layernorm on, no weight decay (output-logit
  divergence: weight decay also holds log Z down, so the paper studies z-loss
  without it).
- `warmup`: 5 / 60 warmup steps (the default is 30), qk-layernorm on.
- `decay`: independent weight decay 1e-4 (per step 1e-4 * lr_t / lr) / coupled
  AdamW decay 0.1 (per step 0.1 * lr_t), equal at LR 1e-3, qk-layernorm on.

The runs are ordered size by size, smallest first, so `--max-runs` stops a
sweep before its largest size (the prediction of the largest size from the
smaller ones, docs/scaling.md, was committed before those runs).

Variant options (`lm_align.config.parse_arg`; docs/configs.md, "Variants"):
`study` (the sweep above; `:qk_ln` is `:study=qk_ln`), `sizes` (how many of
SIZES, smallest first, default all), `quick` (bool): the test suite's version
(two tiny sizes, one LR, 20 steps).
"""

from lm_align.config import OneOf, parse_arg
from lm_align.train.config import base_config

# (d_model, n_layers): widths and depths scaled together; head_dim 16, d_ff 4d.
SIZES = ((32, 1), (64, 2), (96, 3), (128, 4))
QUICK_SIZES = ((16, 1), (32, 1))
HEAD_DIM = 16
LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # the paper's peak LRs
QUICK_LR_GRID = (3e-2,)
STUDIES = ("qk_ln", "z_loss", "warmup", "decay")
# The intervention each study compares: the overrides of its two arms.
ARMS = {
    "qk_ln": ({"model.qk_layernorm": True}, {"model.qk_layernorm": False}),
    "z_loss": ({"train.z_loss_coef": 1e-4}, {"train.z_loss_coef": 0.0}),
    "warmup": ({"optimizer.warmup_steps": 5}, {"optimizer.warmup_steps": 60}),
    "decay": (
        {"optimizer.independent_weight_decay": True, "optimizer.weight_decay": 1e-4},
        {"optimizer.independent_weight_decay": False, "optimizer.weight_decay": 0.1},
    ),
}


QUICK_WARMUP = ({"optimizer.warmup_steps": 2}, {"optimizer.warmup_steps": 10})  # of 20 steps


def _options(arg):
    return parse_arg(arg, study=OneOf("qk_ln", STUDIES), sizes=0, quick=False)


def get_config(arg=None):
    opts = _options(arg)
    cfg = base_config()
    d, n_layers = (QUICK_SIZES if opts.quick else SIZES)[0]

    cfg.train.steps = 20 if opts.quick else 300
    cfg.train.batch_size = 16
    cfg.train.log_every = 5 if opts.quick else 25
    cfg.train.eval_every = 0  # held-out loss at the end only
    cfg.train.eval_batches = 2 if opts.quick else 8
    cfg.train.checkpoint_every = 0
    cfg.train.z_loss_coef = 1e-4
    cfg.train.answer_eval_examples = 0
    cfg.train.nonfinite = "halt"  # a diverged run is recorded as diverged by `sweep`
    cfg.train.progress = False
    cfg.train.tensorboard = False

    cfg.model.vocab_size = 259  # byte tokenizer: 256 bytes + pad/bos/eos
    cfg.model.d_model = d
    cfg.model.n_layers = n_layers
    cfg.model.head_dim = HEAD_DIM
    cfg.model.n_heads = d // HEAD_DIM
    cfg.model.d_ff = 4 * d
    cfg.model.activation = "gelu"
    cfg.model.position = "rope"
    cfg.model.norm = "layernorm"
    cfg.model.norm_eps = 1e-6
    cfg.model.use_bias = False
    cfg.model.tie_embeddings = False
    cfg.model.qk_layernorm = opts.study != "qk_ln"  # the qk_ln sweep sets it per run

    cfg.optimizer.name = "adamw"
    cfg.optimizer.lr = 1e-2
    cfg.optimizer.b1 = 0.9
    cfg.optimizer.b2 = 0.95
    cfg.optimizer.eps = 1e-8
    cfg.optimizer.clip_norm = 1.0
    cfg.optimizer.weight_decay = 0.0 if opts.study == "z_loss" else 1e-4
    cfg.optimizer.independent_weight_decay = True
    cfg.optimizer.warmup_steps = 5 if opts.quick else 30
    cfg.optimizer.schedule = "cosine"
    cfg.optimizer.end_lr = 1e-5

    cfg.data.source = "stdlib"  # this Python's standard library; nothing to download
    cfg.data.seq_len = 64
    return cfg


def get_sweep(arg=None):
    opts = _options(arg)
    sizes = QUICK_SIZES if opts.quick else SIZES
    sizes = sizes[: opts.sizes] if opts.sizes else sizes
    grid = QUICK_LR_GRID if opts.quick else LR_GRID
    return [
        {
            "model.d_model": d,
            "model.n_layers": n_layers,
            "model.n_heads": d // HEAD_DIM,
            "model.d_ff": 4 * d,
            **arm,
            "optimizer.lr": lr,
        }
        for d, n_layers in sizes
        for arm in (QUICK_WARMUP if opts.quick and opts.study == "warmup" else ARMS[opts.study])
        for lr in grid
    ]
