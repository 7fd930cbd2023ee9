"""Hallucination on seen facts vs model size and training length (kg_facts).

    lm-align sweep --config experiments/kg_hallucination.py --workdir runs/kg_hallucination
    lm-align plot --sweep runs/kg_hallucination --x model.d_model --group train.steps \\
        --metric answer_exact_match

A seeded knowledge graph of 200 entities x 2 facts (4 relations); every fact is
a training statement, half of them also as a question, and the eval questions
ask about the other half (seen only as statements). Hallucination rate on
seen facts = 1 - held-out exact match. The sweep: d_model 32 / 64 / 128 (2
layers, d_ff = 4 d) x 400 / 1200 steps of 32 rows of 64 tokens.
"""

from lm_align.config import parse_arg
from lm_align.train.config import base_config


def get_config(arg=None):
    parse_arg(arg)  # no variants: any `:arg` is an error
    cfg = base_config()
    cfg.data.source = "kg_facts"
    cfg.data.seq_len = 64
    cfg.model.vocab_size = 259
    cfg.model.d_model = 128
    cfg.model.n_layers = 2
    cfg.model.n_heads = 4
    cfg.model.d_ff = 512
    cfg.model.qk_layernorm = True
    cfg.train.steps = 1200
    cfg.train.batch_size = 32
    cfg.train.log_every = 100
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 0
    cfg.train.answer_eval_examples = 200  # every eval question
    cfg.train.answer_max_new_tokens = 12
    cfg.optimizer.lr = 3e-3
    cfg.optimizer.warmup_steps = 50
    cfg.optimizer.schedule = "cosine"
    cfg.optimizer.end_lr = 1e-5
    return cfg


def get_sweep(arg=None):
    return [
        {"model.d_model": d, "model.d_ff": 4 * d, "train.steps": steps}
        for steps in (400, 1200)
        for d in (32, 64, 128)
    ]
