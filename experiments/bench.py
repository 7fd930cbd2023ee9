"""Benchmark model: 4 layers, d_model 256, 4 heads, d_ff 1024, vocab 8192,
seq 256, batch 16, float32 (the shape the engine's MFU target is stated for).

    lm-align bench                       # this file
    lm-align bench --json --config.train.batch_size=32

The config is `lm_align.presets.bench_lm` (shared with experiments/bench_dpo.py);
no variants.
"""

from lm_align.config import parse_arg
from lm_align.presets import bench_lm


def get_config(arg=None):
    parse_arg(arg)  # no variants: any `:arg` is an error
    return bench_lm()
