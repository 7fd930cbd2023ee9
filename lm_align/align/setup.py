"""Building a preference experiment: config resolution, model, optimizer, shardings.

`setup(cfg)` validates the `align` group, takes the `model` and `param` groups
from the policy checkpoint, and builds the policy (or reward model; with
``lora.rank > 0`` LoRA adapters of the policy, whose base is the frozen
reference), its optimizer (`lm_align.train.setup.make_optimizer`, the same construction as
`lm-align train`: per-layer learning rates and epsilons from the
parameterization), the shardings and the row-scoring function. `load_model`
loads a trained policy or reward model for evaluation and sampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lm_align import config as config_lib
from lm_align import parallel
from lm_align.align.config import REWARD_LOSSES, check_align
from lm_align.align.logprobs import sequence_logprobs
from lm_align.config import ConfigError
from lm_align.models.lora import Lora
from lm_align.models.pure import PureModel
from lm_align.train import checkpoint
from lm_align.train.load import load_run, run_params, with_absolute_base
from lm_align.train.setup import make_optimizer
from lm_align.train.step import TrainState, state_shardings, with_shardings
from lm_align.train.validate import check_config, make_lora_config, make_parameterization


def _resolve_config(cfg, devices, group: str = "align") -> tuple[Any, Any]:
    """Takes model/param from the policy checkpoint (`cfg.<group>.policy_checkpoint`);
    validates everything.

    Returns (cfg, policy checkpoint ref or None).
    """
    if group not in cfg:
        base = {"align": "lm_align.align.config.align_base_config()",
                "rl": "lm_align.align.rl_config.rl_base_config()"}[group]  # fmt: skip
        raise ConfigError(f"config has no `{group}` group; start get_config() from {base}")
    if group == "align":
        errors = check_align(cfg.align)
    else:
        from lm_align.align.rl_config import check_rl

        errors = check_rl(cfg)
    if cfg.train.grad_accum_steps != 1 and group == "align":
        errors.append(
            f"train.grad_accum_steps={cfg.train.grad_accum_steps}; the preference trainer "
            "takes whole batches (set it to 1 and lower train.batch_size instead)"
        )
    ref = None
    start = cfg[group].policy_checkpoint
    if start:
        try:
            ref = checkpoint.resolve(start)
            saved = checkpoint.saved_config(ref)
        except FileNotFoundError as e:
            errors.append(f"{group}.policy_checkpoint={start!r}: {e}")
        else:
            if saved.get("align", {}).get("loss") in REWARD_LOSSES:
                errors.append(
                    f"{group}.policy_checkpoint={start!r} is a reward model; start from a "
                    "policy (an `lm-align train`, `align` or `rl` run)"
                )
            if saved.data.tokenizer != cfg.data.tokenizer:
                errors.append(
                    f"data.tokenizer={cfg.data.tokenizer!r} but the policy checkpoint was trained "
                    f"with {saved.data.tokenizer!r}; set data.tokenizer to match"
                )
            d = cfg.to_dict()
            d["model"], d["param"] = saved.model.to_dict(), saved.param.to_dict()
            cfg = config_lib.from_dict(d)
    errors += _check_lora(cfg, group)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    return with_absolute_base(cfg), ref


def _check_lora(cfg, group: str = "align") -> list[str]:
    """LoRA trains a policy whose reference is its base: no reward model, no other reference."""
    try:
        if not make_lora_config(cfg).enabled:
            return []
    except (TypeError, ValueError):
        return []  # check_config reports it
    errors, g = [], cfg[group]
    if g.get("loss") in REWARD_LOSSES:
        errors.append(
            f"lora.rank={cfg.lora.rank} with align.loss={cfg.align.loss!r}: LoRA trains "
            "policies; a reward model trains its head and body, set lora.rank=0"
        )
    if g.reference_checkpoint:
        errors.append(
            f"{group}.reference_checkpoint={g.reference_checkpoint!r} with LoRA: the reference "
            f"is the base model ({group}.policy_checkpoint) with the adapters off; unset "
            f"{group}.reference_checkpoint, or set lora.rank=0 to train against another reference"
        )
    return errors


@dataclasses.dataclass
class AlignSetup:
    """Everything `align` builds before stepping (also used by bench and tests)."""

    cfg: ml_collections.ConfigDict
    model: Any  # PureModel (policy) or RewardModel
    policy_model: PureModel
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    schedule: Callable
    state_shardings: Any
    abstract_state: Any
    batch_sharding: Any
    score_rows: Callable
    init_params: Callable[[], Any]  # () -> starting params (sharded): the policy's, or adapters
    reference_params: Callable[[], Any]  # () -> frozen reference params (sharded) or None
    lora: Lora | None = None  # LoRA: the state trains these adapters; the reference is their base
    policy_shardings: Any = None  # the policy's (and reference's) parameter shardings
    jitted: dict = dataclasses.field(default_factory=dict)  # compiled helpers by name

    def model_params(self, params, ref_params):
        """The policy's parameters for the trained `params` (LoRA: the adapters merged
        into `ref_params`, their base; otherwise `params`)."""
        if self.lora is None:
            return params
        if "merge" not in self.jitted:
            self.jitted["merge"] = jax.jit(self.lora.merge, out_shardings=self.policy_shardings)
        return self.jitted["merge"](ref_params, params)


def setup(cfg, devices=None, *, group: str = "align") -> AlignSetup:
    """Validates `cfg` and builds the model, optimizer, shardings and score function.

    `group` names the trainer's config group: "align" (preferences, reward
    models) or "rl" (online RL, `lm_align.align.rl`); both name the starting
    policy and the reference the same way.
    """
    devices = list(jax.devices() if devices is None else devices)
    cfg, policy_ref = _resolve_config(cfg, devices, group)
    a, t = cfg[group], cfg.train
    model_cfg = check_config(
        cfg,
        num_devices=len(devices),
        process_count=jax.process_count(),
        extra_groups_allowed=(group,),
    )
    mesh = parallel.make_mesh(cfg.mesh, devices)
    param = make_parameterization(cfg, model_cfg)
    policy = PureModel(model_cfg, param)
    is_reward = a.get("loss") in REWARD_LOSSES
    # Keep the residual stream batch-sharded, as the language-model step does: otherwise it
    # inherits the embedding table's sharding and XLA replicates the activations.
    batch_sh = parallel.batch_sharding(mesh)
    constrain_BLD = lambda x: jax.lax.with_sharding_constraint(x, batch_sh)
    if is_reward:
        from lm_align.align.reward import RewardModel

        model = RewardModel(model_cfg, param)

        def score_rows(params, rows):
            return model.rewards(params, rows, constrain_BLD=constrain_BLD)
    else:
        model = policy

        def score_rows(params, rows):
            return sequence_logprobs(policy, params, rows, constrain_BLD=constrain_BLD).logps

    lora_cfg = make_lora_config(cfg)
    lora = Lora(policy, lora_cfg) if lora_cfg.enabled else None
    trained = model if lora is None else lora
    opt = make_optimizer(cfg, param, trained)
    abstract, state_sh = state_shardings(trained, opt.tx, mesh, t.seed)
    policy_sh = parallel.logical_to_sharding(policy.logical_axes, policy.abstract_params, mesh)
    policy_abstract = with_shardings(policy.abstract_params, policy_sh)

    def load_policy(path_ref):
        return run_params(path_ref, policy_abstract)

    def starting_policy():
        if policy_ref is None:
            return jax.jit(policy.init, static_argnums=0, out_shardings=policy_sh)(t.seed)
        return load_policy(policy_ref)

    def init_params():
        if lora is not None:
            return jax.jit(lora.init, static_argnums=0, out_shardings=state_sh.params)(t.seed)
        if is_reward and policy_ref is None:
            return jax.jit(model.init, static_argnums=0, out_shardings=state_sh.params)(t.seed)
        if is_reward:
            return jax.jit(model.from_policy, out_shardings=state_sh.params)(starting_policy())
        return starting_policy()

    def reference_params():
        if is_reward:
            return None
        if a.reference_checkpoint:
            return load_policy(checkpoint.resolve(a.reference_checkpoint))
        return starting_policy()

    return AlignSetup(
        cfg, model, policy, mesh, opt.tx, opt.schedule, state_sh,
        with_shardings(abstract, state_sh), parallel.batch_sharding(mesh), score_rows,
        init_params, reference_params, lora, policy_sh,
    )  # fmt: skip


def initial_state(s: AlignSetup, params, seed: int) -> TrainState:
    """Step 0 of training `params` (already sharded): fresh optimizer state."""
    init = jax.jit(
        lambda p: TrainState(
            jnp.zeros((), jnp.int32),
            p,
            s.tx.init(p),
            jax.random.key_data(jax.random.key(seed + 1)),
            jnp.zeros((), jnp.int32),
        ),
        out_shardings=s.state_shardings,
    )
    return init(params)


def load_model(path: str, devices=None):
    """(model, params, cfg) of a policy or reward-model checkpoint, unsharded use
    (`lm_align.train.load.load_run`).

    For a reward model (`align.loss = bradley_terry`) the model is a
    `RewardModel`; otherwise a `PureModel`.
    """

    def make_model(model_cfg, param, cfg):
        if cfg.get("align", {}).get("loss") in REWARD_LOSSES:
            from lm_align.align.reward import RewardModel

            return RewardModel(model_cfg, param)
        return PureModel(model_cfg, param)

    return load_run(path, devices, make_model=make_model)
