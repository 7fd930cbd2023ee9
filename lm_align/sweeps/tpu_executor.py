"""`TPUExecutor`: a sweep's runs on Cloud TPU VMs, one run at a time per slice.

    lm-align sweep --config experiments/x.py --workdir runs/x --executor tpu \\
        --tpu-name sweep --accelerator v5litepod-8 --zone us-west4-a [--num-slices 2] \\
        [--bucket BUCKET]

The executor fans the runs out over `num_slices` independent TPU VMs (`NAME`
for one slice, `NAME-0`, `NAME-1`, ... for several); each slice runs one run at
a time and takes the next from one shared queue. A run's `lm-align train`
command runs on every worker of its slice at once (`gcloud compute tpus tpu-vm
ssh --worker=all`), so a multi-host slice (e.g. v5litepod-16, 4 hosts) trains
one run over all its hosts.

Before its first run each slice is created if missing (deleted and created
again if preempted), waited for until READY, and given this checkout (packed,
copied to ~/lm_align on every worker, installed with
launch/tpu_worker_setup.sh, which with `bucket` also mounts the bucket at
~/lm_align_bucket with gcsfuse), exactly as `lm-align launch tpu` does.

Where things live:

- The run's files are written on the workers under `~/<root>/<sweep>/<run>`
  (<sweep>: the basename of the sweep's --workdir). <root> is the bucket's
  mount, `lm_align_bucket`, with `bucket` (the run directory is then
  gs://BUCKET/<sweep>/<run>), else `lm_align_runs` on the workers' own disks;
  `remote_root` changes it. Process 0 (worker 0) writes final.json,
  metrics.jsonl and config.json there.
- Locally, the ssh session's stdout and stderr (all workers' output) are
  appended to `<run workdir>/stdout.log` and `stderr.log`, as with
  `LocalExecutor`, and after every attempt the remote run directory of worker 0
  is copied into the local run directory (`gcloud compute tpus tpu-vm scp
  --recurse --worker=0`; with `bucket`, from worker 0's mount of it):
  final.json, metrics.jsonl, config.json and whatever else the run wrote,
  checkpoints included. The sweep's status logic (final.json + exit status) and
  summary then work as with local runs.

Preemption: when an attempt ends with ssh's exit status 255 (a worker could
not be reached), when the slice's state is no longer READY afterwards (e.g.
PREEMPTED), or when the run exited 0 without final.json and without having
been asked to stop (the machine sent it SIGTERM), the slice is recreated if
needed (deleted if preempted, created, set up again) and the run started again,
at most `max_retries` times; `lm-align train` resumes from the last checkpoint
in its run directory.

With `bucket` the run directory is in the bucket: it outlives the VM, so a
run retried after any preemption, even on a VM deleted and created again,
resumes from its last checkpoint, and the hosts of a multi-host slice write
one run directory together. The bucket keeps it afterwards, too: a sweep
started again under the same name resumes (or skips) those runs; delete
gs://BUCKET/<sweep> to start over.

LIMITATION without `bucket`: the remote run directory is on the workers' own
disks. A preemption that keeps the VM (the process is stopped, the disk
survives) lets the retry resume from the last checkpoint; a preemption that
deletes the VM (Spot and preemptible TPU VMs usually end this way) loses the
run directory, and the retry starts the run from step 0 (the copy back after
each attempt does not help: a preempted attempt is never copied back). And
the hosts of a multi-host slice would each write their own run directory,
which lm_align refuses at start-up: `run` refuses such a slice type without
`bucket` before creating anything.

`stop()` sends SIGTERM (force: SIGKILL) to the lm-align processes of every
worker of every busy slice (`pkill` through ssh): `lm-align train` saves a
checkpoint and exits, the run is recorded `interrupted`, and no new run starts.
The TPU VMs are left running: delete them with `gcloud compute tpus tpu-vm
delete NAME --zone=ZONE` (see docs/launching_tpu.md).

Any paths inside the train command other than --config and --workdir (e.g. a
data file given as an override) must be valid on the workers.

A slice is made ready by the steps of `slice_steps` (lookup, create, wait,
copy, setup), run by `lm_align.launch.steps.execute` as `lm-align launch tpu`
runs its own; a run's commands come from `run_steps`. `plan` is those same
steps run through the `DryRunner`: what `--dry-run` shows.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import shlex
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

from lm_align import config as config_lib
from lm_align.launch import gcloud as g
from lm_align.launch import workdir as wd
from lm_align.launch.accelerators import hosts_text, parse_accelerator
from lm_align.launch.gcloud import LaunchError
from lm_align.launch.steps import (
    POLL_S,
    SOURCE_DIR,
    Create,
    Lookup,
    Pack,
    Query,
    Run,
    Runner,
    Shown,
    Step,
    SubprocessRunner,
    Wait,
    dry_run,
    execute,
)
from lm_align.sweeps.executor import (
    STDERR_TAIL_LINES,
    RunEvent,
    RunSpec,
    attempt_logs,
    lock_run_dir,
)
from lm_align.utils import tail

REMOTE_ROOT = "lm_align_runs"
DRY_RUN_ARCHIVE = os.path.join(tempfile.gettempdir(), "lm_align-sweep-XXXX.tar.gz")


class SliceError(RuntimeError):
    """A slice could not be created, reached or set up."""


@dataclasses.dataclass
class _Slice:
    index: int
    name: str  # the TPU VM
    current: RunSpec | None = None  # the run it is running
    ready: bool = False  # set up with this sweep's checkout


@dataclasses.dataclass(frozen=True)
class RunSteps:
    """The commands of one attempt of a run on a slice, in order."""

    attempt: Run  # the run on every worker (ssh; its output goes to the run's logs)
    check: Query  # the slice's state afterwards (not READY: preempted)
    copy_back: Run  # the remote run directory into the local sweep directory


class TPUExecutor:
    """Runs a sweep's runs on `num_slices` TPU VMs through gcloud; see the module doc.

    Args:
      tpu_name: the TPU VM's name (one slice) or the prefix of `NAME-i` (several).
      accelerator: slice type, e.g. "v5litepod-8" or its alias "v5e-8".
      zone, project: where the TPU VMs are (project: gcloud's default if None).
      num_slices: TPU VMs working through the runs, each one run at a time.
      runtime_version: TPU software version (default: the generation's).
      spot: create missing slices as Spot VMs.
      max_retries: restarts of a run whose slice was preempted.
      bucket: a Cloud Storage bucket (name or gs://name) that every worker mounts at
        ~/lm_align_bucket with gcsfuse; the runs' directories go there.
      remote_root: the runs' directory on the workers, relative to the home directory
        (default: the bucket's mount with `bucket`, else lm_align_runs).
      source_dir: the checkout copied to the workers (default: this lm_align's).
      runner: runs the commands (`lm_align.launch.steps.Runner`; default: subprocess).
      poll_s: seconds between state checks while a slice is being created.
      log: receives progress lines.
    """

    def __init__(
        self,
        tpu_name: str,
        accelerator: str,
        zone: str,
        *,
        num_slices: int = 1,
        project: str | None = None,
        runtime_version: str | None = None,
        spot: bool = False,
        max_retries: int = 2,
        bucket: str | None = None,
        remote_root: str | None = None,
        source_dir: str | None = None,
        runner: Runner | None = None,
        poll_s: float = POLL_S,
        log: Callable[[str], None] | None = None,
    ):
        self.accelerator = parse_accelerator(accelerator)
        names = g.node_names(tpu_name, g.check_slices(num_slices), "--tpu-name")
        if max_retries < 0:
            raise LaunchError(f"--max-retries={max_retries}; use 0 or more")
        self.slices = [_Slice(i, name) for i, name in enumerate(names)]
        self.zone, self.project = g.check_zone(zone), project
        self.runtime_version = runtime_version or self.accelerator.generation.runtime_version
        self.spot = spot
        self.max_retries = max_retries
        self.bucket = g.parse_bucket(bucket) if bucket else None
        if remote_root is None:
            remote_root = g.BUCKET_MOUNT if self.bucket else REMOTE_ROOT
        self.remote_root = remote_root.strip("/")
        self.source_dir = os.path.abspath(source_dir or SOURCE_DIR)
        self.runner = runner or SubprocessRunner()
        self.poll_s = poll_s
        self.log = log or (lambda line: print(line, flush=True))
        self._stop_force: bool | None = None  # None: running; False: SIGTERM; True: SIGKILL
        self._lock = threading.Lock()
        self._archive: str | None = None

    # -- the runs on the workers (pure) -------------------------------------------

    def shared_dir_problem(self) -> str | None:
        """Why runs on this slice type would fail (several hosts, no shared run directory)."""
        hosts = self.accelerator.hosts
        if hosts < 2 or self.bucket:
            return None
        where = f"~/{self.remote_root}/... on each worker's own disk"
        return f"{wd.not_shared(hosts, 'each run directory', where)}: {wd.BUCKET_FIX}"

    def comments(self, runs: Sequence[RunSpec]) -> list[str]:
        """Dry-run comment lines: where the runs' directories are; what would fail."""
        lines = []
        if self.bucket:
            sweep_dir = self.remote_run_dir(runs[0]).rpartition("/")[0] if runs else ""
            inside = sweep_dir.partition("/")[2] if sweep_dir.startswith(g.BUCKET_MOUNT) else ""
            where = f" (gs://{self.bucket}/{inside}/<run>)" if inside else ""
            lines.append(
                f"# --bucket: every worker mounts gs://{self.bucket} at ~/{g.BUCKET_MOUNT} "
                f"(gcsfuse); each run's directory is ~/{sweep_dir}/<run>{where}, so a run "
                "retried after a preemption resumes from its checkpoint, even on a new VM"
            )
        problem = self.shared_dir_problem()
        if problem:
            lines.append(f"# WARNING: {problem}; until then the sweep refuses to start")
        return lines

    def remote_run_dir(self, run: RunSpec) -> str:
        """The run's directory on the workers, relative to the home directory."""
        sweep = os.path.basename(os.path.dirname(os.path.abspath(run.workdir)))
        return f"{self.remote_root}/{sweep}/{run.name}"

    def remote_args(self, run: RunSpec) -> list[str]:
        """The run's `lm-align` arguments as the workers run them (from ~/lm_align).

        --config is made relative to the checkout (it must lie inside it) and
        --workdir points at `remote_run_dir` (relative to ~/lm_align).
        """
        argv = list(run.argv)
        try:
            args = argv[argv.index("lm_align.cli") + 1 :]
        except ValueError:
            raise LaunchError(f"run {run.name}: not an lm_align.cli command: {argv}") from None
        out = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in ("--config", "--workdir") and i + 1 < len(args):
                value = args[i + 1]
                if arg == "--config":
                    value = self._remote_config(value)
                else:
                    value = f"../{self.remote_run_dir(run)}"
                out += [arg, value]
                i += 2
                continue
            out.append(arg)
            i += 1
        return out

    def _remote_config(self, config_arg: str) -> str:
        path, arg = config_lib.split_config_arg(config_arg)
        full = os.path.abspath(path)
        rel = os.path.relpath(full, self.source_dir)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            raise LaunchError(
                f"the experiment file {full} is outside the checkout {self.source_dir} that is "
                "copied to the TPU workers; move it into the checkout (e.g. experiments/)"
            )
        return rel if arg is None else f"{rel}:{arg}"

    def run_command(self, run: RunSpec) -> str:
        """The shell command that runs `run` on a worker."""
        mkdir = f"mkdir -p {shlex.quote('../' + self.remote_run_dir(run))}"
        return g.remote_command(self.remote_args(run), pre=mkdir)

    # -- steps (pure) ---------------------------------------------------------------

    def slice_steps(self, s: _Slice, archive: str, setup: bool = True) -> list[Step]:
        """Make slice `s` READY (created if missing, created again if dead), then (`setup`)
        give its workers the checkout `archive` and install it."""
        z, p, acc, prefix = self.zone, self.project, self.accelerator, f"[{s.name}] "
        describe = g.tpu_vm_describe_argv(s.name, z, p)
        lookup = Lookup(
            f"Slice {s.index}: look up the TPU VM {s.name} (kept if it exists; deleted and "
            "created again if preempted)",
            describe,
            g.TPU_VM_DEAD,
            delete=g.tpu_vm_delete_argv(s.name, z, p),
        )
        spot = " (spot)" if self.spot else ""
        create = g.tpu_vm_create_argv(s.name, z, p, acc.name, self.runtime_version, self.spot)
        steps = [
            Create(
                f"Slice {s.index}: create it unless found: {acc.name}, "
                f"{hosts_text(acc.hosts)}{spot}",
                create,
                s.name,
                lookup,
                prefix,
            ),
            Wait(
                f"Slice {s.index}: wait until it is READY",
                describe,
                s.name,
                g.TPU_VM_READY,
                g.TPU_VM_DEAD,
            ),
        ]
        if setup:
            scp = g.tpu_vm_scp_to_argv(s.name, z, p, archive, g.REMOTE_ARCHIVE)
            ssh = g.tpu_vm_ssh_argv(s.name, z, p, g.setup_command(self.bucket))
            steps += [
                Run(f"Slice {s.index}: copy the checkout to its workers", scp, prefix),
                Run(f"Slice {s.index}: {g.setup_comment(self.bucket)}", ssh, prefix),
            ]
        return steps

    def run_steps(self, s: _Slice, run: RunSpec) -> RunSteps:
        """The commands of one attempt of `run` on slice `s`."""
        z, p = self.zone, self.project
        via = ", through worker 0's mount of the bucket" if self.bucket else ""
        what = "the run directory" if self.bucket else "the run directory of worker 0"
        copy = g.tpu_vm_scp_from_argv(s.name, z, p, self.remote_run_dir(run), _local_parent(run))
        return RunSteps(
            Run(
                f"Run {run.name} on every worker of {s.name} (logs: {run.workdir}/stdout.log, "
                "stderr.log)",
                g.tpu_vm_ssh_argv(s.name, z, p, self.run_command(run)),
            ),
            Query(
                f"Check {s.name} is still READY (else: preempted; recreate it and rerun, at "
                f"most {self.max_retries} times)",
                g.tpu_vm_describe_argv(s.name, z, p),
            ),
            Run(f"Copy {what} back into {run.workdir}{via}", copy),
        )

    def plan(
        self, runs: Sequence[RunSpec], write: Callable[[str], None] | None = None
    ) -> list[Shown]:
        """What `run` would run if every slice were missing and no run were preempted: the
        same steps through the `DryRunner` (written through `write` too, if given).

        Runs are shown on slices in turn; the real order depends on which slice
        is free first.
        """
        steps: list[Step] = [Pack(self.source_dir, DRY_RUN_ARCHIVE)]
        for s in self.slices:
            steps += self.slice_steps(s, DRY_RUN_ARCHIVE)
        for k, run in enumerate(runs):
            one = self.run_steps(self.slices[k % len(self.slices)], run)
            steps += [one.attempt, one.check, one.copy_back]
        return dry_run(steps, write)

    # -- Executor protocol ------------------------------------------------------

    def stop(self, force: bool = False) -> None:
        first = self._stop_force is None
        self._stop_force = bool(force or self._stop_force)
        if first or force:  # ssh from a thread: this may run inside a signal handler
            threading.Thread(target=self._send_stop, args=(bool(force),), daemon=True).start()

    def run(self, runs: Sequence[RunSpec], callback: Callable[[RunEvent], None]) -> None:
        work = collections.deque(runs)
        if not work:
            return
        problem = self.shared_dir_problem()  # fail before creating anything
        if problem:
            raise LaunchError(problem)
        for run in runs:
            self.remote_args(run)
        events: queue.Queue[RunEvent] = queue.Queue()
        threads = [
            threading.Thread(target=self._slice_loop, args=(s, work, events), daemon=True)
            for s in self.slices
        ]
        self._archive = self._pack()
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads) or not events.empty():
                try:
                    event = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                callback(event)
        except BaseException:
            self.stop()  # do not leave runs going on the TPUs unattended
            raise
        finally:
            if self._archive and os.path.exists(self._archive):
                os.remove(self._archive)
        if work and self._stop_force is None:
            self.log(f"tpu: {len(work)} runs not started: no slice could be set up")

    # -- internals ---------------------------------------------------------------

    def _execute(self, steps: Sequence[Step]) -> None:
        """Runs `steps` through the launcher's interpreter, logging each one."""
        execute(
            steps,
            self.runner,
            show=lambda comment, argv=None: self.log(f"tpu: {comment}"),
            log=lambda line: self.log(f"tpu: {line}"),
            poll_s=self.poll_s,
        )

    def _pack(self) -> str:
        fd, archive = tempfile.mkstemp(prefix="lm_align-sweep-", suffix=".tar.gz")
        os.close(fd)
        self._execute([Pack(self.source_dir, archive)])
        return archive

    def _state(self, argv: Sequence[str]) -> str | None:
        """What the describe command `argv` prints (READY, PREEMPTED, ...); None if it fails
        (the TPU VM does not exist)."""
        result = self.runner(argv)
        return (result.output or "").strip() if result.returncode == 0 else None

    def _prepare(self, s: _Slice) -> None:
        """Makes the slice READY (creating it, or recreating it if dead) and sets it up."""
        try:
            self._execute(self.slice_steps(s, self._archive, setup=not s.ready))
        except LaunchError as e:
            raise SliceError(str(e)) from None
        s.ready = True

    def _slice_loop(self, s: _Slice, work: collections.deque, events: queue.Queue) -> None:
        try:
            self._prepare(s)
        except SliceError as e:
            self.log(f"tpu: {e}; slice {s.name} takes no runs")
            return
        while True:
            with self._lock:
                if self._stop_force is not None or not work:
                    return
                run = work.popleft()
                s.current = run
            try:
                alive = self._run_one(s, run, events)
            except Exception as e:  # e.g. the run directory is locked: record it, go on
                message = f"{type(e).__name__}: {e}"
                self.log(f"tpu: {run.name} on {s.name}: {message}")
                events.put(RunEvent("ended", run, returncode=1, stderr_tail=message))
                alive = True
            finally:
                with self._lock:
                    s.current = None
            if not alive:
                return

    def _run_one(self, s: _Slice, run: RunSpec, events: queue.Queue) -> bool:
        """Runs `run` on slice `s` (retrying after preemptions); False if the slice is lost."""
        lock_fd = lock_run_dir(run.workdir)
        try:
            wall, attempt = 0.0, 0
            while True:
                attempt += 1
                events.put(RunEvent("started", run))
                start = time.monotonic()
                returncode, state, err_tail = self._attempt(s, run, attempt)
                wall += time.monotonic() - start
                stopped = self._stop_force is not None
                finished = os.path.exists(os.path.join(run.workdir, "final.json"))
                lost = (
                    returncode == g.SSH_UNREACHABLE
                    or state != g.TPU_VM_READY
                    or (returncode == 0 and not finished)
                )
                if lost and not stopped:
                    why = f"exit status {returncode}, {s.name} is {state or 'gone'}"
                    if attempt <= self.max_retries:
                        self.log(
                            f"tpu: {run.name} was interrupted on {s.name} ({why}); "
                            f"retry {attempt}/{self.max_retries}"
                        )
                        try:
                            self._recover(s, state)
                            continue
                        except SliceError as e:
                            self.log(f"tpu: {e}")
                            err_tail += f"\n{e}"
                    else:
                        err_tail += (
                            f"\ninterrupted on {s.name} ({why}); gave up after {attempt} tries"
                        )
                    if returncode == 0:
                        returncode = g.SSH_UNREACHABLE  # not finished: recorded as failed
                events.put(
                    RunEvent(
                        "ended",
                        run,
                        returncode=returncode,
                        wall_s=wall,
                        stopped=stopped,
                        stderr_tail=err_tail.strip(),
                    )
                )
                if lost and not stopped:
                    return self._fit_for_next_run(s)
                return True
        finally:
            os.close(lock_fd)

    def _recover(self, s: _Slice, state: str | None) -> None:
        """After an interrupted attempt: recreate the slice if it is gone or dead."""
        if state != g.TPU_VM_READY:
            s.ready = False
        self._prepare(s)

    def _fit_for_next_run(self, s: _Slice) -> bool:
        """After a run given up on: the slice made usable again; False if it cannot be."""
        try:
            self._recover(s, self._state(g.tpu_vm_describe_argv(s.name, self.zone, self.project)))
            return True
        except SliceError as e:
            self.log(f"tpu: {e}; slice {s.name} takes no more runs")
            return False

    def _attempt(self, s: _Slice, run: RunSpec, attempt: int) -> tuple[int, str | None, str]:
        """One ssh session running `run` on every worker of `s`, then the slice's state and
        (when READY) the copy back: (exit status, state, stderr tail)."""
        steps = self.run_steps(s, run)
        what = f"{s.name} attempt {attempt}: {self.run_command(run)}"
        with attempt_logs(run.workdir, what) as (out, err, err_path, offset):
            self.log(f"tpu: {run.name} -> {s.name} (attempt {attempt})")
            returncode = self.runner(steps.attempt.argv, out=out, err=err).returncode
        err_tail = tail(err_path, offset, STDERR_TAIL_LINES)
        state = self._state(steps.check.argv)
        if state == g.TPU_VM_READY:
            with open(os.path.join(run.workdir, "stderr.log"), "a") as err:
                copied = self.runner(steps.copy_back.argv, out=err, err=err)
            if copied.returncode != 0:
                self.log(
                    f"tpu: copying {run.name} back from {s.name} failed: "
                    f"{g.shell_line(steps.copy_back.argv)}"
                )
        return returncode, state, err_tail

    def _send_stop(self, force: bool) -> None:
        with self._lock:
            busy = [s for s in self.slices if s.current is not None]
        for s in busy:
            self.log(f"tpu: stopping the run on {s.name} ({'SIGKILL' if force else 'SIGTERM'})")
            stop = g.tpu_vm_ssh_argv(s.name, self.zone, self.project, g.stop_command(force))
            self.runner(stop, out=None, err=None)


def _local_parent(run: RunSpec) -> str:
    """The local directory the run directory is copied back into: the sweep directory,
    relative to the current directory when inside it (as the dry run shows it)."""
    parent = os.path.dirname(os.path.abspath(run.workdir))
    rel = os.path.relpath(parent)
    return parent if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel
