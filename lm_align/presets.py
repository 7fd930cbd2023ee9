"""Experiment configs that several experiment files build on.

An experiment file imports what it shares from here instead of from a sibling
file, so every file in `experiments/` loads on its own:

    from lm_align.presets import arithmetic_lm, arithmetic_start_policy, bench_lm

    def get_config(arg=None):
        cfg = arithmetic_start_policy(quick=False)   # the SFT policy of the alignment studies
        ...

- `arithmetic_lm()`: the default experiment (`experiments/default.py`), a
  2-layer, 128-wide decoder learning 2-digit addition from scratch.
- `arithmetic_start_policy(quick)`: that model trained for 320 steps (250 when
  `quick`), the starting policy of the alignment, ReST-EM and BoN studies.
- `bench_lm()`: the benchmark model of `lm-align bench` (`experiments/bench.py`).

Each returns a fresh, unlocked ConfigDict; `load_config` locks the experiment's
result. Every field: docs/configs.md.
"""

from __future__ import annotations

import ml_collections

from lm_align.train.config import base_config


def arithmetic_lm() -> ml_collections.ConfigDict:
    """The default experiment: 2-digit addition, byte tokens, rows of 64 tokens
    (about 2 minutes on 2 CPU cores)."""
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


def arithmetic_start_policy(quick: bool = False) -> ml_collections.ConfigDict:
    """`arithmetic_lm()` stopped early: 320 steps (250 when `quick`), greedy held-out
    accuracy about 0.47, clearly between 0 and 1, so alignment has room to help.

    Evaluates and checkpoints only at the end; the caller sets
    `train.answer_eval_examples` (0 when its command evaluates the policy itself).
    """
    cfg = arithmetic_lm()
    cfg.train.steps = 250 if quick else 320
    cfg.train.eval_every = 0  # held-out loss at the final step only
    cfg.train.checkpoint_every = 0  # one checkpoint, at the final step
    return cfg


def arithmetic_corrupted_policy(quick: bool = False) -> ml_collections.ConfigDict:
    """`arithmetic_lm()` trained to convergence (600 steps; 100 when `quick`) on
    demonstrations with a systematic error: in 80% of the problems whose sum
    carries, the demonstrated answer drops the lowest carry
    (`data.arithmetic_corruption = "dropped_carry"`). The verifier checks the
    true sum, so it rewards what the demonstrations do not teach: the start
    policy of the alignment and RL studies (greedy held-out accuracy about 0.30).

    Evaluates and checkpoints only at the end, no answer evaluation (the
    studies evaluate their policies themselves).
    """
    cfg = arithmetic_lm()
    cfg.data.arithmetic_corruption = "dropped_carry"
    cfg.data.arithmetic_corruption_rate = 0.8
    cfg.train.steps = 100 if quick else 600
    cfg.train.answer_eval_examples = 0
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 0  # one checkpoint, at the final step
    return cfg


def bench_lm() -> ml_collections.ConfigDict:
    """The benchmark model: 4 layers, d_model 256, 4 heads, d_ff 1024, vocab 8192,
    sequences of 256 tokens, batch 16, float32 (the shape the MFU target is stated for)."""
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
