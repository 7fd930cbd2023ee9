"""Benchmark of one DPO step on the engine's benchmark model (`lm_align.presets.bench_lm`,
the model of experiments/bench.py).

    lm-align bench --config experiments/bench_dpo.py

8 pairs (16 rows, as the LM benchmark's 16 sequences) of 256 tokens; policy
forward + backward and the frozen reference's forward every step
(align.precompute_reference = false), so the FLOPs per token are 4/3 of a
training step's. Set --config.align.precompute_reference=true to time the
step with stored reference log-probs.
"""

from lm_align.align.config import align_base_config
from lm_align.config import parse_arg
from lm_align.presets import bench_lm


def get_config(arg=None):
    parse_arg(arg)  # no variants: any `:arg` is an error
    cfg = align_base_config()
    base = bench_lm()
    cfg.model, cfg.data, cfg.train = base.model, base.data, base.train
    cfg.train.batch_size = 8  # pairs
    cfg.align.loss = "dpo"
    cfg.align.max_len = base.data.seq_len
    cfg.align.precompute_reference = False
    return cfg
