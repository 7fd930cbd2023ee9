"""The preference trainer: `lm-align align --config experiments/x.py`.

A policy initialised from a checkpoint is trained on preference records
(pairs or lists, JSON Lines) with the objective `align.loss`
(`lm_align.align.objectives`) against a frozen reference;
`align.loss = bradley_terry` trains a reward model (the policy's Transformer
with a scalar head) on pairs instead. The step is sharded and jitted like
pretraining (params by their logical axes, the batch over data/fsdp) and
applies the same update (`lm_align.train.step.apply_update`); the run is
checkpointed and resumable the same way (`lm_align.train.run.Run`): SIGTERM
saves at the next step boundary and rerunning the command continues exactly.

Every batch is a list batch (`lm_align.align.batches`): rows [B, K, L]
(pairs are K = 2 lists, chosen first), labels [B, K] and a response mask, so
pairwise losses, listwise losses on lists and listwise losses on pairs share
one step. Reference log-probs are computed once for the whole data set
(`align.precompute_reference`, cached in WORKDIR/reference_logps.npz) or in
every step. With LoRA (``lora.rank > 0``) the state trains adapters
(`lm_align.models.lora`) and the reference is their base, adapters off: the
base parameters are the step's reference argument, merged with the adapters
inside the step, so the reference is no second copy of the model.

Metrics (docs/metrics.md): loss, reward_accuracy (fraction of label-ordered
response pairs whose implicit reward beta * (log pi - log ref) is ordered the
same way), reward_margin, reward_chosen / reward_rejected (pairs), and at eval
steps the held-out metrics of `lm_align.align.held_out`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm_align import data as data_lib
from lm_align import parallel
from lm_align.align import held_out
from lm_align.align.batches import BatchOrder, PreferenceArrays, load_preferences, map_records
from lm_align.align.config import LISTWISE_LOSSES, REWARD_LOSSES, resolved_format
from lm_align.align.objectives import objective, weighted_means
from lm_align.align.setup import AlignSetup, initial_state, setup
from lm_align.data.jsonl import match_files
from lm_align.models.lora import describe as describe_lora
from lm_align.train import checkpoint
from lm_align.train.run import Loop, Run, TrainResult
from lm_align.train.step import TrainState, apply_update
from lm_align.utils import log

NONFINITE_FIX = "Lower optimizer.lr or align.beta, or set train.nonfinite=skip."


def make_align_step(
    a,
    score_rows: Callable,
    tx: optax.GradientTransformation,
    schedule: Callable,
    *,
    nonfinite: str = "halt",
    online_reference: bool = False,
    merge: Callable | None = None,
) -> Callable:
    """`(state, batch[, ref_params]) -> (state, metrics)`: one preference update.

    `score_rows(params, rows [B, K, L]) -> [B, K]` (sequence log-probs, or
    rewards). Without `online_reference` the batch carries `ref_logps` [B, K];
    with it, they are computed from `ref_params` (no gradient). With `merge`
    (LoRA) the state holds adapters and the policy is `merge(ref_params,
    state.params)`: the reference is the base with the adapters off, scored
    by the same forward code. The update is `apply_update`'s, the same as
    language-model training.
    """

    def loss_fn(params, batch, ref_params):
        policy = params if merge is None else merge(ref_params, params)
        scores = score_rows(policy, batch["rows"])
        if online_reference:
            ref = jax.lax.stop_gradient(score_rows(ref_params, batch["rows"]))
        else:
            ref = batch.get("ref_logps", jnp.zeros_like(scores))
        loss_B, metrics = objective(a, scores, ref, batch)
        out = weighted_means(loss_B, metrics, batch["weight"])
        return out["loss"], out

    def step(state: TrainState, batch, ref_params=None):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, ref_params
        )
        new, update_metrics, _ = apply_update(state, grads, loss, tx, schedule, nonfinite=nonfinite)
        return new, {**metrics, **update_metrics}

    return step


def reference_in_step(a) -> bool:
    """Does each step score the frozen reference itself (`align.precompute_reference =
    false`)? Reward models have no reference."""
    return a.loss not in REWARD_LOSSES and not a.precompute_reference


def takes_reference(s: AlignSetup, online: bool) -> bool:
    """Does the step take the reference parameters: when it scores the reference
    (`online`) and, with LoRA, always (they are the base the adapters merge into)."""
    return online or s.lora is not None


def jit_step(s: AlignSetup, online: bool):
    """The jitted preference step, sharded on `s.mesh`, donating the state:
    `(state, batch) -> (state, metrics)`, or when it `takes_reference`
    `(state, batch, ref_params) -> (state, metrics)`."""
    step_fn = make_align_step(
        s.cfg.align, s.score_rows, s.tx, s.schedule, nonfinite=s.cfg.train.nonfinite,
        online_reference=online, merge=None if s.lora is None else s.lora.merge,
    )  # fmt: skip
    in_shardings = (s.state_shardings, s.batch_sharding)
    if takes_reference(s, online):
        in_shardings += (s.policy_shardings,)
    return jax.jit(
        parallel.in_mesh(step_fn, s.mesh),
        in_shardings=in_shardings,
        out_shardings=(s.state_shardings, parallel.replicated(s.mesh)),
        donate_argnums=(0,),
    )


def _compile_step(s: AlignSetup, ref_params, online: bool) -> Callable:
    """The jitted `(state, batch) -> (state, metrics)`; donates the state."""
    jitted = jit_step(s, online)
    if not takes_reference(s, online):
        return jitted
    return lambda state, batch: jitted(state, batch, ref_params)


# ---------------------------------------------------------------------------
# The reference log-probs, computed once and cached.


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_stamp(pattern: str) -> list:
    return [(p, os.path.getsize(p), os.path.getmtime(p)) for p in match_files(pattern)]


def reference_key(s: AlignSetup, K: int) -> str:
    """Identifies the cached reference log-probs: reference, files, lengths, model."""
    cfg, a = s.cfg, s.cfg.align
    ref_path = a.reference_checkpoint or a.policy_checkpoint
    return _fingerprint(
        str(checkpoint.resolve(ref_path)) if ref_path else f"init seed {cfg.train.seed}",
        _file_stamp(a.train_file),
        a.eval_file and _file_stamp(a.eval_file),
        a.max_len,
        K,
        a.format,
        a.loss in LISTWISE_LOSSES,
        cfg.model.to_dict(),
    )


def precompute_reference(
    s: AlignSetup, ref_params, datasets: dict[str, PreferenceArrays], workdir: str, key: str
) -> None:
    """Fills each data set's `ref_logps`, cached in WORKDIR/reference_logps.npz under `key`."""
    path = os.path.join(workdir, "reference_logps.npz")
    if os.path.exists(path):
        cached = np.load(path)
        if str(cached["key"]) == key and all(name in cached for name in datasets):
            for name, data in datasets.items():
                data.ref_logps = cached[name]
            log(f"reference log-probs: loaded from {path}")
            return
    fn = jax.jit(parallel.in_mesh(s.score_rows, s.mesh), out_shardings=parallel.replicated(s.mesh))
    batch_size = s.cfg.train.batch_size
    for data in datasets.values():
        outs = map_records(lambda b: fn(ref_params, b["rows"]), data, batch_size, s.batch_sharding)
        data.ref_logps = np.concatenate([o[:n] for o, n in outs]).astype(np.float32)
    if jax.process_index() == 0:
        tmp = path + ".tmp.npz"
        np.savez(tmp, key=np.array(key), **{n: d.ref_logps for n, d in datasets.items()})
        os.replace(tmp, path)
    log(f"reference log-probs: computed for {sum(len(d) for d in datasets.values())} records")


# ---------------------------------------------------------------------------
# The run.


def _load_data(s: AlignSetup) -> tuple[PreferenceArrays, PreferenceArrays | None]:
    a = s.cfg.align
    tokenizer = data_lib.make_tokenizer(s.cfg.data.tokenizer)
    train_data = load_preferences(a.train_file, a, tokenizer, num_responses=a.num_responses or None)
    K = train_data.labels.shape[1]
    eval_data = (
        load_preferences(a.eval_file, a, tokenizer, num_responses=K) if a.eval_file else None
    )
    return train_data, eval_data


def _describe_start(s: AlignSetup, train_data, eval_data, devices) -> str:
    a = s.cfg.align
    kind = "reward model" if a.loss in REWARD_LOSSES else "policy"
    K = train_data.labels.shape[1]
    return (
        f"{kind}: {s.model.num_params():,} params; loss {a.loss}; "
        f"{len(train_data)} {resolved_format(a)} records (K={K})"
        + (f", {len(eval_data)} held out" if eval_data else "")
        + f"; mesh {dict(s.mesh.shape)} on {len(devices)} {devices[0].platform} device(s)"
        + (f"; starting from {a.policy_checkpoint}" if a.policy_checkpoint else "; fresh init")
        + ("" if s.lora is None else "\n" + describe_lora(s.lora, s.policy_model, a.policy_checkpoint)
           + "; the reference is the base (adapters off)")
    )  # fmt: skip


def align(cfg, workdir: str, *, devices=None) -> TrainResult:
    """Trains (or resumes) the preference experiment `cfg` in `workdir`."""
    devices = list(jax.devices() if devices is None else devices)
    s = setup(cfg, devices)
    run = Run(s.cfg, workdir)
    a, t = s.cfg.align, s.cfg.train
    train_data, eval_data = _load_data(s)
    order = BatchOrder(
        len(train_data), t.batch_size, t.seed, jax.process_index(), jax.process_count()
    )
    ref_params = s.reference_params()
    online = reference_in_step(a)
    if a.loss not in REWARD_LOSSES and a.precompute_reference:
        sets = {"train": train_data, **({"eval": eval_data} if eval_data else {})}
        key = reference_key(s, train_data.labels.shape[1])
        precompute_reference(s, ref_params, sets, workdir, key)

    start, state, finished = run.restore_or_init(
        s.abstract_state, lambda: initial_state(s, s.init_params(), t.seed), order.set_state
    )
    if finished is not None:
        return TrainResult(start, None, finished, workdir, state)
    log(_describe_start(s, train_data, eval_data, devices))

    def run_eval(params):
        policy = s.model_params(params, ref_params)
        return held_out.evaluate_policy(s, policy, ref_params, eval_data, seed=t.seed)

    if start == 0 and a.eval_at_start:  # every process: the eval runs collectives
        run.writer.write(0, row := run_eval(state.params))
        log("start: " + held_out.describe(row))
    loop = Loop(
        train_step=_compile_step(s, ref_params, online),
        next_batch=lambda: parallel.global_batch(train_data.take(next(order)), s.batch_sharding),
        data_state=order.get_state,
        run_eval=run_eval,
        describe=lambda m: (
            f"loss {float(m['loss']):.4f}  reward_acc {float(m['reward_accuracy']):.3f}  "
            f"margin {float(m['reward_margin']):.3f}  lr {float(m['lr']):.2e}"
        ),
        tokens_per_step=int(t.batch_size * train_data.labels.shape[1] * a.max_len),
        nonfinite_fix=NONFINITE_FIX,
    )
    state, stopped_by, row = run.loop(state, start, loop)
    result = run.finish(state, stopped_by, row)
    if result.stopped_by is None and result.final_step == t.steps:
        log("end: " + held_out.describe(result.metrics))
    return result
