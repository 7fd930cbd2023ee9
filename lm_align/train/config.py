"""The full experiment config: every group and field with its default.

Experiments start from `base_config()` and set what they study:

    def get_config(arg=None):
        cfg = base_config()
        cfg.model.d_model = 256
        return cfg

Groups: train, mesh, model (lm_align.models.TransformerConfig), optimizer
(lm_align.optim.DEFAULTS), param (lm_align.parameterization.DEFAULTS), data
(lm_align.data.DEFAULTS), lora (lm_align.models.lora.LORA_DEFAULTS).
docs/configs.md lists every field.
"""

from __future__ import annotations

import ml_collections

from lm_align import data as data_lib
from lm_align import optim, parameterization
from lm_align.models import model_defaults
from lm_align.models.lora import LORA_DEFAULTS

TRAIN_DEFAULTS = {
    "steps": 1000,  # optimizer updates
    "batch_size": 32,  # global sequences per update, divisible by mesh data*fsdp
    "grad_accum_steps": 1,  # micro-batches per update (splits batch_size)
    "seed": 0,  # parameter init, data order
    "init_from": "",  # checkpoint whose params start the run (fine-tuning); '' = fresh init
    "z_loss_coef": 1e-4,  # coef * (log Z)^2 added per target token
    "log_every": 50,  # steps between metrics.jsonl / TensorBoard rows
    "eval_every": 250,  # steps between held-out evals; 0 = only at the end
    "eval_batches": 4,  # batches per held-out eval
    "checkpoint_every": 500,  # steps between checkpoints; 0 = only at the end
    "keep_checkpoints": 3,  # newest checkpoints kept on disk
    "async_checkpointing": True,  # write checkpoints in the background
    "nonfinite": "halt",  # halt | skip: what a non-finite loss or gradient does
    "loss_chunks": 8,  # fused readout+loss over this many sequence chunks; 0 = full logits
    "answer_eval_examples": 256,  # held-out prompts for greedy exact match at the end (0 = off)
    "answer_max_new_tokens": 8,  # generation budget for those answers
    "progress": True,  # progress bar with ETA on stderr
    "tensorboard": True,  # also write TensorBoard events to WORKDIR/tb
}

MESH_DEFAULTS = {
    "data": -1,  # data-parallel size; -1 = all devices not used by the other axes
    "fsdp": 1,  # parameter-sharded data parallelism
    "tensor": 1,  # tensor (model) parallelism over heads / MLP / vocab
}


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default (unlocked; `load_config` locks it)."""
    return ml_collections.ConfigDict(
        {
            "train": dict(TRAIN_DEFAULTS),
            "mesh": dict(MESH_DEFAULTS),
            "model": model_defaults(),
            "optimizer": dict(optim.DEFAULTS),
            "param": dict(parameterization.DEFAULTS),
            "data": dict(data_lib.DEFAULTS),
            "lora": dict(LORA_DEFAULTS),
        }
    )
