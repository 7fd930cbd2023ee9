"""Training: TrainState, sharded jitted steps, checkpoints, metrics and the loop."""

from lm_align.train.config import base_config
from lm_align.train.loop import NonFiniteLossError, TrainResult, train
from lm_align.train.step import TrainState, build_steps, make_eval_step, make_train_step

__all__ = [
    "NonFiniteLossError",
    "TrainResult",
    "TrainState",
    "base_config",
    "build_steps",
    "make_eval_step",
    "make_train_step",
    "train",
]
