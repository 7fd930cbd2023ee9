"""Training: TrainState, sharded jitted steps, checkpoints, the shared run wrapper and the LM loop."""

from lm_align.train.config import base_config
from lm_align.train.loop import train
from lm_align.train.run import Loop, NonFiniteLossError, Run, TrainResult
from lm_align.train.step import (
    TrainState,
    apply_update,
    build_steps,
    make_eval_step,
    make_train_step,
)

__all__ = [
    "Loop",
    "NonFiniteLossError",
    "Run",
    "TrainResult",
    "TrainState",
    "apply_update",
    "base_config",
    "build_steps",
    "make_eval_step",
    "make_train_step",
    "train",
]
