"""One training run in a workdir: the prologue, the step loop and the epilogue every trainer shares.

`lm-align train` (language modelling) and `lm-align align` (preferences,
reward models, policy gradients) differ only in their step, their batches and
their evaluation; everything around them is a `Run`:

    run = Run(cfg, workdir)                   # start-up checks, WORKDIR/config.json
    start, state, finished = run.restore_or_init(abstract_state, init_state, data.set_state)
    if finished is None:
        state, stopped_by, row = run.loop(state, start, Loop(train_step, next_batch, ...))
        result = run.finish(state, stopped_by, row)

Resuming: the newest checkpoint step that verifies is restored (damaged newer
ones are moved to WORKDIR/checkpoints_corrupt/ and reported), with its data
state, and the config fields changed since are listed. SIGTERM/SIGINT save a
checkpoint at the next step boundary and return cleanly. A non-finite loss
either halts (default; nothing after the last finite step is saved) or drops
that update (``train.nonfinite=skip``, see `lm_align.train.step.apply_update`).
Metrics go to WORKDIR/metrics.jsonl, TensorBoard (WORKDIR/tb) and a progress
bar. The host reads each step's metrics one step late, so the device always
has the next step queued; checkpoints are only written after the losses
leading to them were checked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax

from lm_align import config as config_lib
from lm_align import distributed
from lm_align.train.checkpoint import Checkpointer, holds_params_only
from lm_align.train.metrics import MetricWriter, Progress
from lm_align.utils import log, write_atomic, write_json


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became non-finite in "halt" mode."""


@dataclasses.dataclass
class TrainResult:
    final_step: int
    stopped_by: str | None  # None (finished), "SIGTERM", "SIGINT"
    metrics: dict  # the last logged row plus final eval results
    workdir: str
    state: Any = None  # the final TrainState (sharded jax.Arrays)


@dataclasses.dataclass
class Loop:
    """What a trainer hands the shared step loop."""

    train_step: Callable  # (state, global batch) -> (state, metrics); metrics hold
    #                       loss, grad_norm, finite (see apply_update)
    next_batch: Callable[[], Any]  # () -> the next global batch (sharded)
    data_state: Callable[[], Any]  # () -> JSON-able data position, saved with checkpoints
    run_eval: Callable[[Any], dict]  # params -> {"eval_...": value} at eval steps
    describe: Callable[[dict], str]  # host metrics -> the progress line's middle
    tokens_per_step: int  # for tokens/s and the `tokens` column
    nonfinite_fix: str  # the advice in NonFiniteLossError


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


class Run:
    """A training run in `workdir` for the experiment `cfg` (its `train` group drives the loop).

    Construction runs the multi-process start-up checks (devices, identical
    configs, one shared workdir) and writes WORKDIR/config.json. Only process
    0 writes files and logs.
    """

    def __init__(self, cfg, workdir: str):
        config_json = config_lib.to_json(cfg)
        distributed.check_startup(config_json, workdir)
        self.cfg, self.t, self.workdir = cfg, cfg.train, workdir
        self.config_dict = cfg.to_dict()
        os.makedirs(workdir, exist_ok=True)
        if jax.process_index() == 0:
            write_atomic(os.path.join(workdir, "config.json"), config_json)
        self.ckpt = Checkpointer(
            workdir, keep=self.t.keep_checkpoints, async_save=self.t.async_checkpointing
        )
        self.writer: MetricWriter | None = None

    @property
    def final_path(self) -> str:
        return os.path.join(self.workdir, "final.json")

    def restore_or_init(
        self, abstract_state, init_state: Callable[[], Any], set_data_state: Callable[[Any], None]
    ) -> tuple[int, Any, dict | None]:
        """(start step, state, final metrics or None) from the newest intact checkpoint, or fresh.

        When the run already finished (``final.json`` written at ``train.steps``)
        the final metrics are returned and the checkpointer is closed;
        otherwise the metric writer opens at the start step (rows logged after
        it by an interrupted attempt are dropped).
        """
        start = self._newest_intact_step()
        if start is None:
            start, state = 0, init_state()
        else:
            state, data_state, saved_config = self._restore(start, abstract_state)
            set_data_state(data_state)
            log(f"resumed from {self.ckpt.directory}/{start} (step {start} of {self.t.steps})")
            for line in config_changes(saved_config, self.config_dict):
                log(f"  config changed since the checkpoint: {line}")
            if start >= self.t.steps and os.path.exists(self.final_path):
                self.ckpt.close()
                log(f"{self.workdir} already finished {start} steps; raise train.steps to continue")
                with open(self.final_path) as f:
                    return start, state, json.load(f)
        self.writer = MetricWriter(self.workdir, tensorboard=self.t.tensorboard, resume_step=start)
        return start, state, None

    def _restore(self, step: int, abstract_state):
        """`Checkpointer.restore`; a step of parameters alone (`lm-align hf import`) is a
        ConfigError saying how to start from it."""
        try:
            return self.ckpt.restore(step, abstract_state)
        except ValueError:
            if not holds_params_only(self.ckpt.step_dir(step)):
                raise
        raise config_lib.ConfigError(
            f"{self.workdir} holds a model's parameters only (`lm-align hf import`), not a run "
            "to resume; start a run in a new workdir from it with "
            f"--config.train.init_from={self.workdir} (lm-align train) or "
            f"--config.align.policy_checkpoint={self.workdir} (lm-align align)"
        )

    def _newest_intact_step(self) -> int | None:
        """The newest step that verifies; broken newer ones are moved aside and reported."""
        ckpt = self.ckpt
        for path in ckpt.interrupted_saves():
            log(f"ignoring {path}: a save that was interrupted before it finished")
        steps = sorted(ckpt.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            problem = ckpt.verify(step)
            if problem is None:
                return step
            dest = ckpt.quarantine(step)
            older = steps[i + 1 :]
            fallback = f"step {older[0]}" if older else "the start (no older checkpoint)"
            log(
                f"checkpoint {ckpt.directory}/{step} is incomplete or corrupt ({problem}); moved "
                f"it to {dest} and resuming from {fallback}"
            )
        return None

    def loop(self, state, start: int, spec: Loop) -> tuple[Any, str | None, dict]:
        """Steps ``start + 1 .. train.steps``; returns (state, stopped_by, last logged row).

        Checkpoints (every ``train.checkpoint_every`` steps, at the last step
        and on SIGTERM/SIGINT) hold the state, ``spec.data_state()`` and the
        config. Closes the checkpointer and the metric writer when done.
        """
        t = self.t
        reader = _MetricReader(self, spec, start)
        stopped_by = None
        with _StopFlag() as stop:
            try:
                for step in range(start + 1, t.steps + 1):
                    state, metrics = spec.train_step(state, spec.next_batch())
                    reader.drain()  # the previous step, while this one runs
                    reader.pending = (step, metrics)
                    save_now = bool(t.checkpoint_every and step % t.checkpoint_every == 0)
                    save_now = save_now or step == t.steps
                    stopping = stop.should_stop(step)
                    if stopping or save_now or reader.is_eval_step(step):
                        reader.drain(state.params)
                    if stopping or save_now:
                        self.ckpt.save(step, state, spec.data_state(), self.config_dict)
                    if stopping:
                        stopped_by = stop.signal
                        log(
                            f"{stop.signal}: saved checkpoint at step {step}; "
                            "rerun the same command to resume"
                        )
                        break
                reader.drain()
            finally:
                reader.progress.close()
                self.ckpt.close()
                self.writer.close()
        return state, stopped_by, reader.last_row

    def finish(
        self, state, stopped_by: str | None, row: dict, final_metrics: Callable | None = None
    ) -> TrainResult:
        """The run's result. When the run completed, `final_metrics(state)` (a dict) is added
        to the last row and the row (less ``samples``) goes to WORKDIR/final.json."""
        final_step = int(jax.device_get(state.step))
        result = dict(row)
        if stopped_by is None and final_step == self.t.steps:
            if final_metrics is not None:
                result.update(final_metrics(state))
            if jax.process_index() == 0:
                write_json(self.final_path, {k: v for k, v in result.items() if k != "samples"})
        return TrainResult(final_step, stopped_by, result, self.workdir, state)


class _MetricReader:
    """Reads step metrics on the host one step late: finite check, logging, progress, eval."""

    def __init__(self, run: Run, spec: Loop, start: int):
        self.run, self.spec, self.t = run, spec, run.t
        self.progress = Progress(total=self.t.steps, initial=start, enabled=self.t.progress)
        self.pending = None  # (step, device metrics) not yet read on the host
        self.last_row: dict[str, Any] = {}
        self.interval_start, self.interval_steps = time.perf_counter(), 0

    def is_eval_step(self, step: int) -> bool:
        t = self.t
        return step == t.steps or bool(t.eval_every and step % t.eval_every == 0)

    def drain(self, params_after=None) -> None:
        """Reads the pending step's metrics on the host.

        `params_after` (the params after that step) is given exactly when the
        pending step is drained right after it was dispatched; eval steps are.
        """
        if self.pending is None:
            return
        (step, metrics), self.pending = self.pending, None
        m = jax.device_get(metrics)
        self.interval_steps += 1
        if self.t.nonfinite == "halt" and not bool(m["finite"]):
            good = self.run.ckpt.latest_step()
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, grad_norm="
                f"{float(m['grad_norm'])}); the newest checkpoint "
                f"({'none' if good is None else good}) is untouched. {self.spec.nonfinite_fix}"
            )
        self.progress.update(1, loss=f"{float(m['loss']):.4f}")
        evaluating = self.is_eval_step(step) and params_after is not None
        # Step 1 is always logged: its loss is the loss at initialisation.
        if step % self.t.log_every == 0 or step == 1 or evaluating:
            self._log_row(step, m, params_after if evaluating else None)

    def _log_row(self, step: int, m: dict, eval_params) -> None:
        elapsed = time.perf_counter() - self.interval_start
        tokens_per_step = self.spec.tokens_per_step
        row = {k: v for k, v in m.items() if k != "finite"}
        row["tokens_per_s"] = tokens_per_step * self.interval_steps / max(elapsed, 1e-9)
        row["tokens"] = tokens_per_step * step
        if eval_params is not None:
            row.update(self.spec.run_eval(eval_params))
        self.last_row = self.run.writer.write(step, row)
        eta = (self.t.steps - step) * elapsed / max(self.interval_steps, 1)
        self.progress.write(
            f"step {step:>6}/{self.t.steps}  {self.spec.describe(m)}  "
            f"{row['tokens_per_s']:,.0f} tok/s  eta {eta:,.0f}s"
            + (f"  eval_loss {row['eval_loss']:.4f}" if "eval_loss" in row else "")
        )
        self.interval_start, self.interval_steps = time.perf_counter(), 0


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'group.field: old -> new' for every field that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (
            list(b) if isinstance(b, (list, tuple)) else b
        ):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
