"""Default experiment: a small decoder learns 2-digit addition from scratch.

    lm-align train                      # this file, workdir runs/default
    lm-align train --config.train.steps=2000 --config.optimizer.lr=3e-3

Data: built-in arithmetic problems ("37+5=42"), byte tokens, packed into rows
of 64 tokens. Fits in about 2 minutes on 2 CPU cores. Every knob, with its
unit, is in `lm_align.presets.arithmetic_lm` (the alignment experiments start
from the same model); no variants.
"""

from lm_align.config import parse_arg
from lm_align.presets import arithmetic_lm


def get_config(arg=None):
    parse_arg(arg)  # no variants: any `:arg` is an error
    return arithmetic_lm()
