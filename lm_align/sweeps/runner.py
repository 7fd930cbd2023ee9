"""Sweeps: one `lm-align train` process per set of overrides, resumable.

An experiment file may define, next to `get_config`,

    def get_sweep(arg=None):
        return [{"optimizer.lr": lr, "model.d_model": d}
                for d in (64, 128) for lr in (1e-3, 3e-3, 1e-2)]

a list of override dicts (dotted config key -> value). `run_sweep` checks
every override against the config before anything starts, then runs each as

    python -m lm_align.cli train --config <config_arg> --workdir <workdir>/<name> --config.k=v ...

and records its status in `<workdir>/<name>/run.json`:

- `finished`: the run wrote final.json;
- `diverged`: it stopped on a non-finite loss (exit status 3);
- `failed`: any other error (the last lines of stderr are kept in run.json);
- `interrupted`: it was stopped (SIGTERM) before finishing;
- `pending` / `running`: not started yet / alive.

Rerunning the same sweep skips finished and diverged runs and starts the
others again; interrupted ones resume from their own checkpoints.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lm_align import config as config_lib
from lm_align.sweeps import summary as summary_lib
from lm_align.sweeps.executor import (
    Executor,
    LocalExecutor,
    RunDirInUseError,
    RunEvent,
    RunSpec,
    lock_run_dir,
)
from lm_align.utils import write_atomic

DIVERGED_EXIT = 3  # `lm-align train`'s exit status on a non-finite loss
DONE = ("finished", "diverged")  # statuses a rerun skips
SWEEP_JSON = "sweep.json"
SWEEP_LOCK = "sweep.lock"
MAX_NAME_LEN = 120


@dataclasses.dataclass
class SweepResult:
    """What `run_sweep` did: every run's status, and the signal that stopped it."""

    workdir: str
    runs: list[RunSpec]
    statuses: dict[str, str]  # run name -> status
    stopped_by: str | None = None  # "SIGTERM", "SIGINT", "SIGHUP" or None

    def count(self, status: str) -> int:
        return sum(s == status for s in self.statuses.values())

    @property
    def failed(self) -> list[str]:
        return [name for name, s in self.statuses.items() if s == "failed"]


# ---------------------------------------------------------------------------
# Reading and checking the sweep


def load_sweep(config_arg: str) -> list[dict[str, Any]]:
    """Calls the experiment's `get_sweep(arg)` and checks the shape of its result."""
    path, arg = config_lib.split_config_arg(config_arg)
    module = config_lib.load_experiment_module(path)
    if not hasattr(module, "get_sweep"):
        raise config_lib.ConfigError(
            f"{path} defines no get_sweep(); add `def get_sweep(arg=None)` returning a list of "
            'override dicts, e.g. [{"optimizer.lr": 1e-3}, {"optimizer.lr": 3e-3}]'
        )
    sweep = module.get_sweep(arg) if arg is not None else module.get_sweep()
    if not isinstance(sweep, (list, tuple)) or not sweep:
        raise config_lib.ConfigError(
            f"{path}: get_sweep() must return a non-empty list of override dicts, got {sweep!r}"
        )
    for i, overrides in enumerate(sweep):
        if not isinstance(overrides, Mapping) or not all(isinstance(k, str) for k in overrides):
            raise config_lib.ConfigError(
                f"{path}: get_sweep()[{i}] must be a dict of dotted config keys to values, "
                f"got {overrides!r}"
            )
    return [dict(o) for o in sweep]


def cli_value(value: Any) -> str:
    """The command-line text of an override value (parsed back to the same value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    return str(value)


def _name_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_name_value(v) for v in value)
    return str(value)


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Dotted key -> its last part, or the whole key where last parts collide."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def run_names(sweep: Sequence[Mapping[str, Any]]) -> list[str]:
    """Directory names: `<index>_<key>=<value>_...`, e.g. `003_lr=0.001_d_model=128`.

    The index is zero-padded to at least 3 digits; keys are shortened to their
    last part when that is unambiguous in the sweep; characters other than
    letters, digits and `._=+-,` become `-`; names are cut to 120 characters
    (the index keeps them unique).
    """
    keys = list(dict.fromkeys(k for o in sweep for k in o))
    short = short_keys(keys)
    width = max(3, len(str(len(sweep) - 1)))
    names = []
    for i, overrides in enumerate(sweep):
        parts = [f"{i:0{width}d}"] + [f"{short[k]}={_name_value(v)}" for k, v in overrides.items()]
        name = re.sub(r"[^A-Za-z0-9._=+,-]+", "-", "_".join(parts))
        names.append(name[:MAX_NAME_LEN])
    return names


def _json_normal(value):
    """`value` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _min_devices(cfg) -> int:
    """The fewest devices the config's mesh can run on (`-1` axes take 1)."""
    n = 1
    for axis in ("data", "fsdp", "tensor"):
        n *= max(1, int(cfg.mesh[axis]))
    return n


def _check_config(cfg) -> None:
    """The train command's own config checks (without touching any device)."""
    from lm_align.train.validate import check_config

    check_config(cfg, num_devices=_min_devices(cfg))


def plan_sweep(config_arg: str, workdir: str, extra_overrides: Sequence[str] = ()) -> list[RunSpec]:
    """The runs of the sweep, every override checked against the config.

    Raises ConfigError, naming the run index and key, when an override key is
    unknown, a value has the wrong type, a value would not read back the same
    from the command line, or the resulting config is invalid.
    """
    sweep = load_sweep(config_arg)
    base = config_lib.load_config(config_arg)
    try:
        base = config_lib.apply_overrides(base, list(extra_overrides))
    except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"command-line override: {e}") from None
    given = {o.partition("=")[0].strip() for o in extra_overrides}
    for i, overrides in enumerate(sweep):
        both = sorted(given & set(overrides))
        if both:
            raise config_lib.ConfigError(
                f"{', '.join(both)} set both on the command line and by sweep run {i}; "
                "drop the command-line override (each run takes its value from get_sweep())"
            )
    names = run_names(sweep)
    runs = []
    for i, (name, overrides) in enumerate(zip(names, sweep)):
        args = [f"{k}={cli_value(v)}" for k, v in overrides.items()]
        for key, value in overrides.items():
            try:
                config_lib.apply_overrides(base, {key: value})
            except config_lib.ConfigError as e:
                raise config_lib.ConfigError(f"sweep run {i} ({name}), key {key!r}: {e}") from None
        cfg = config_lib.apply_overrides(base, overrides)
        if config_lib.apply_overrides(base, args).to_dict() != cfg.to_dict():
            raise config_lib.ConfigError(
                f"sweep run {i} ({name}): overrides {overrides!r} do not read back the same "
                f"from the command line ({args}); use plain bool/int/float/str/tuple values"
            )
        try:
            _check_config(cfg)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"sweep run {i} ({name}) {overrides!r}: {e}") from None
        run_dir = os.path.join(workdir, name)
        argv = (
            sys.executable,
            "-m",
            "lm_align.cli",
            "train",
            "--config",
            config_arg,
            "--workdir",
            run_dir,
            *[f"--config.{o}" for o in extra_overrides],
            *[f"--config.{a}" for a in args],
        )
        runs.append(RunSpec(i, name, overrides, run_dir, argv))
    return runs


def read_run_json(run_dir: str) -> dict | None:
    return summary_lib.read_json(os.path.join(run_dir, summary_lib.RUN_JSON))


def check_workdir(workdir: str, runs: Sequence[RunSpec]) -> None:
    """Raises ConfigError if a run directory in `workdir` belongs to a different sweep.

    Every subdirectory holding a run.json must match, by index, name and
    overrides, a run of `runs`; otherwise the sweep changed since the workdir
    was started. Also raises if a run directory is held by a live process.
    """
    if not os.path.isdir(workdir):
        return
    by_index = {r.index: r for r in runs}
    for entry in sorted(os.listdir(workdir)):
        run_dir = os.path.join(workdir, entry)
        record = read_run_json(run_dir) if os.path.isdir(run_dir) else None
        if record is None:
            continue
        run = by_index.get(record.get("index"))
        recorded = record.get("overrides")
        if run is None or run.name != entry or _json_normal(run.overrides) != recorded:
            now = (
                f"the sweep's run {run.index} is {run.name} with overrides {run.overrides}"
                if run is not None
                else f"the sweep now has {len(runs)} runs"
            )
            raise config_lib.ConfigError(
                f"{run_dir} holds run {record.get('index')} with overrides {recorded}, but {now}: "
                "the sweep changed since this workdir was started. Use a new --workdir, or "
                f"delete {run_dir} to drop that run's results."
            )
        try:
            os.close(lock_run_dir(run_dir))
        except RunDirInUseError as e:
            raise config_lib.ConfigError(str(e)) from None


# ---------------------------------------------------------------------------
# Running


def _status(event: RunEvent) -> str:
    """finished / diverged / interrupted / failed, from how the run's process ended."""
    finished = os.path.exists(os.path.join(event.run.workdir, "final.json"))
    if event.returncode == 0 and finished:
        return "finished"
    if event.returncode == DIVERGED_EXIT:
        return "diverged"
    if event.returncode == 0 or event.stopped:
        return "interrupted"  # a SIGTERM (ours or the machine's) made it save and exit
    return "failed"


def _fmt_metric(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _describe_end(status: str, row: dict, event: RunEvent) -> str:
    if status == "finished":
        text = f"eval_loss {_fmt_metric(row.get('eval_loss'))}"
        if row.get("answer_exact_match") is not None:
            text += f"  exact_match {row['answer_exact_match']:.3f}"
        return text
    if status == "diverged":
        m = re.search(r"non-finite .*? at step (\d+)", event.stderr_tail)
        return f"non-finite loss at step {m.group(1)}" if m else "non-finite loss"
    if status == "interrupted":
        return f"at step {row.get('steps') or 0}"
    last = event.stderr_tail.strip().splitlines()[-1:] or ["(no stderr)"]
    return f"exit status {event.returncode}: {last[0][:200]}"


class _Sweep:
    """The bookkeeping of one `run_sweep` call: run.json files, summary, progress lines."""

    def __init__(self, workdir, runs, log):
        self.workdir, self.runs, self.log = workdir, runs, log
        self.records = {}
        for run in runs:
            record = read_run_json(run.workdir)
            if record is None:
                record = {"index": run.index, "name": run.name, "overrides": run.overrides}
                record.update(status="pending", attempts=0, wall_s=0.0)
            elif record.get("status") == "running":  # its sweep was killed
                record["status"] = "interrupted"
            self.records[run.index] = record
        self.keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
        self._rows: dict[int, dict] = {}  # index -> summary row, until its run changes

    def status(self, run: RunSpec) -> str:
        return self.records[run.index]["status"]

    def save(self, run: RunSpec) -> None:
        os.makedirs(run.workdir, exist_ok=True)
        path = os.path.join(run.workdir, summary_lib.RUN_JSON)
        write_atomic(path, json.dumps(self.records[run.index], indent=2) + "\n")

    def row(self, run: RunSpec) -> dict:
        if run.index not in self._rows:
            record = self.records[run.index]
            self._rows[run.index] = summary_lib.run_row(run.workdir, record, self.keys)
        return self._rows[run.index]

    def rows(self) -> list[dict]:
        return [self.row(r) for r in self.runs]

    def write_summary(self) -> None:
        summary_lib.write_summary(self.workdir, self.rows())

    def prefix(self, run: RunSpec) -> str:
        return f"[{run.index + 1}/{len(self.runs)}] {run.name}"

    def on_event(self, event: RunEvent) -> None:
        run, record = event.run, self.records[event.run.index]
        self._rows.pop(run.index, None)
        if event.kind == "started":
            record.update(
                status="running",
                attempts=record.get("attempts", 0) + 1,
                started=time.strftime("%Y-%m-%dT%H:%M:%S"),
                command=list(run.argv),
            )
            record.pop("stderr_tail", None)
            self.save(run)
            self.log(f"{self.prefix(run)} started")
            return
        status = _status(event)
        record.update(
            status=status,
            returncode=event.returncode,
            wall_s=round(record.get("wall_s", 0.0) + event.wall_s, 3),
            ended=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        if status == "failed":
            record["stderr_tail"] = event.stderr_tail
        self.save(run)
        row = self.row(run)
        self.log(
            f"{self.prefix(run)} {status} {_describe_end(status, row, event)} ({event.wall_s:.0f}s)"
        )
        self.write_summary()


class _SignalForwarder:
    """SIGTERM/SIGINT/SIGHUP stop the executor: the first politely, the next by force."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, executor: Executor):
        self.executor = executor
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:  # e.g. SIGHUP under nohup
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        force = self.received is not None
        self.received = self.received or signal.Signals(signum).name
        self.executor.stop(force=force)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _lock_sweep(workdir: str) -> int:
    fd = os.open(os.path.join(workdir, SWEEP_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise config_lib.ConfigError(
            f"another sweep is running in {workdir}; wait for it or stop it first"
        ) from None
    return fd


def _record_sweep(workdir: str, config_arg: str, extra_overrides, runs, log) -> None:
    """Writes WORKDIR/sweep.json; notes command-line overrides that changed since last time."""
    path = os.path.join(workdir, SWEEP_JSON)
    previous = summary_lib.read_json(path)
    if previous is not None and previous.get("extra_overrides") != list(extra_overrides):
        log(
            f"note: command-line overrides changed since the last start "
            f"({previous.get('extra_overrides')} -> {list(extra_overrides)}); "
            "finished and diverged runs keep their results"
        )
    record = {
        "config": config_arg,
        "extra_overrides": list(extra_overrides),
        "runs": [{"index": r.index, "name": r.name, "overrides": r.overrides} for r in runs],
    }
    write_atomic(path, json.dumps(record, indent=2) + "\n")


def run_sweep(
    config_arg: str,
    workdir: str,
    *,
    parallel: int = 1,
    executor: Executor | None = None,
    extra_overrides: Sequence[str] = (),
    max_runs: int | None = None,
    log: Callable[[str], None] | None = None,
) -> SweepResult:
    """Runs (or resumes) the sweep of `config_arg` (`path[:arg]`) in `workdir`.

    Every override is checked before any run starts. Finished and diverged
    runs are skipped; the others run in index order, at most `parallel` at
    once (with the default `LocalExecutor`). `extra_overrides`
    (`"group.field=value"` strings) apply to every run. `max_runs` caps the
    runs started by this call. WORKDIR/summary.jsonl and summary.csv are
    rewritten after every run ends.

    SIGTERM, SIGINT or SIGHUP (from the main thread) forward SIGTERM to the
    running runs, which save a checkpoint and exit; the call then returns
    with `stopped_by` set. A second signal kills them (SIGKILL).
    """
    log = log or (lambda line: print(line, flush=True))
    if max_runs is not None and max_runs < 0:
        raise config_lib.ConfigError(f"max_runs={max_runs} must be >= 0")
    runs = plan_sweep(config_arg, workdir, extra_overrides)
    check_workdir(workdir, runs)
    executor = executor if executor is not None else LocalExecutor(parallel)
    os.makedirs(workdir, exist_ok=True)
    lock_fd = _lock_sweep(workdir)
    try:
        _record_sweep(workdir, config_arg, extra_overrides, runs, log)
        sweep = _Sweep(workdir, runs, log)
        todo = []
        for run in runs:
            if sweep.status(run) in DONE:
                log(f"{sweep.prefix(run)} {sweep.status(run)} earlier; skipped")
            else:
                todo.append(run)
        if max_runs is not None:
            todo = todo[:max_runs]
        sweep.write_summary()
        with _SignalForwarder(executor) as forwarder:
            executor.run(todo, sweep.on_event)
        sweep.write_summary()
        statuses = {r.name: sweep.status(r) for r in runs}
        return SweepResult(workdir, runs, statuses, forwarder.received)
    finally:
        os.close(lock_fd)


def describe_runs(runs: Sequence[RunSpec]) -> list[str]:
    """One line per run: name, status recorded in its run.json, overrides."""
    width = max(len(r.name) for r in runs)
    lines = []
    for run in runs:
        record = read_run_json(run.workdir) or {}
        status = record.get("status", "pending")
        overrides = " ".join(f"{k}={cli_value(v)}" for k, v in run.overrides.items())
        lines.append(f"{run.name:<{width}}  {status:<11}  {overrides}")
    return lines
