"""Executors: where a sweep's runs execute.

A sweep hands its executor a list of `RunSpec`s (a command line and a run
directory each) and a callback. The executor starts the runs, calls
`callback(RunEvent("started", ...))` when one starts and
`callback(RunEvent("ended", ...))` with its exit status when it ends, and
returns when every run has ended. `stop()` asks the running runs to stop
(SIGTERM: `lm-align train` saves a checkpoint and exits) and starts no new
ones. The sweep decides what an exit status means (finished, diverged, ...).

`LocalExecutor` runs each run as a subprocess of this machine, at most
`parallel` at a time. A Cloud TPU executor implements the same two methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from lm_align.utils import tail

LOCK_FILE = ".lock"  # in each run directory, held while its process lives
STDERR_TAIL_LINES = 20  # of a run's stderr, kept in its RunEvent and run.json


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its position, name, overrides and command line."""

    index: int  # position in get_sweep()'s list, from 0
    name: str  # directory name under the sweep's workdir, e.g. "003_lr=0.001"
    overrides: dict  # dotted config key -> value, as get_sweep() returned them
    workdir: str  # the run's directory (the `--workdir` of its train command)
    argv: tuple[str, ...]  # the full command line


@dataclasses.dataclass(frozen=True)
class RunEvent:
    """A run started (`kind="started"`) or ended (`kind="ended"`)."""

    kind: str  # "started" | "ended"
    run: RunSpec
    returncode: int | None = None  # ended: exit status; -N = killed by signal N
    wall_s: float = 0.0  # ended: seconds from start to exit
    stopped: bool = False  # ended: the executor had asked it to stop
    stderr_tail: str = ""  # ended: the last lines this attempt wrote to stderr


class Executor(Protocol):
    """Runs a sweep's runs; `LocalExecutor` is the reference implementation."""

    def run(self, runs: Sequence[RunSpec], callback: Callable[[RunEvent], None]) -> None:
        """Runs `runs` in order, reporting each start and end to `callback`.

        Returns when every run has ended or, after `stop()`, when the runs
        already started have ended (the others are never started).
        """

    def stop(self, force: bool = False) -> None:
        """Asks running runs to stop (SIGTERM; `force`: SIGKILL); starts no new ones.

        Safe to call from a signal handler while `run` is executing. A stopped
        executor stays stopped: use a new one for the next sweep.
        """


class RunDirInUseError(RuntimeError):
    """Another process (e.g. a run left over from a killed sweep) holds a run directory."""


def lock_run_dir(run_dir: str) -> int:
    """Takes the exclusive lock of `run_dir` and returns its file descriptor.

    Raises RunDirInUseError when another process holds it. The lock lasts as
    long as any process holding the descriptor (the run's own process
    inherits it), so a sweep restarted after being killed does not start a
    second process in a directory whose run is still alive.
    """
    os.makedirs(run_dir, exist_ok=True)
    fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirInUseError(
            f"{run_dir} is in use by another process (a run of an earlier sweep that is "
            "still alive?); wait for it to end or stop it, then rerun"
        ) from None
    return fd


@contextlib.contextmanager
def attempt_logs(run_dir: str, what: str):
    """Opens `run_dir`'s stdout.log and stderr.log for appending, each with a header line
    `=== <time> <what>`; yields (out, err, stderr path, stderr offset after the header)."""
    header = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {what}\n"
    err_path = os.path.join(run_dir, "stderr.log")
    with open(os.path.join(run_dir, "stdout.log"), "a") as out, open(err_path, "a") as err:
        for f in (out, err):
            f.write(header)
            f.flush()
        yield out, err, err_path, err.tell()


@dataclasses.dataclass
class _Running:
    run: RunSpec
    proc: subprocess.Popen
    start: float
    stderr_path: str
    stderr_offset: int
    lock_fd: int


class LocalExecutor:
    """Runs each run as a subprocess on this machine, at most `parallel` at once.

    A run's stdout and stderr are appended to `<run workdir>/stdout.log` and
    `stderr.log` (one header line per attempt). Each process gets its own
    session, so a Ctrl-C in the terminal reaches only the sweep, which then
    forwards SIGTERM to its runs (`stop()`).

    Args:
      parallel: the most subprocesses alive at once (>= 1).
      env: variables added to this process's environment for every run.
        Unless set, `PYTHONUNBUFFERED=1` is added (the logs are written as the
        run goes) and, with `parallel > 1`, `XLA_PYTHON_CLIENT_PREALLOCATE=false`,
        so that runs sharing a GPU do not each reserve most of its memory.
      poll_s: seconds between checks of the running processes.
    """

    def __init__(self, parallel: int = 1, env: Mapping[str, str] | None = None, poll_s=0.1):
        if parallel < 1:
            raise ValueError(f"parallel={parallel}; run at least 1 process at a time")
        self.parallel = parallel
        self.env = dict(env or {})
        self.poll_s = poll_s
        self._stop_signal = None  # None, signal.SIGTERM or signal.SIGKILL
        self._sent = None

    def stop(self, force: bool = False) -> None:
        self._stop_signal = signal.SIGKILL if force else signal.SIGTERM

    def _environment(self) -> dict:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")  # stdout.log follows the run live
        if self.parallel > 1:
            env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        env.update(self.env)
        return env

    def _start(self, run: RunSpec, env: dict) -> _Running:
        lock_fd = lock_run_dir(run.workdir)
        with attempt_logs(run.workdir, " ".join(run.argv)) as (out, err, err_path, offset):
            proc = subprocess.Popen(  # the child keeps its own copies of the log files
                list(run.argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
                pass_fds=(lock_fd,),
            )
        return _Running(run, proc, time.monotonic(), err_path, offset, lock_fd)

    def run(self, runs: Sequence[RunSpec], callback: Callable[[RunEvent], None]) -> None:
        env = self._environment()
        queue = list(runs)
        running: list[_Running] = []
        try:
            while queue or running:
                if self._stop_signal is not None:
                    queue.clear()
                    if self._sent != self._stop_signal:
                        for r in running:
                            if r.proc.poll() is None:
                                r.proc.send_signal(self._stop_signal)
                        self._sent = self._stop_signal
                while queue and len(running) < self.parallel and self._stop_signal is None:
                    r = self._start(queue.pop(0), env)
                    running.append(r)
                    callback(RunEvent("started", r.run))
                for r in [r for r in running if r.proc.poll() is not None]:
                    running.remove(r)
                    self._release(r)
                    callback(
                        RunEvent(
                            "ended",
                            r.run,
                            returncode=r.proc.returncode,
                            wall_s=time.monotonic() - r.start,
                            stopped=self._sent is not None,
                            stderr_tail=tail(r.stderr_path, r.stderr_offset, STDERR_TAIL_LINES),
                        )
                    )
                if queue or running:
                    time.sleep(self.poll_s)
        finally:
            for r in running:  # only after an exception in a callback: do not orphan
                if r.proc.poll() is None:
                    r.proc.send_signal(signal.SIGTERM)
                    r.proc.wait()
                self._release(r)

    @staticmethod
    def _release(r: _Running) -> None:
        os.close(r.lock_fd)
