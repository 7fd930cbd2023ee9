"""Config checks that run before anything is compiled.

Every problem is collected (not just the first) and each message names the
field, its value and the fix.
"""

from __future__ import annotations

from lm_align import data as data_lib
from lm_align import optim, parallel
from lm_align.config import ConfigError
from lm_align.models import TransformerConfig
from lm_align.models import lora as lora_lib
from lm_align.parameterization import Parameterization
from lm_align.train.checkpoint import resolve
from lm_align.train.step import NONFINITE_MODES

GROUPS = ("train", "mesh", "model", "optimizer", "param", "data", "lora")


def make_parameterization(cfg, model_cfg: TransformerConfig) -> Parameterization:
    """The `param` group at the model's width, for the configured optimizer."""
    return Parameterization.from_config(
        cfg.param, optimizer=cfg.optimizer.name, width=model_cfg.d_model
    )


def make_lora_config(cfg) -> lora_lib.LoraConfig:
    """The `lora` group (absent: LoRA off); raises ValueError for bad fields."""
    return lora_lib.config_from_dict(cfg.lora if "lora" in cfg else {})


def check_config(
    cfg, *, num_devices: int, process_count: int = 1, extra_groups_allowed: tuple[str, ...] = ()
) -> TransformerConfig:
    """Raises ConfigError listing every problem; returns the model config."""
    errors = _check_groups(cfg, extra_groups_allowed) + _check_train(cfg.train, cfg.data.seq_len)
    model_cfg = None
    try:
        model_cfg = TransformerConfig(**dict(cfg.model))
    except (TypeError, ValueError) as e:
        errors.append(str(e))
    errors += _check_batch(cfg.train, cfg.mesh, num_devices, process_count)
    errors += _check_data_and_model(cfg)
    try:
        optim.make_optimizer(cfg.optimizer, total_steps=max(cfg.train.steps, 1))
    except (ValueError, TypeError) as e:
        errors.append(str(e))
    if model_cfg is not None and "param" in cfg:
        errors += _check_param(cfg, model_cfg)
    errors += _check_lora(cfg, model_cfg)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    return model_cfg


def _check_groups(cfg, extra_groups_allowed) -> list[str]:
    from lm_align.train.config import MESH_DEFAULTS, TRAIN_DEFAULTS

    errors = []
    for group, known in (("train", TRAIN_DEFAULTS), ("mesh", MESH_DEFAULTS)):
        unknown = sorted(set(cfg[group].keys()) - set(known))
        if unknown:
            errors.append(f"unknown {group} fields {unknown}; valid: {sorted(known)}")
    extra_groups = sorted(set(cfg.keys()) - set(GROUPS) - set(extra_groups_allowed))
    if extra_groups:
        errors.append(f"unknown config groups {extra_groups}; valid: {', '.join(GROUPS)}")
    if "param" not in cfg:
        errors.append(
            "config has no `param` group; start get_config() from "
            "lm_align.train.base_config() (or add param=dict(lm_align.parameterization.DEFAULTS))"
        )
    return errors


def _check_train(t, seq_len: int) -> list[str]:
    errors = []
    for name in (
        "steps",
        "batch_size",
        "grad_accum_steps",
        "log_every",
        "eval_batches",
        "keep_checkpoints",
    ):
        if t[name] <= 0:
            errors.append(f"train.{name}={t[name]} must be positive")
    for name in ("eval_every", "checkpoint_every", "answer_eval_examples"):
        if t[name] < 0:
            errors.append(f"train.{name}={t[name]} must be >= 0 (0 turns it off)")
    if t.loss_chunks < 0 or (t.loss_chunks and seq_len % t.loss_chunks):
        errors.append(
            f"train.loss_chunks={t.loss_chunks} must be 0 (full logits) or divide "
            f"data.seq_len={seq_len}"
        )
    if t.init_from:
        try:
            resolve(t.init_from)
        except FileNotFoundError as e:
            errors.append(f"train.init_from={t.init_from!r}: {e}")
    if t.nonfinite not in NONFINITE_MODES:
        errors.append(f"train.nonfinite={t.nonfinite!r} must be one of {NONFINITE_MODES}")
    return errors


def _check_batch(t, mesh_cfg, num_devices: int, process_count: int) -> list[str]:
    """The batch against the mesh's data-parallel size, accumulation and processes."""
    errors, dp = [], None
    try:
        mesh_shape = parallel.resolve_mesh_shape(mesh_cfg, num_devices)
        dp = mesh_shape[0] * mesh_shape[1]
    except ValueError as e:
        where = (
            f" ({process_count} processes x {num_devices // process_count} local devices each)"
            if process_count > 1
            else ""
        )
        errors.append(f"{e}{where}")
    if dp and t.batch_size > 0:
        if t.batch_size % dp:
            errors.append(
                f"train.batch_size={t.batch_size} is not divisible by the data-parallel size "
                f"mesh.data*mesh.fsdp={dp}; use a multiple of {dp}"
            )
        elif t.grad_accum_steps > 0 and t.batch_size % (dp * t.grad_accum_steps):
            errors.append(
                f"train.batch_size={t.batch_size} must divide into grad_accum_steps="
                f"{t.grad_accum_steps} micro-batches of a multiple of {dp} sequences; "
                f"use a multiple of {dp * t.grad_accum_steps}"
            )
    if t.batch_size > 0 and t.batch_size % process_count:
        errors.append(
            f"train.batch_size={t.batch_size} must be divisible by the {process_count} processes"
        )
    return errors


def _check_data_and_model(cfg) -> list[str]:
    """The tokenizer against the vocabulary, positions against the length, the data source."""
    errors = []
    try:
        tokenizer = data_lib.make_tokenizer(cfg.data.tokenizer)
        if cfg.model.vocab_size < tokenizer.vocab_size:
            errors.append(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                f"vocabulary ({tokenizer.vocab_size}); set model.vocab_size >= {tokenizer.vocab_size}"
            )
    except ValueError as e:
        errors.append(str(e))
    if cfg.model.position == "learned" and cfg.data.seq_len > cfg.model.max_len:
        errors.append(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_len={cfg.model.max_len} "
            "(the learned position table); raise model.max_len"
        )
    try:
        data_lib.config.check(cfg.data)
        data_lib.make_source(cfg.data, "train")  # unknown source, missing files
    except ValueError as e:
        errors.append(str(e))
    return errors


def _check_lora(cfg, model_cfg: TransformerConfig | None) -> list[str]:
    try:
        lora_cfg = make_lora_config(cfg)
        if lora_cfg.enabled and model_cfg is not None:
            lora_lib.resolve_targets(model_cfg, lora_cfg.targets)
    except (TypeError, ValueError) as e:
        return [str(e).replace("\n  ", "\n    ")]
    return []


def _check_param(cfg, model_cfg: TransformerConfig) -> list[str]:
    errors = []
    try:
        param = make_parameterization(cfg, model_cfg)
        if model_cfg.tie_embeddings:
            param.check_tied_embeddings()
        if param.per_layer_eps and cfg.optimizer.name not in ("adam", "adamw"):
            errors.append(
                f"param.per_layer_eps=true needs optimizer.name adam or adamw (Adam's "
                f"epsilon), not {cfg.optimizer.name!r}; set param.per_layer_eps=false"
            )
    except ValueError as e:
        errors.append(str(e))
    return errors
