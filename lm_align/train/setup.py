"""From a validated config to the pieces every command needs: mesh, model,
optimizer and the sharded jitted steps (shared by `train`, `bench` and tools)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax

from lm_align import optim, parallel
from lm_align.models import TransformerConfig
from lm_align.models.lora import Lora
from lm_align.models.pure import PureModel
from lm_align.parameterization import Parameterization, muon_dims
from lm_align.train.load import base_params
from lm_align.train.step import Steps, build_steps
from lm_align.train.validate import check_config, make_lora_config, make_parameterization


@dataclasses.dataclass
class Experiment:
    model_cfg: TransformerConfig
    param: Parameterization
    model: PureModel
    optimizer: optim.Optimizer  # (tx, schedule)
    mesh: jax.sharding.Mesh
    steps: Steps
    lora: Lora | None = None  # the adapters the state trains (lora.rank > 0)


def make_optimizer(cfg, param: Parameterization, model) -> optim.Optimizer:
    """The `optimizer` group for `model`'s parameters, with the parameterization's
    per-parameter learning-rate scales (and, with ``param.per_layer_eps``, its
    per-parameter Adam epsilons).

    Every trainer builds its optimizer here (`lm-align train`, `lm-align align`
    for policies and reward models, `lm-align bench`), so the parameterization
    means the same everywhere. `model` is anything with ``abstract_params`` and
    ``logical_axes`` (a PureModel, a RewardModel), or LoRA adapters (a `Lora`),
    which train at ``optimizer.lr`` and ``eps`` as they are: the
    parameterization's scales are for the model's own weights.
    """
    if isinstance(model, Lora):
        return optim.make_optimizer(cfg.optimizer, total_steps=cfg.train.steps)
    abstract, axes = model.abstract_params, model.logical_axes
    lr_scales, dims = param.lr_scales(abstract, axes), None
    if cfg.optimizer.name == "muon":
        # Muon's matrices: the orthogonalised update is width-invariant (c = 0).
        dims = muon_dims(abstract, axes)
        is_dims = lambda x: x is None or isinstance(x, tuple)
        lr_scales = jax.tree.map(
            lambda d, s: s if d is None else 1.0, dims, lr_scales, is_leaf=is_dims
        )
    return optim.make_optimizer(
        cfg.optimizer,
        total_steps=cfg.train.steps,
        lr_scales=lr_scales,
        eps=param.adam_eps(cfg.optimizer.eps, abstract, axes) if param.per_layer_eps else None,
        muon_dims=dims,
    )


def build_experiment(cfg, devices: Sequence[jax.Device] | None = None) -> Experiment:
    """Validates `cfg` (before compiling anything) and builds its train/eval steps on `devices`.

    With LoRA (``lora.rank > 0``) the steps train adapters for the base model
    ``train.init_from`` (any run, LoRA runs included; '' = a fresh init),
    whose parameters are loaded here into ``steps.frozen``.
    """
    devices = list(jax.devices() if devices is None else devices)
    model_cfg = check_config(cfg, num_devices=len(devices), process_count=jax.process_count())
    t = cfg.train
    mesh = parallel.make_mesh(cfg.mesh, devices)
    param = make_parameterization(cfg, model_cfg)
    model = PureModel(model_cfg, param)
    lora_cfg = make_lora_config(cfg)
    lora = Lora(model, lora_cfg) if lora_cfg.enabled else None
    opt = make_optimizer(cfg, param, lora or model)
    steps = build_steps(
        model,
        opt.tx,
        opt.schedule,
        mesh,
        seed=t.seed,
        z_loss_coef=t.z_loss_coef,
        grad_accum_steps=t.grad_accum_steps,
        nonfinite=t.nonfinite,
        loss_chunks=t.loss_chunks,
        lora=lora,
    )
    if lora is not None:
        steps.frozen = (base_params(cfg, model, steps.frozen_abstract),)
    return Experiment(model_cfg, param, model, opt, mesh, steps, lora)
