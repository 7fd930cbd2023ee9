"""A run's model for use outside training: its model, parameters and config from a checkpoint.

    model, params, cfg = load_run("runs/sft")          # newest intact step of the run
    model, params, cfg = load_run("runs/sft/checkpoints/600")

Every command that uses a finished run (`lm-align sample`, `lm-align hf
export`, and through `lm_align.align.setup.load_model` `lm-align eval` and
`lm-align preferences`) loads it here. The model is rebuilt from the run's
saved config (`model` and `param` groups), the parameters are read from the
checkpoint (`run_params`) onto a data-parallel mesh over `devices`: each
device holds a whole copy, ready for sampling. Only the `model` and `param`
groups are checked: a run loads after its training data or its
`train.init_from` checkpoint is gone, unless it trained LoRA adapters.

A LoRA run (``lora.rank > 0``) saves its adapters only; its model is its base
(`lora_base`: ``train.init_from``, or ``align.policy_checkpoint`` for
`lm-align align`; '' = the fresh init of ``train.seed``) with the adapters
merged in. `run_params` loads that wherever a run's parameters are loaded
(``train.init_from``, ``align.policy_checkpoint``, `load_run`), so a LoRA run
is accepted wherever a run is; the base must still be where the run's
config says.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax

from lm_align import config as config_lib
from lm_align import parallel
from lm_align.config import ConfigError
from lm_align.models import TransformerConfig, config_from_dict
from lm_align.models.lora import Lora
from lm_align.models.pure import PureModel
from lm_align.parameterization import Parameterization
from lm_align.train import checkpoint
from lm_align.train.step import with_shardings
from lm_align.train.validate import make_lora_config, make_parameterization

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
    return model, run_params(ref, abstract), cfg


def _base_field(cfg) -> str:
    """The config field naming a run's starting policy: `align.policy_checkpoint`
    (preferences), `rl.policy_checkpoint` (online RL) or `train.init_from`."""
    for group in ("align", "rl"):
        if group in cfg:
            return f"{group}.policy_checkpoint"
    return "train.init_from"


def lora_base(cfg) -> str:
    """The run whose parameters a LoRA run's adapters apply to ('' = fresh init)."""
    group, field = _base_field(cfg).split(".")
    return cfg[group][field]


def with_absolute_base(cfg):
    """`cfg` with the LoRA base path (`lora_base`) made absolute, so the run's saved
    config finds its base from any working directory; unchanged without LoRA."""
    base = lora_base(cfg)
    if not make_lora_config(cfg).enabled or not base or os.path.isabs(base):
        return cfg
    return config_lib.apply_overrides(cfg, [f"{_base_field(cfg)}={os.path.abspath(base)}"])


def run_model(cfg) -> PureModel:
    """The language model of a run's config (its `model` and `param` groups)."""
    model_cfg = config_from_dict(cfg.model)
    return PureModel(model_cfg, make_parameterization(cfg, model_cfg))


def base_params(cfg, model: PureModel, abstract):
    """The base parameters of the LoRA experiment `cfg`, placed like `abstract`:
    `run_params` of `lora_base(cfg)`, or `model`'s init with ``train.seed``."""
    base = lora_base(cfg)
    if base:
        return run_params(checkpoint.resolve(base), abstract)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    return jax.jit(model.init, static_argnums=0, out_shardings=shardings)(cfg.train.seed)


def run_params(ref: checkpoint.CheckpointRef, abstract):
    """The model parameters the checkpoint `ref` stands for, placed like `abstract`
    (ShapeDtypeStructs with shardings): its ``params``, or for a LoRA run its
    base's with its adapters merged in (W + s A B, `lm_align.models.lora`)."""
    saved = checkpoint.saved_config(ref)
    lora_cfg = make_lora_config(saved)
    if not lora_cfg.enabled:
        return checkpoint.load_params(ref, abstract)
    model = run_model(saved)
    lora = Lora(model, lora_cfg)
    mesh = jax.tree.leaves(abstract)[0].sharding.mesh
    adapter_sh = parallel.logical_to_sharding(lora.logical_axes, lora.abstract_params, mesh)
    adapters = checkpoint.load_params(ref, with_shardings(lora.abstract_params, adapter_sh))
    base = base_params(saved, model, abstract)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    return jax.jit(lora.merge, out_shardings=shardings, donate_argnums=(0,))(base, adapters)
