"""A run's model for use outside training: its model, parameters and config from a checkpoint.

    model, params, cfg = load_run("runs/sft")          # newest intact step of the run
    model, params, cfg = load_run("runs/sft/checkpoints/600")

Every command that uses a finished run (`lm-align sample`, `lm-align hf
export`, and through `lm_align.align.setup.load_model` `lm-align eval` and
`lm-align preferences`) loads it here. The model is rebuilt from the run's
saved config (`model` and `param` groups), the parameters are read from the
checkpoint (`lm_align.train.checkpoint.load_params`) onto a data-parallel mesh
over `devices`: each device holds a whole copy, ready for sampling. Only the
`model` and `param` groups are checked: a run loads after its training data
or its `train.init_from` checkpoint is gone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from lm_align import config as config_lib
from lm_align import parallel
from lm_align.config import ConfigError
from lm_align.models import TransformerConfig, config_from_dict
from lm_align.models.pure import PureModel
from lm_align.parameterization import Parameterization
from lm_align.train import checkpoint
from lm_align.train.step import with_shardings
from lm_align.train.validate import make_parameterization

# (model config, parameterization, the run's config) -> the model whose params the run saved.
ModelFactory = Callable[[TransformerConfig, Parameterization, Any], Any]


def policy_model(model_cfg: TransformerConfig, param: Parameterization, cfg) -> PureModel:
    """The default `ModelFactory`: a language model (`PureModel`)."""
    return PureModel(model_cfg, param)


def load_run(path: str, devices=None, *, make_model: ModelFactory = policy_model):
    """(model, params, cfg) of the checkpoint `path` names (see `checkpoint.resolve`).

    `cfg` is the run's saved config with a data-parallel mesh over `devices`
    (default: all); `params` are replicated on that mesh. `make_model` builds
    the model the run trained (a reward model's trainer passes its own).

    Raises:
      CheckpointNotFoundError: `path` holds no intact checkpoint.
      ConfigError: the saved config does not validate here.
      ValueError: the checkpoint's parameters are not `make_model`'s.
    """
    devices = list(jax.devices() if devices is None else devices)
    ref = checkpoint.resolve(path)
    d = checkpoint.saved_config(ref).to_dict()
    d["mesh"] = {"data": len(devices), "fsdp": 1, "tensor": 1}
    cfg = config_lib.from_dict(d)
    try:
        model_cfg = config_from_dict(cfg.model)
        param = make_parameterization(cfg, model_cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"{ref}: its saved model or param group does not build here ({e}); load it with "
            "the lm-align version that trained it"
        ) from None
    model = make_model(model_cfg, param, cfg)
    mesh = parallel.make_mesh(cfg.mesh, devices)
    abstract = with_shardings(
        model.abstract_params,
        parallel.logical_to_sharding(model.logical_axes, model.abstract_params, mesh),
    )
    return model, checkpoint.load_params(ref, abstract), cfg
