"""The training loop: `train(cfg, workdir)`.

Resumes automatically from the newest checkpoint in WORKDIR. SIGTERM/SIGINT
save a checkpoint at the next step boundary and return cleanly. A non-finite
loss either halts (default; nothing after the last finite step is saved) or
drops that update ("skip"). Metrics go to WORKDIR/metrics.jsonl, TensorBoard
(WORKDIR/tb) and a progress bar.

The host reads each step's metrics one step late, so the device always has
the next step queued; checkpoints are only written after the losses leading to
them were checked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np

from lm_align import config as config_lib
from lm_align import data as data_lib
from lm_align import distributed, parallel
from lm_align.train import evaluate
from lm_align.train.checkpoint import Checkpointer
from lm_align.train.metrics import MetricWriter, Progress
from lm_align.train.setup import build_experiment


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became non-finite in "halt" mode."""


class _StopFlag:
    """Records SIGTERM/SIGINT so the loop can checkpoint at a step boundary.

    With several processes, JAX's preemption sync manager (started by
    `jax.distributed`) receives SIGTERM instead, and `should_stop(step)` is
    true on every process at the same step, so all of them save the same
    checkpoint: a process that stopped alone would leave the others waiting
    in a collective.
    """

    def __init__(self):
        self.signal = None
        self._previous = {}
        self._multiprocess = jax.process_count() > 1

    def should_stop(self, step: int) -> bool:
        if self._multiprocess:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal = "SIGTERM"
        return self.signal is not None

    def __enter__(self):
        if self._multiprocess:
            return self  # SIGTERM belongs to the preemption sync manager
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class TrainResult:
    final_step: int
    stopped_by: str | None  # None (finished), "SIGTERM", "SIGINT"
    metrics: dict  # the last logged row plus final eval results
    workdir: str
    state: Any = None  # the final TrainState (sharded jax.Arrays)


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _per_step_tokens(cfg) -> int:
    return cfg.train.batch_size * cfg.data.seq_len


def train(cfg, workdir: str, *, devices=None) -> TrainResult:
    """Trains (or resumes) the experiment `cfg` in `workdir`."""
    devices = list(jax.devices() if devices is None else devices)
    distributed.check_startup(config_lib.to_json(cfg), workdir)
    exp = build_experiment(cfg, devices)
    t = cfg.train
    os.makedirs(workdir, exist_ok=True)
    mesh, model, model_cfg, steps = exp.mesh, exp.model, exp.model_cfg, exp.steps
    config_dict = cfg.to_dict()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(cfg))

    seq_len, local_batch = cfg.data.seq_len, t.batch_size // jax.process_count()
    train_iter = data_lib.make_batch_iterator(
        cfg.data,
        split="train",
        seq_len=seq_len,
        batch_size=local_batch,
        seed=t.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )

    init_state = steps.init_state
    if t.init_from:

        def init_state():
            from lm_align.align.checkpoints import load_params, resolve

            ref = resolve(t.init_from)
            params = load_params(ref, steps.abstract_state.params)
            _log(f"parameters from {ref} (fresh optimizer state)")
            fresh = jax.jit(
                lambda s, p: s._replace(params=p, opt_state=exp.optimizer.tx.init(p)),
                out_shardings=steps.state_shardings,
                donate_argnums=(0,),
            )
            return fresh(steps.init_state(), params)

    ckpt = Checkpointer(workdir, keep=t.keep_checkpoints, async_save=t.async_checkpointing)
    start, state, finished = restore_or_init(
        ckpt,
        workdir,
        t.steps,
        steps.abstract_state,
        init_state,
        train_iter.set_state,
        config_dict,
    )
    if finished is not None:
        return TrainResult(start, None, finished, workdir, state)
    _log(
        f"model: {model.num_params():,} params "
        f"({model_cfg.num_params(matmul_only=True):,} in matmuls), "
        f"{model_cfg.flops_per_token(seq_len) / 1e6:.1f} MFLOP/token; mesh {dict(mesh.shape)} "
        f"on {len(devices)} {devices[0].platform} device(s)"
    )
    if jax.process_index() == 0:
        _log("data: " + data_lib.describe_source(cfg.data, seq_len=seq_len).replace("\n", "\n  "))

    writer = MetricWriter(workdir, tensorboard=t.tensorboard, resume_step=start)

    def run_eval(params):
        return evaluate.eval_loss(
            steps.eval_step,
            params,
            cfg.data,
            seq_len=seq_len,
            batch_size=local_batch,
            num_batches=t.eval_batches,
            batch_sharding=steps.batch_sharding,
            seed=t.seed,
        )

    state, stopped_by, last_row = run_loop(
        t,
        state,
        start,
        train_step=steps.train_step,
        next_batch=lambda: parallel.global_batch(next(train_iter), steps.batch_sharding),
        data_state=train_iter.get_state,
        ckpt=ckpt,
        config_dict=config_dict,
        writer=writer,
        tokens_per_step=_per_step_tokens(cfg),
        describe=lambda m: (
            f"loss {float(m['loss']):.4f}  acc {float(m['accuracy']):.3f}  lr {float(m['lr']):.2e}"
        ),
        run_eval=run_eval,
        nonfinite_fix=(
            "Lower optimizer.lr, raise train.z_loss_coef or enable model.qk_layernorm, or set "
            "train.nonfinite=skip to drop such updates."
        ),
    )

    final_step = int(jax.device_get(state.step))
    result = dict(last_row)
    if stopped_by is None and final_step == t.steps:
        if t.answer_eval_examples:
            result.update(
                evaluate.answer_accuracy(
                    model,
                    state.params,
                    cfg.data,
                    num_examples=t.answer_eval_examples,
                    max_new_tokens=t.answer_max_new_tokens,
                    verbose_examples=4,
                )
            )
        result["unigram_baseline_loss"] = evaluate.unigram_entropy(cfg.data, seq_len=seq_len)
        if jax.process_index() == 0:
            summary = {k: v for k, v in result.items() if k != "samples"}
            with open(os.path.join(workdir, "final.json"), "w") as f:
                json.dump({k: _jsonable(v) for k, v in summary.items()}, f, indent=2)
    return TrainResult(final_step, stopped_by, result, workdir, state)


def restore_or_init(
    ckpt: Checkpointer,
    workdir: str,
    total_steps: int,
    abstract_state,
    init_state: Callable[[], Any],
    set_data_state: Callable[[Any], None],
    config_dict: dict,
) -> tuple[int, Any, dict | None]:
    """(start step, state, final metrics or None) from the newest checkpoint, or a fresh state.

    Logs the config fields changed since the checkpoint. When the run already
    finished (`final.json` written at `total_steps`) the final metrics are
    returned and the checkpointer is closed.
    """
    start = _newest_intact_step(ckpt)
    if start is None:
        return 0, init_state(), None
    state, data_state, saved_config = ckpt.restore(start, abstract_state)
    set_data_state(data_state)
    _log(f"resumed from {ckpt.directory}/{start} (step {start} of {total_steps})")
    for line in _config_changes(saved_config, config_dict):
        _log(f"  config changed since the checkpoint: {line}")
    final_path = os.path.join(workdir, "final.json")
    if start >= total_steps and os.path.exists(final_path):
        ckpt.close()
        _log(f"{workdir} already finished {start} steps; raise train.steps to continue")
        with open(final_path) as f:
            return start, state, json.load(f)
    return start, state, None


def _newest_intact_step(ckpt: Checkpointer) -> int | None:
    """The newest checkpoint step that verifies; broken newer ones are moved aside and reported."""
    for path in ckpt.interrupted_saves():
        _log(f"ignoring {path}: a save that was interrupted before it finished")
    steps = sorted(ckpt.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        problem = ckpt.verify(step)
        if problem is None:
            return step
        dest = ckpt.quarantine(step)
        older = steps[i + 1 :]
        fallback = f"step {older[0]}" if older else "the start (no older checkpoint)"
        _log(
            f"checkpoint {ckpt.directory}/{step} is incomplete or corrupt ({problem}); moved it to "
            f"{dest} and resuming from {fallback}"
        )
    return None


def run_loop(
    t,
    state,
    start: int,
    *,
    train_step: Callable,
    next_batch: Callable[[], Any],
    data_state: Callable[[], Any],
    ckpt: Checkpointer,
    config_dict: dict,
    writer: MetricWriter,
    tokens_per_step: int,
    describe: Callable[[dict], str],
    run_eval: Callable[[Any], dict],
    nonfinite_fix: str,
) -> tuple[Any, str | None, dict]:
    """Steps `start + 1 .. t.steps` of any `(state, batch) -> (state, metrics)` step.

    Shared by `lm-align train` and `lm-align align`. `t` is the train config
    group (steps, log_every, eval_every, checkpoint_every, nonfinite,
    progress). Metrics must hold `loss`, `grad_norm` and `finite`; `describe`
    formats a progress line from them and `run_eval(params)` returns eval
    metrics (keys starting with `eval_`) for eval steps. Checkpoints hold the
    state, `data_state()` and `config_dict`. SIGTERM/SIGINT save a checkpoint
    at the next step boundary. Returns (state, stopped_by, last logged row).
    """
    progress = Progress(total=t.steps, initial=start, enabled=t.progress)
    last_row: dict[str, Any] = {}
    pending = None  # (step, device metrics) not yet read on the host
    interval_start, interval_steps = time.perf_counter(), 0
    stopped_by = None

    def is_eval_step(step):
        return step == t.steps or bool(t.eval_every and step % t.eval_every == 0)

    def drain(params_after=None):
        """Reads the pending step's metrics on the host: finite check, logging.

        `params_after` (the params after that step) is given exactly when the
        pending step is drained right after it was dispatched; eval steps are.
        """
        nonlocal pending, interval_start, interval_steps, last_row
        if pending is None:
            return
        step, metrics = pending
        pending = None
        m = jax.device_get(metrics)
        interval_steps += 1
        if t.nonfinite == "halt" and not bool(m["finite"]):
            good = ckpt.latest_step()
            good = "none" if good is None else good
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, grad_norm="
                f"{float(m['grad_norm'])}); the newest checkpoint ({good}) "
                f"is untouched. {nonfinite_fix}"
            )
        progress.update(1, loss=f"{float(m['loss']):.4f}")
        evaluating = is_eval_step(step) and params_after is not None
        # Step 1 is always logged: its loss is the loss at initialisation.
        if step % t.log_every == 0 or step == 1 or evaluating:
            elapsed = time.perf_counter() - interval_start
            row = {k: v for k, v in m.items() if k != "finite"}
            row["tokens_per_s"] = tokens_per_step * interval_steps / max(elapsed, 1e-9)
            row["tokens"] = tokens_per_step * step
            if evaluating:
                row.update(run_eval(params_after))
            last_row = writer.write(step, row)
            eta = (t.steps - step) * elapsed / max(interval_steps, 1)
            progress.write(
                f"step {step:>6}/{t.steps}  {describe(m)}  {row['tokens_per_s']:,.0f} tok/s  "
                f"eta {eta:,.0f}s"
                + (f"  eval_loss {row['eval_loss']:.4f}" if "eval_loss" in row else "")
            )
            interval_start, interval_steps = time.perf_counter(), 0

    with _StopFlag() as stop:
        try:
            for step in range(start + 1, t.steps + 1):
                state, metrics = train_step(state, next_batch())
                drain()  # the previous step, while this one runs
                pending = (step, metrics)
                save_now = (
                    t.checkpoint_every and step % t.checkpoint_every == 0
                ) or step == t.steps
                stopping = stop.should_stop(step)
                if stopping or save_now or is_eval_step(step):
                    drain(state.params)
                if stopping or save_now:
                    ckpt.save(step, state, data_state(), config_dict)
                if stopping:
                    stopped_by = stop.signal
                    _log(
                        f"{stop.signal}: saved checkpoint at step {step}; "
                        "rerun the same command to resume"
                    )
                    break
            drain()
        finally:
            progress.close()
            ckpt.close()
            writer.close()
    return state, stopped_by, last_row


def _config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'group.field: old -> new' for every field that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, f"{prefix}{key}.")
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (
            list(b) if isinstance(b, (list, tuple)) else b
        ):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _jsonable(v):
    if isinstance(v, (np.generic, np.ndarray)):
        return np.asarray(v).tolist()
    return v
