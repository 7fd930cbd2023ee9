"""TrainState and the sharded, jitted train and eval steps.

The step is a pure function `(state, batch) -> (state, metrics)` over pytrees:
params are a nested dict (see `lm_align.models.pure`), the optimizer is any
optax transformation. `build_steps` jits it with in/out shardings derived from
the model's logical axes and donates the old state.

Batch dict (each [B, L]): inputs, targets (int32), loss_mask (float32),
segment_ids, positions (int32).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lm_align import parallel
from lm_align.losses.lm import LMLoss, fused_readout_lm_loss, lm_loss
from lm_align.models.lora import Lora
from lm_align.models.pure import PureModel

NONFINITE_MODES = ("halt", "skip")
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


class TrainState(NamedTuple):
    step: jax.Array  # int32 [], optimizer updates applied so far
    params: Any  # nested dict of arrays
    opt_state: Any  # optax state
    rng: jax.Array  # uint32 [2], raw key data (checkpoint friendly)
    skipped: jax.Array  # int32 [], updates dropped for a non-finite loss ("skip" mode)


def init_state(model: PureModel, tx: optax.GradientTransformation, seed: int) -> TrainState:
    params = model.init(seed)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed + 1)),
        skipped=jnp.zeros((), jnp.int32),
    )


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "idx", k)))


def rms_by_param(tree, stacked: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(RMS of all entries pooled, RMS of every parameter), from one pass of sums of squares.

    Per-parameter keys are paths without the layer index (``blocks.attn.qkv``,
    ``embed``, ``final_norm.scale``). Parameters under ``blocks`` give one value
    per layer ([n_layers]), whether the layers are stacked (``stacked=True``:
    scan, leading layer axis) or a list (``blocks/<i>/...``); any other
    parameter gives a scalar.
    """
    sums: dict[str, Any] = {}  # name -> sum of squares ([N] or scalar, or {layer: scalar})
    sizes: dict[str, int] = {}  # name -> entries per layer
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [_key_name(k) for k in path]
        x2 = jnp.square(x.astype(jnp.float32))
        if names[0] == "blocks" and stacked:
            name = ".".join(names)
            sums[name] = jnp.sum(x2.reshape(x.shape[0], -1), axis=1)
            sizes[name] = x.size // x.shape[0]
        elif names[0] == "blocks":
            name = ".".join(["blocks", *names[2:]])
            sums.setdefault(name, {})[int(names[1])] = jnp.sum(x2)
            sizes[name] = x.size
        else:
            name = ".".join(names)
            sums[name], sizes[name] = jnp.sum(x2), x.size
    sums = {
        k: jnp.stack([v[i] for i in sorted(v)]) if isinstance(v, dict) else v
        for k, v in sums.items()
    }
    total = sum(jnp.sum(v) for v in sums.values())
    count = sum(sizes[k] * (v.size if v.ndim else 1) for k, v in sums.items())
    # Python floats: a count over 2**31 (a model of 2.2B+ parameters) overflows as an int32.
    per_param = {k: jnp.sqrt(v / float(sizes[k])) for k, v in sums.items()}
    return jnp.sqrt(total / float(count)), per_param


def apply_update(
    state: TrainState,
    grads,
    loss: jax.Array,
    tx: optax.GradientTransformation,
    schedule: Callable,
    *,
    nonfinite: str = "halt",
) -> tuple[TrainState, dict[str, jax.Array], Any]:
    """One optimizer update of `state` from `grads`: (new state, metrics, updates).

    The update every trainer applies (language modelling, preferences, reward
    models): ``updates, opt_state = tx.update(grads, opt_state, params)``,
    ``params + updates``, step + 1. It is *finite* when `loss` and the global
    gradient norm are; in "skip" mode a non-finite update is dropped (params
    and optimizer state unchanged) and counted in `state.skipped`; in "halt"
    mode it is applied and the caller stops on ``metrics["finite"]``.

    metrics: ``grad_norm`` (global L2 norm of `grads`), ``lr`` (the schedule at
    the number of updates applied so far, which is what the optimizer counts),
    ``finite`` and ``skipped``.
    """
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite={nonfinite!r}: use one of {NONFINITE_MODES}")
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = TrainState(state.step + 1, params, opt_state, state.rng, state.skipped)
    if nonfinite == "skip":
        keep = lambda n, o: jnp.where(finite, n, o)
        new = new._replace(
            params=jax.tree.map(keep, params, state.params),
            opt_state=jax.tree.map(keep, opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
    metrics = {
        "grad_norm": grad_norm,
        "lr": schedule(state.step - state.skipped),
        "finite": finite,
        "skipped": new.skipped,
    }
    return new, metrics, updates


def lm_loss_fn(
    model: PureModel,
    *,
    z_loss_coef: float = 0.0,
    loss_chunks: int = 0,
    constrain_BLD: Callable | None = None,
) -> Callable:
    """`(params, batch) -> (loss, (LMLoss, diagnostics))`: the token-mean LM loss of a batch.

    `loss_chunks > 0` computes the readout and loss with
    `fused_readout_lm_loss` over that many sequence chunks (no [B, L, V] logits
    in memory); 0 materialises the logits and uses `lm_loss`.
    """

    def loss_fn(params, batch):
        module = model.bind(params)
        out_BLX, diag = module(
            batch["inputs"],
            positions_BL=batch["positions"],
            segment_ids_BL=batch["segment_ids"],
            return_diagnostics=True,
            return_hidden=loss_chunks > 0,
            constrain_BLD=constrain_BLD,
        )
        if loss_chunks > 0:
            out = fused_readout_lm_loss(
                out_BLX,
                module.readout_matrix(),
                batch["targets"],
                batch["loss_mask"],
                z_loss_coef=z_loss_coef,
                num_chunks=loss_chunks,
                softcap=model.cfg.final_logit_softcap,
            )
        else:
            out = lm_loss(out_BLX, batch["targets"], batch["loss_mask"], z_loss_coef=z_loss_coef)
        return out.loss, (out, diag)

    return loss_fn


def with_frozen(loss_fn: Callable, merge: Callable) -> Callable:
    """`(params, batch, frozen) -> loss_fn(merge(frozen, params), batch)`.

    The trained `params` are a function of the model's parameters: with LoRA
    the adapters, merged into the frozen base weights (`lm_align.models.lora.
    Lora.merge`). Differentiating with respect to `params` alone gives no
    gradient (and keeps no optimizer state) for the frozen ones.
    """
    return lambda params, batch, frozen: loss_fn(merge(frozen, params), batch)


def accumulated_grads_fn(loss_fn: Callable, grad_accum_steps: int) -> Callable:
    """`(params, batch, *frozen) -> (grads, LMLoss, diagnostics)` over `grad_accum_steps`
    micro-batches (`frozen`: further arguments of `loss_fn`, not differentiated).

    The batch is split into k micro-batches whose gradients are summed with
    weights (tokens in micro-batch) / (tokens in batch), which is exactly the
    gradient of the full-batch token-mean loss; diagnostics are maxima over
    micro-batches.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:

        def whole(params, batch, *frozen):
            (_, (out, diag)), grads = grad_fn(params, batch, *frozen)
            return grads, out, diag

        return whole

    def accumulated(params, batch, *frozen):
        micro = jax.tree.map(
            lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
            batch,
        )
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

        def body(carry, mb):
            (_, (out, diag)), g = grad_fn(params, mb, *frozen)
            w = out.num_tokens / total_tokens
            # Token means combine exactly with weights w; num_tokens is reset below.
            carry = jax.tree.map(lambda acc, x: acc + w * x, carry, (g, out))
            return carry, diag

        zeros = jax.tree.map(jnp.zeros_like, params)
        out0 = LMLoss(*([jnp.zeros((), jnp.float32)] * len(LMLoss._fields)))
        (grads, out), diags = jax.lax.scan(body, (zeros, out0), micro)
        diag = jax.tree.map(lambda d: jnp.max(d, axis=0), diags)
        return grads, out._replace(num_tokens=total_tokens), diag

    return accumulated


def rms_metrics(params, grads, updates, lr, *, stacked: bool, per_layer: bool) -> dict:
    """``param_rms``, ``grad_rms`` and ``update_rms`` (update / lr), pooled and, with
    `per_layer`, per parameter (``<prefix>/<name>``, see `rms_by_param`)."""
    metrics = {}
    inv_lr = 1.0 / jnp.maximum(lr, 1e-30)
    for prefix, tree, scale in (
        ("param_rms", params, 1.0),
        ("grad_rms", grads, 1.0),
        ("update_rms", updates, inv_lr),
    ):
        pooled, per_param = rms_by_param(tree, stacked)
        metrics[prefix] = pooled * scale
        if per_layer:
            for name, value in per_param.items():
                metrics[f"{prefix}/{name}"] = value * scale
    return metrics


def make_train_step(
    model: PureModel,
    tx: optax.GradientTransformation,
    schedule: Callable,
    *,
    z_loss_coef: float = 0.0,
    grad_accum_steps: int = 1,
    nonfinite: str = "halt",
    loss_chunks: int = 0,
    constrain_BLD: Callable | None = None,
    per_layer_diagnostics: bool = True,
    merge: Callable | None = None,
) -> Callable:
    """`(state, batch[, frozen]) -> (state, metrics)`; metrics are scalars (and [N] per-layer).

    The loss is `lm_loss_fn`'s (`loss_chunks`: fused chunked readout), the
    gradient `accumulated_grads_fn`'s (exact token-weighted accumulation over
    `grad_accum_steps` micro-batches), the update `apply_update`'s (in "skip"
    mode a non-finite update is dropped and counted in `state.skipped`).
    `constrain_BLD` is passed to the model (the sharding of its residual
    stream). `per_layer_diagnostics` adds `param_rms/<name>`, `grad_rms/<name>`
    and `update_rms/<name>` (update / lr) for every parameter (`rms_metrics`).
    With `merge` the state holds the trained parameters only (LoRA adapters)
    and the model's are `merge(frozen, state.params)` (`with_frozen`), the
    step's third argument `frozen` being the frozen ones (the base weights).
    """
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite={nonfinite!r}: use one of {NONFINITE_MODES}")
    loss_fn = lm_loss_fn(
        model, z_loss_coef=z_loss_coef, loss_chunks=loss_chunks, constrain_BLD=constrain_BLD
    )
    if merge is not None:
        loss_fn = with_frozen(loss_fn, merge)
    grads_fn = accumulated_grads_fn(loss_fn, grad_accum_steps)

    def train_step(state: TrainState, batch, *frozen):
        grads, out, diag = grads_fn(state.params, batch, *frozen)
        new, update_metrics, updates = apply_update(
            state, grads, out.loss, tx, schedule, nonfinite=nonfinite
        )
        metrics = {
            "loss": out.loss,
            "ce": out.ce,
            "z_loss": out.z_loss,
            "accuracy": out.accuracy,
            **update_metrics,
            "output_logit_mean": out.mean_logit,
            "log_z_mean": out.mean_log_z,
            "max_attn_logit": diag["max_attn_logit"],
            "num_tokens": out.num_tokens,
        }
        rms = rms_metrics(
            state.params,
            grads,
            updates,
            update_metrics["lr"],
            stacked=model.cfg.scan_layers,
            per_layer=per_layer_diagnostics,
        )
        metrics.update(rms)
        return new, metrics

    return train_step


def make_eval_step(
    model: PureModel,
    *,
    z_loss_coef: float = 0.0,
    constrain_BLD: Callable | None = None,
    merge: Callable | None = None,
) -> Callable:
    """`(params, batch[, frozen]) -> sums`: token-weighted sums to aggregate over eval
    batches (with `merge`, of the model's parameters `merge(frozen, params)`)."""

    def eval_step(params, batch, *frozen):
        logits_BLV = model.apply(
            params if merge is None else merge(*frozen, params),
            batch["inputs"],
            positions_BL=batch["positions"],
            segment_ids_BL=batch["segment_ids"],
            constrain_BLD=constrain_BLD,
        )
        out = lm_loss(logits_BLV, batch["targets"], batch["loss_mask"], z_loss_coef=z_loss_coef)
        n = out.num_tokens
        return {"ce_sum": out.ce * n, "correct_sum": out.accuracy * n, "num_tokens": n}

    return eval_step


@dataclasses.dataclass
class Steps:
    """Jitted steps and the shardings they were built with.

    With LoRA the state holds the adapters; the frozen base weights are the
    steps' last argument: call ``train_step(state, batch, *steps.frozen)``
    (``frozen`` is () without LoRA, filled with the base parameters by whoever
    loads them, `lm_align.train.setup.build_experiment`).
    """

    train_step: Callable  # (state, batch, *frozen) -> (state, metrics), donates state
    eval_step: Callable  # (params, batch, *frozen) -> sums
    init_state: Callable  # () -> TrainState, created directly in its sharding
    state_shardings: Any
    batch_sharding: Any
    abstract_state: Any  # ShapeDtypeStructs with shardings (restore target)
    frozen_abstract: Any = None  # LoRA: the base parameters' ShapeDtypeStructs with shardings
    frozen: tuple = ()  # () or (base parameters,): the steps' arguments after the batch
    merge: Callable | None = None  # LoRA: jitted (base, adapters) -> the model's parameters

    def model_params(self, params):
        """The model's parameters for the trained `params` (LoRA: merged into the base)."""
        return params if self.merge is None else self.merge(*self.frozen, params)


def state_shardings(model, tx: optax.GradientTransformation, mesh, seed: int = 0):
    """(abstract TrainState, its shardings): params by their logical axes, optimizer
    moments like their params, everything else replicated. `model` is anything
    with `init(seed)` and `logical_axes` (a PureModel, a RewardModel)."""
    abstract = jax.eval_shape(lambda: init_state(model, tx, seed))
    param_sh = parallel.logical_to_sharding(model.logical_axes, abstract.params, mesh)
    rep = parallel.replicated(mesh)
    state_sh = TrainState(
        step=rep,
        params=param_sh,
        opt_state=parallel.opt_state_shardings(
            tx, param_sh, abstract.params, abstract.opt_state, mesh
        ),
        rng=rep,
        skipped=rep,
    )
    return abstract, state_sh


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying `shardings` (restore targets)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def build_steps(
    model: PureModel,
    tx: optax.GradientTransformation,
    schedule: Callable,
    mesh,
    *,
    seed: int,
    z_loss_coef: float = 0.0,
    grad_accum_steps: int = 1,
    nonfinite: str = "halt",
    loss_chunks: int = 0,
    lora: Lora | None = None,
) -> Steps:
    """Shards and jits the steps on `mesh` (same code for 1 device and N).

    With `lora` the state trains its adapters (sharded like their base
    weights) and the steps take the frozen base parameters after the batch.
    """
    trained = model if lora is None else lora
    abstract, state_sh = state_shardings(trained, tx, mesh, seed)
    param_sh, rep = state_sh.params, state_sh.step
    batch_sh = parallel.batch_sharding(mesh)
    batch_shardings = {k: batch_sh for k in BATCH_KEYS}
    # Keep the residual stream batch-sharded: otherwise it inherits the embedding
    # table's sharding at the lookup and XLA falls back to replicating it.
    constrain_BLD = lambda x: jax.lax.with_sharding_constraint(x, batch_sh)
    merge = None if lora is None else lora.merge
    frozen_sh = ()
    if lora is not None:
        frozen_sh = (parallel.logical_to_sharding(model.logical_axes, model.abstract_params, mesh),)

    train_step = jax.jit(
        parallel.in_mesh(
            make_train_step(
                model,
                tx,
                schedule,
                z_loss_coef=z_loss_coef,
                grad_accum_steps=grad_accum_steps,
                nonfinite=nonfinite,
                loss_chunks=loss_chunks,
                constrain_BLD=constrain_BLD,
                merge=merge,
            ),
            mesh,
        ),
        in_shardings=(state_sh, batch_shardings, *frozen_sh),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        parallel.in_mesh(
            make_eval_step(
                model, z_loss_coef=z_loss_coef, constrain_BLD=constrain_BLD, merge=merge
            ),
            mesh,
        ),
        in_shardings=(param_sh, batch_shardings, *frozen_sh),
        out_shardings=rep,
    )
    init = jax.jit(lambda: init_state(trained, tx, seed), out_shardings=state_sh)
    steps = Steps(
        train_step, eval_step, init, state_sh, batch_sh, with_shardings(abstract, state_sh)
    )
    if lora is not None:
        steps.frozen_abstract = with_shardings(model.abstract_params, frozen_sh[0])
        steps.merge = jax.jit(merge, out_shardings=frozen_sh[0])
    return steps
