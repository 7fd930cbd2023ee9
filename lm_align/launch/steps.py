"""The steps of a TPU launch as data, and the one interpreter that runs them.

A launch is a list of typed steps (`Create`, `Wait`, `Pack`, `Run`,
`Together`, `Query`, `Teardown`), each holding the argv of its commands
(`lm_align.launch.gcloud` builds them). `execute(steps, runner)` runs them in
order through a `runner`, the one thing that touches the world:

- `SubprocessRunner` runs each command with subprocess and packs the checkout;
- `DryRunner` runs nothing: every command reports success without output, so
  `execute` takes the path a fresh cloud would (a lookup finds nothing, a wait
  is over at once) and shows every command it would run. `--dry-run` is this.

`execute` shows each command before it runs it (`# N. comment`, then the
command line) through `show`, and its status lines through `log`.
`lm-align launch tpu` and `lm-align sweep --executor tpu` both run their
steps here; tests pass a fake runner. A dry run, written line by line:

    >>> shown = dry_run([Run("Say hello", ("echo", "hello world")),
    ...                  Teardown("Clean up", ("rm", "-f", "x"))], print)
    # 1. Say hello
    echo 'hello world'
    # 2. Clean up
    rm -f x
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from lm_align.launch.gcloud import Argv, LaunchError, shell_line

POLL_S = 30.0  # between two state checks while waiting for a TPU
READY_TIMEOUT_S = 6 * 3600.0  # a queued resource may wait hours for capacity
INTERRUPTED = 130  # the exit status after Ctrl-C
# The source checkout: the directory holding the lm_align package.
SOURCE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------
# Steps


@dataclasses.dataclass(frozen=True)
class Run:
    """Runs `argv`, streaming its output (each line prefixed `prefix`); failing fails the launch."""

    comment: str
    argv: Argv
    prefix: str = ""


@dataclasses.dataclass(frozen=True)
class Lookup:
    """Looks a TPU up before its `Create` (`argv` prints its state; fails if there is none).

    A TPU found alive is kept (the create is skipped); one found in a `dead`
    state is deleted with `delete` and created again, or is an error without it.
    """

    comment: str
    argv: Argv
    dead: tuple[str, ...]
    delete: Argv | None = None


@dataclasses.dataclass(frozen=True)
class Create:
    """Creates the TPU `name` with `argv`; with `lookup`, only when it does not exist."""

    comment: str
    argv: Argv
    name: str
    lookup: Lookup | None = None
    prefix: str = ""


@dataclasses.dataclass(frozen=True)
class Wait:
    """Polls `argv` (which prints the state of `name`) until it prints `ready`.

    A `dead` state, or no `ready` within the timeout, fails the launch.
    """

    comment: str
    argv: Argv
    name: str
    ready: str
    dead: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Pack:
    """Packs the checkout `source_dir` into the .tar.gz `archive` (here, in Python)."""

    source_dir: str
    archive: str

    @property
    def comment(self) -> str:
        """Names the checkout only when it is not this lm_align's (so that the dry run does
        not depend on where the checkout is)."""
        if os.path.abspath(self.source_dir) == SOURCE_DIR:
            what = "this lm_align checkout's git-tracked (and untracked, not ignored) files"
        else:
            what = f"the git-tracked (and untracked, not ignored) files of {self.source_dir}"
        return f"Pack {what} into {self.archive} (here, in Python)"


@dataclasses.dataclass(frozen=True)
class Together:
    """Runs its `runs` at once (one per slice), streaming their output.

    Any failing fails the launch, unless `main`: the launch's command, whose
    exit status (the first non-zero one) is the launch's. Ctrl-C while a `main`
    step runs sends the `stop` commands (ssh does not carry the signal over).
    """

    runs: tuple[Run, ...]
    main: bool = False
    stop: tuple[Argv, ...] = ()


@dataclasses.dataclass(frozen=True)
class Query:
    """Runs `argv` and logs what it prints (a state); never fails."""

    comment: str
    argv: Argv


@dataclasses.dataclass(frozen=True)
class Teardown:
    """Runs `argv` at the very end, also after a failure or Ctrl-C; a failure is logged."""

    comment: str
    argv: Argv


Step = Run | Create | Wait | Pack | Together | Query | Teardown


# ---------------------------------------------------------------------------
# Runners


@dataclasses.dataclass
class Result:
    returncode: int
    output: str | None = ""  # captured stdout (when not streamed); None: not run (dry run)


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], *, prefix=None, out=None, err=None) -> Result:
        """Runs `argv`. With `prefix`, streams its output (stdout and stderr) line by line,
        each line prefixed; with `out`/`err` (files), writes them there; otherwise
        captures stdout (`Result.output`)."""

    def pack(self, source_dir: str, archive: str) -> int | None:
        """Writes the checkout to `archive`; returns the number of files (None: not packed)."""


class SubprocessRunner:
    """Runs commands with subprocess (stdin closed, each in its own session)."""

    def __call__(self, argv, *, prefix=None, out=None, err=None) -> Result:
        kwargs = {"stdin": subprocess.DEVNULL, "start_new_session": True}
        if prefix is not None:
            proc = subprocess.Popen(
                list(argv),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                **kwargs,
            )
            for line in proc.stdout:
                sys.stdout.write(f"{prefix}{line}")
                sys.stdout.flush()
            return Result(proc.wait())
        if out is not None or err is not None:
            return Result(
                subprocess.run(list(argv), check=False, stdout=out, stderr=err, **kwargs).returncode
            )
        proc = subprocess.run(list(argv), check=False, stdout=subprocess.PIPE, text=True, **kwargs)
        return Result(proc.returncode, proc.stdout)

    def pack(self, source_dir: str, archive: str) -> int:
        return pack_source(source_dir, archive)


class DryRunner:
    """The runner of `--dry-run`: runs and packs nothing; every command succeeds, unrun."""

    def __call__(self, argv, *, prefix=None, out=None, err=None) -> Result:
        return Result(0, None)

    def pack(self, source_dir: str, archive: str) -> None:
        return None


def git_files(source_dir: str) -> list[str]:
    """The git-tracked, and untracked but not ignored, files of a checkout."""
    proc = subprocess.run(
        ["git", "-C", source_dir, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise LaunchError(
            f"{source_dir} is not a git checkout ({proc.stderr.decode(errors='replace').strip()}); "
            "the TPU launcher copies a checkout of lm_align to the workers: run it from a clone"
        )
    names = sorted({n for n in proc.stdout.decode().split("\0") if n})
    # A tracked file deleted in the working tree is left out.
    return [n for n in names if os.path.isfile(os.path.join(source_dir, n))]


def pack_source(source_dir: str, archive: str) -> int:
    """Writes the checkout's files to the .tar.gz `archive`; returns the number of files."""
    names = git_files(source_dir)
    os.makedirs(os.path.dirname(os.path.abspath(archive)), exist_ok=True)
    tmp = f"{archive}.tmp{os.getpid()}"
    with tarfile.open(tmp, "w:gz") as tar:
        for name in names:
            tar.add(os.path.join(source_dir, name), arcname=name, recursive=False)
    os.replace(tmp, archive)
    return len(names)


# ---------------------------------------------------------------------------
# Showing what runs


@dataclasses.dataclass(frozen=True)
class Shown:
    """One command `execute` ran (or, dry, would run), under the comment saying why."""

    comment: str
    argv: Argv | None  # None: done here, in Python (packing)


class Transcript:
    """Collects what `execute` shows and writes it as `# N. comment`, then the command line."""

    def __init__(self, write: Callable[[str], None] = lambda line: print(line, flush=True)):
        self.write = write
        self.shown: list[Shown] = []

    def __call__(self, comment: str, argv: Sequence[str] | None = None) -> None:
        self.shown.append(Shown(comment, None if argv is None else tuple(argv)))
        self.write(f"# {len(self.shown)}. {comment}")
        if argv is not None:
            self.write(shell_line(argv))


def dry_run(steps: Sequence[Step], write: Callable[[str], None] | None = None) -> list[Shown]:
    """`execute(steps)` with the `DryRunner`: what a launch into an empty cloud would run.

    Writes it through `write` (nothing if None) and returns it.
    """
    transcript = Transcript(write or (lambda line: None))
    execute(steps, DryRunner(), show=transcript, log=lambda line: None)
    return transcript.shown


# ---------------------------------------------------------------------------
# The interpreter


@dataclasses.dataclass
class _Context:
    runner: Runner
    show: Callable[[str, Sequence[str] | None], None]
    log: Callable[[str], None]
    poll_s: float
    timeout_s: float


def execute(
    steps: Sequence[Step],
    runner: Runner,
    *,
    show: Callable[[str, Sequence[str] | None], None] | None = None,
    log: Callable[[str], None] = print,
    poll_s: float = POLL_S,
    timeout_s: float = READY_TIMEOUT_S,
) -> int:
    """Runs `steps` in order; returns the exit status of the `main` step (0 if none).

    A failing step raises LaunchError; Ctrl-C returns 130 (after the stop
    commands of a `main` step that was running). The `Teardown` steps run last
    in any case.
    """
    ctx = _Context(runner, show or Transcript(), log, poll_s, timeout_s)
    status, current = 0, None
    try:
        for current in [s for s in steps if not isinstance(s, Teardown)]:
            status = _HANDLERS[type(current)](current, ctx) or status
    except KeyboardInterrupt:
        log("interrupted")
        status = INTERRUPTED
        if isinstance(current, Together):
            for argv in current.stop:
                runner(argv, prefix="")
    finally:
        for step in steps:
            if isinstance(step, Teardown):
                _teardown(step, ctx)
    return status


def _check(result: Result, comment: str, argv: Sequence[str]) -> None:
    if result.returncode != 0:
        raise LaunchError(
            f"step failed (exit status {result.returncode}): {comment}\n  {shell_line(argv)}"
        )


def _run(step: Run, ctx: _Context) -> None:
    ctx.show(step.comment, step.argv)
    _check(ctx.runner(step.argv, prefix=step.prefix), step.comment, step.argv)


def _create(step: Create, ctx: _Context) -> None:
    lookup = step.lookup
    if lookup is not None:
        ctx.show(lookup.comment, lookup.argv)
        result = ctx.runner(lookup.argv)
        state = (result.output or "").strip()
        found = result.returncode == 0 and result.output is not None
        if found and state in lookup.dead:
            if lookup.delete is None:
                raise LaunchError(
                    f"{step.name} exists but is {state}: delete it (see the --teardown "
                    "command of --dry-run) or use another --name"
                )
            comment = f"Delete {step.name} ({state}) to create it again"
            ctx.show(comment, lookup.delete)
            _check(ctx.runner(lookup.delete, prefix=step.prefix), comment, lookup.delete)
            found = False
        if found:
            ctx.log(f"found {step.name} ({state}); reusing it")
            return
    ctx.show(step.comment, step.argv)
    _check(ctx.runner(step.argv, prefix=step.prefix), step.comment, step.argv)


def _wait(step: Wait, ctx: _Context) -> None:
    ctx.show(step.comment, step.argv)
    wait_for_state(
        ctx.runner,
        step.argv,
        step.ready,
        step.dead,
        name=step.name,
        poll_s=ctx.poll_s,
        timeout_s=ctx.timeout_s,
        log=ctx.log,
    )


def wait_for_state(
    runner: Runner,
    argv: Sequence[str],
    ready: str,
    dead: Sequence[str] = (),
    *,
    name: str = "the TPU",
    poll_s: float = POLL_S,
    timeout_s: float = READY_TIMEOUT_S,
    log: Callable[[str], None] = print,
) -> str:
    """Polls the describe command `argv` until it prints `ready`; LaunchError on a dead
    state or a timeout. Returns the state (`ready`; also when the runner ran nothing)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        result = runner(argv)
        if result.output is None:  # a dry run: nothing to wait for
            return ready
        state = result.output.strip() if result.returncode == 0 else ""
        if state == ready:
            return state
        if state in dead:
            raise LaunchError(f"{name} is {state}: delete it and create it again")
        if state != last:
            log(f"{name} is {state or 'not there yet'}; waiting for {ready}")
            last = state
        if time.monotonic() > deadline:
            raise LaunchError(f"{name} was not {ready} after {timeout_s:.0f} s (last: {state})")
        time.sleep(poll_s)


def _pack(step: Pack, ctx: _Context) -> None:
    ctx.show(step.comment, None)
    n = ctx.runner.pack(step.source_dir, step.archive)
    if n is not None:
        ctx.log(f"packed {n} files of {step.source_dir}")


def _together(step: Together, ctx: _Context) -> int:
    for run in step.runs:
        ctx.show(run.comment, run.argv)
    codes = _run_parallel(ctx.runner, step.runs)
    failed = [(code, run) for code, run in zip(codes, step.runs, strict=True) if code]
    if failed and not step.main:
        code, run = failed[0]
        _check(Result(code), run.comment, run.argv)
    return failed[0][0] if failed else 0


def _run_parallel(runner: Runner, runs: Sequence[Run]) -> list[int]:
    """Runs the commands at once (one thread each); returns their exit statuses."""
    codes = [0] * len(runs)

    def one(k):
        codes[k] = runner(runs[k].argv, prefix=runs[k].prefix).returncode

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(len(runs))]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.2)  # a short wait keeps Ctrl-C responsive
    return codes


def _query(step: Query, ctx: _Context) -> None:
    ctx.show(step.comment, step.argv)
    result = ctx.runner(step.argv)
    if result.output is not None:
        state = result.output.strip() if result.returncode == 0 else ""
        ctx.log(f"state: {state or 'not found'}")


def _teardown(step: Teardown, ctx: _Context) -> None:
    ctx.show(step.comment, step.argv)
    result = ctx.runner(step.argv, prefix="")
    if result.returncode:
        ctx.log(
            f"teardown failed (exit status {result.returncode}); delete it by hand: "
            f"{shell_line(step.argv)}"
        )


_HANDLERS = {
    Run: _run,
    Create: _create,
    Wait: _wait,
    Pack: _pack,
    Together: _together,
    Query: _query,
}
