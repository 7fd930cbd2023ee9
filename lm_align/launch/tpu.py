"""`lm-align launch tpu`: run an lm-align command on every worker of Cloud TPU slices.

    lm-align launch tpu [--dry-run] --name NAME --accelerator TYPE --zone ZONE [--project P]
        [--num-slices N] [--runtime-version V] [--spot] [--reuse] [--teardown] [--bucket BUCKET]
        [--gke-cluster CLUSTER --docker-image IMG] -- <lm-align command and its arguments>

One slice (`--num-slices 1`, the default) is a TPU VM (`gcloud compute tpus
tpu-vm create NAME`). Several slices are one queued resource NAME whose N
nodes NAME-0 ... NAME-{N-1} are joined by multislice (`gcloud compute tpus
queued-resources create NAME --node-count N --node-prefix NAME`); the queued
resource gives each node its MEGASCALE_* settings in the node's `tpu-env`
metadata, where jax reads them, so nothing is set by hand.

The launcher creates the TPU (or, with --reuse, keeps the one of that name),
waits until it is READY (ACTIVE for a queued resource), packs this checkout's
git-tracked files (and untracked, not ignored ones), copies them to every
worker, unpacks them to ~/lm_align and installs lm_align with jax[tpu]
(launch/tpu_worker_setup.sh), then runs `python3 -m lm_align.cli <command>` (the
same as `lm-align <command>`) from ~/lm_align on every worker of every slice at
once. Each slice's output streams here with a `[slice i]` prefix. --teardown
deletes the TPU afterwards, also after a failure or Ctrl-C.

The run directory. The processes of a run over several hosts write its
checkpoints together, into one directory that every host must see at the same
path (lm_align checks this at start-up). --bucket BUCKET gives them one: the
setup step mounts the Cloud Storage bucket with gcsfuse at ~/lm_align_bucket on
every worker, and a `train` or `align` command's --workdir is put there
(relative: taken relative to the mount; none: runs/NAME). Without --bucket,
a relative --workdir is on each worker's own disk: for a job of several hosts
the dry run warns, and the launcher refuses to run `train` or `align` unless
--workdir is absolute (your own shared mount).

With --gke-cluster the command runs through xpk on an existing GKE cluster
instead: in --docker-image, which must hold lm_align installed at its working
directory (`xpk workload create`, followed with `xpk workload list
--wait-for-job-completion`; --teardown runs `xpk workload delete`).

`--config.*` overrides anywhere on the command line are passed on to the
remote command. --dry-run prints every command, each under a comment saying
what it does, and runs nothing.

Command construction is pure: the `*_argv` builders and `plan()` return
argument lists, and `execute()` runs a plan through a `runner` (tests pass a
fake). `lm_align.sweeps.tpu_executor` reuses the builders.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import posixpath
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

GCLOUD = "gcloud"
XPK = "xpk"
REMOTE_DIR = "lm_align"  # the checkout on every worker, relative to its home directory
REMOTE_ARCHIVE = "lm_align_src.tar.gz"  # where the packed checkout is copied, ditto
SETUP_SCRIPT = "launch/tpu_worker_setup.sh"  # in the checkout
BUCKET_MOUNT = "lm_align_bucket"  # where --bucket is mounted on every worker, relative to home
# Commands whose processes all write one run directory (--workdir).
RUN_COMMANDS = ("train", "align")
POLL_S = 30.0  # between two state checks while waiting for a TPU
READY_TIMEOUT_S = 6 * 3600.0  # a queued resource may wait hours for capacity
TPU_VM_READY = "READY"
QUEUED_RESOURCE_READY = "ACTIVE"
# States after which waiting is pointless (the TPU must be deleted and created again).
TPU_VM_DEAD = ("PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "DELETING", "HIDDEN")
QUEUED_RESOURCE_DEAD = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")
NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,60}[a-z0-9])?")
BUCKET_RE = re.compile(r"[a-z0-9][-_.a-z0-9]{1,61}[a-z0-9]")
# The source checkout: the directory holding the lm_align package.
SOURCE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LaunchError(ValueError):
    """A bad launch request (unknown accelerator, bad slice count, ...) or a failed step."""


# ---------------------------------------------------------------------------
# Accelerators


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation: its accelerator-type prefix and default runtime version."""

    name: str  # as the Cloud TPU docs call it, e.g. "v5e"
    prefix: str  # of its accelerator types, e.g. "v5litepod"
    runtime_version: str  # the TPU software version for JAX
    cores_per_chip: int  # the type's number counts TensorCores (2/chip) or chips (1/chip)


# Runtime versions: the Cloud TPU docs' "TPU software versions" page, PyTorch and JAX table.
GENERATIONS = {
    "v4": Generation("v4", "v4", "tpu-ubuntu2204-base", 2),
    "v5p": Generation("v5p", "v5p", "v2-alpha-tpuv5", 2),
    "v5e": Generation("v5e", "v5litepod", "v2-alpha-tpuv5-lite", 1),
    "v6e": Generation("v6e", "v6e", "v2-alpha-tpuv6e", 1),
}
SINGLE_HOST_MAX_CHIPS = 8  # v5e / v6e: up to 8 chips on one host, 4 per host beyond
V5E_V6E_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
ACCELERATOR_HELP = (
    "v4-N or v5p-N (N = TensorCores, a multiple of 8: v4-8, v4-16, v5p-32, ...), "
    "v5litepod-N (alias v5e-N) or v6e-N (N = chips: 1, 4, 8, 16, 32, 64, 128 or 256)"
)


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A TPU slice type, e.g. `v5litepod-16`: 16 v5e chips over 4 hosts."""

    given: str  # as the user wrote it, e.g. "v5e-16"
    name: str  # the accelerator type gcloud and xpk take, e.g. "v5litepod-16"
    generation: Generation
    chips: int
    hosts: int

    @property
    def alias(self) -> bool:
        return self.given != self.name

    def describe(self) -> str:
        hosts = "1 host" if self.hosts == 1 else f"{self.hosts} hosts"
        return f"{self.name}: TPU {self.generation.name}, {self.chips} chips over {hosts}"


def parse_accelerator(text: str) -> Accelerator:
    """`v5e-16` / `v5litepod-16` / `v4-32` / ... -> Accelerator; LaunchError if unknown."""
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", text.strip())
    if not m:
        raise LaunchError(f"unknown accelerator {text!r}; use {ACCELERATOR_HELP}")
    prefix, n = m.group(1), int(m.group(2))
    gen = GENERATIONS["v5e" if prefix == "v5litepod" else prefix]
    name = f"{gen.prefix}-{n}"
    if gen.cores_per_chip == 2:
        if n < 8 or n % 8:
            raise LaunchError(
                f"accelerator {text!r}: {gen.name} types count TensorCores (2 per chip, "
                f"8 per host), so N must be a multiple of 8, e.g. {gen.prefix}-8 or "
                f"{gen.prefix}-{max(8, n + 8 - n % 8)}"
            )
        chips, hosts = n // 2, n // 8
    else:
        if n not in V5E_V6E_SIZES:
            sizes = ", ".join(map(str, V5E_V6E_SIZES))
            raise LaunchError(
                f"accelerator {text!r}: {gen.name} slices have {sizes} chips; "
                f"use e.g. {gen.prefix}-16"
            )
        chips, hosts = n, (1 if n <= SINGLE_HOST_MAX_CHIPS else n // 4)
    return Accelerator(text.strip(), name, gen, chips, hosts)


def check_name(name: str, what: str = "--name") -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise LaunchError(
            f"{what} {name!r}: TPU and workload names are lowercase letters, digits and '-', "
            "starting with a letter and not ending with '-' (at most 62 characters), "
            "e.g. lm-align-v5e"
        )
    return name


def parse_bucket(text: str, what: str = "--bucket") -> str:
    """`my-bucket` or `gs://my-bucket` -> `my-bucket`; LaunchError if it is not a bucket name."""
    name = text.strip()
    name = name[len("gs://") :] if name.startswith("gs://") else name
    name = name.rstrip("/")
    if "/" in name:
        raise LaunchError(
            f"{what} {text!r}: give the bucket alone, without a path inside it "
            f"(e.g. {name.split('/')[0]}); it is mounted whole at ~/{BUCKET_MOUNT}"
        )
    if not BUCKET_RE.fullmatch(name):
        raise LaunchError(
            f"{what} {text!r}: Cloud Storage bucket names are 3-63 lowercase letters, digits, "
            "'-', '_' and '.', starting and ending with a letter or digit, e.g. my-lm-runs "
            "(gs:// is optional)"
        )
    return name


def find_workdir(command: Sequence[str]) -> str | None:
    """The value of `--workdir` (or `--workdir=`) in an lm-align command line, if any."""
    for i, arg in enumerate(command):
        if arg == "--workdir" and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith("--workdir="):
            return arg.partition("=")[2]
    return None


def with_workdir(command: Sequence[str], workdir: str) -> list[str]:
    """`command` with its --workdir set to `workdir` (added at the end if it has none)."""
    out = list(command)
    for i, arg in enumerate(out):
        if arg == "--workdir" and i + 1 < len(out):
            out[i + 1] = workdir
            return out
        if arg.startswith("--workdir="):
            out[i] = f"--workdir={workdir}"
            return out
    return out + ["--workdir", workdir]


def in_bucket(path: str) -> str:
    """A path inside the bucket mount, relative to ~/lm_align (where commands run)."""
    return posixpath.join("..", BUCKET_MOUNT, path)


# ---------------------------------------------------------------------------
# Command builders (pure: each returns one argument list)


def location_flags(zone: str, project: str | None) -> list[str]:
    return [f"--zone={zone}"] + ([f"--project={project}"] if project else [])


def tpu_vm_create_argv(name, zone, project, accelerator_type, version, spot=False) -> list[str]:
    argv = [GCLOUD, "compute", "tpus", "tpu-vm", "create", name, *location_flags(zone, project)]
    argv += [f"--accelerator-type={accelerator_type}", f"--version={version}"]
    return argv + (["--spot"] if spot else [])


def tpu_vm_describe_argv(name, zone, project) -> list[str]:
    """Prints the node's state (READY, CREATING, PREEMPTED, ...); fails if there is none."""
    argv = [GCLOUD, "compute", "tpus", "tpu-vm", "describe", name, *location_flags(zone, project)]
    return argv + ["--format=value(state)"]


def tpu_vm_delete_argv(name, zone, project) -> list[str]:
    argv = [GCLOUD, "compute", "tpus", "tpu-vm", "delete", name, *location_flags(zone, project)]
    return argv + ["--quiet"]


def tpu_vm_scp_to_argv(name, zone, project, local, remote, worker="all") -> list[str]:
    """Copies the local file `local` to `remote` (relative to home) on `worker` (or all)."""
    argv = [GCLOUD, "compute", "tpus", "tpu-vm", "scp", local, f"{name}:{remote}"]
    return argv + [*location_flags(zone, project), f"--worker={worker}"]


def tpu_vm_scp_from_argv(name, zone, project, remote, local, worker="0") -> list[str]:
    """Copies the directory `remote` of `worker` (recursively) into the local directory `local`."""
    argv = [GCLOUD, "compute", "tpus", "tpu-vm", "scp", f"{name}:{remote}", local, "--recurse"]
    return argv + [*location_flags(zone, project), f"--worker={worker}"]


def tpu_vm_ssh_argv(name, zone, project, command, worker="all") -> list[str]:
    """Runs the shell command `command` on `worker` (default: all workers at once).

    Exits with the remote command's status (the first failing worker's), or
    255 when ssh could not reach a worker.
    """
    argv = [GCLOUD, "compute", "tpus", "tpu-vm", "ssh", name, *location_flags(zone, project)]
    return argv + [f"--worker={worker}", f"--command={command}"]


def queued_resource_create_argv(
    name, zone, project, accelerator_type, runtime_version, node_count, spot=False
) -> list[str]:
    """A queued resource of `node_count` slices named `<name>-0`, `<name>-1`, ..."""
    argv = [GCLOUD, "compute", "tpus", "queued-resources", "create", name]
    argv += location_flags(zone, project)
    argv += [f"--accelerator-type={accelerator_type}", f"--runtime-version={runtime_version}"]
    argv += [f"--node-count={node_count}", f"--node-prefix={name}"]
    return argv + (["--spot"] if spot else [])


def queued_resource_describe_argv(name, zone, project) -> list[str]:
    """Prints the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...)."""
    argv = [GCLOUD, "compute", "tpus", "queued-resources", "describe", name]
    return argv + [*location_flags(zone, project), "--format=value(state.state)"]


def queued_resource_delete_argv(name, zone, project) -> list[str]:
    """Deletes the queued resource and (--force) its nodes."""
    argv = [GCLOUD, "compute", "tpus", "queued-resources", "delete", name]
    return argv + [*location_flags(zone, project), "--force", "--quiet"]


def xpk_location_flags(zone: str, project: str | None) -> list[str]:
    return location_flags(zone, project)


def xpk_create_argv(
    cluster, workload, tpu_type, num_slices, docker_image, zone, project, command
) -> list[str]:
    argv = [XPK, "workload", "create", f"--cluster={cluster}", f"--workload={workload}"]
    argv += [f"--tpu-type={tpu_type}", f"--num-slices={num_slices}"]
    argv += [f"--docker-image={docker_image}", *xpk_location_flags(zone, project)]
    return argv + [f"--command={command}"]


def xpk_wait_argv(cluster, workload, zone, project) -> list[str]:
    """Follows the workload until it ends; exits 0 on success, 125 on failure."""
    argv = [XPK, "workload", "list", f"--cluster={cluster}"]
    return argv + [f"--wait-for-job-completion={workload}", *xpk_location_flags(zone, project)]


def xpk_delete_argv(cluster, workload, zone, project) -> list[str]:
    argv = [XPK, "workload", "delete", f"--cluster={cluster}", f"--workload={workload}"]
    return argv + [*xpk_location_flags(zone, project), "--force"]


def setup_command(bucket: str | None = None) -> str:
    """Unpacks the copied checkout over ~/lm_align and installs it (on a worker); with
    `bucket`, also mounts gs://BUCKET at ~/lm_align_bucket (gcsfuse; skipped if mounted).

    Unpacked over, not into an emptied directory: run directories under
    ~/lm_align (a relative --workdir) survive a relaunch with --reuse.
    """
    mount = f" --bucket {shlex.quote(bucket)} --mount-dir {BUCKET_MOUNT}" if bucket else ""
    return (
        f"mkdir -p {REMOTE_DIR} && tar -xzf {REMOTE_ARCHIVE} -C {REMOTE_DIR} && "
        f"bash {REMOTE_DIR}/{SETUP_SCRIPT}{mount}"
    )


def lm_align_command(args: Sequence[str]) -> str:
    """`python3 -m lm_align.cli ARGS` as one shell command line (what `lm-align` runs)."""
    return shlex.join(["python3", "-m", "lm_align.cli", *args])


def remote_command(args: Sequence[str], pre: str = "") -> str:
    """The shell command that runs `lm-align ARGS` from ~/lm_align on a worker.

    `exec` makes the Python process the one ssh started, so that `stop_command`
    reaches it and its exit status is the command's.
    """
    pre = f"{pre} && " if pre else ""
    return f"cd {REMOTE_DIR} && {pre}PYTHONUNBUFFERED=1 exec {lm_align_command(args)}"


def stop_command(force: bool = False) -> str:
    """Sends SIGTERM (force: SIGKILL) to every lm-align process of a worker.

    `[l]m_align` matches `lm_align` but not this command line itself.
    """
    signal_name = "KILL" if force else "TERM"
    return f"pkill -{signal_name} -f '[l]m_align[.]cli' || true"


# ---------------------------------------------------------------------------
# Plans


@dataclasses.dataclass(frozen=True)
class Step:
    """One thing the launcher does: a comment, and the command it runs (if any).

    `kind` says how `execute` treats the step: "run" (run it; fail on a
    non-zero exit), "lookup" (--reuse: the next "create" is skipped when this
    finds a usable TPU), "create", "wait" (poll until the state printed is
    `ready`), "pack" (local, no command), "stream" (run it, streaming its output
    with `prefix`; steps of the same `group` run at once), "teardown" (always
    run at the end, also after a failure).
    """

    comment: str
    argv: tuple[str, ...] | None
    kind: str = "run"
    ready: str = ""  # "wait" / "lookup": the state that means usable
    dead: tuple[str, ...] = ()  # "wait": states that mean it will never be usable
    prefix: str = ""  # "stream": printed before every output line
    group: int = 0  # "stream": steps of one group run in parallel


@dataclasses.dataclass(frozen=True)
class Job:
    """A launch request, checked: see `job_from_args`."""

    name: str
    zone: str
    accelerator: Accelerator
    command: tuple[str, ...]  # lm-align arguments, e.g. ("train", "--config", ...)
    project: str | None = None
    num_slices: int = 1
    runtime_version: str = ""
    spot: bool = False
    reuse: bool = False
    teardown: bool = False
    gke_cluster: str | None = None
    docker_image: str | None = None
    bucket: str | None = None  # mounted at ~/lm_align_bucket on every worker
    workdir_given: str | None = None  # the command's --workdir before --bucket moved it
    source_dir: str = SOURCE_DIR
    archive: str = ""

    @property
    def multislice(self) -> bool:
        return self.num_slices > 1

    @property
    def hosts(self) -> int:
        """Hosts (= JAX processes) of the whole job."""
        return self.accelerator.hosts * self.num_slices

    @property
    def runs(self) -> bool:
        """The command is one whose processes all write one run directory."""
        return bool(self.command) and self.command[0] in RUN_COMMANDS

    @property
    def nodes(self) -> list[str]:
        """The TPU VM of each slice."""
        if not self.multislice:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(self.num_slices)]


def job_from_args(args, overrides: Sequence[str] = ()) -> Job:
    """Checks the parsed command line; LaunchError names the bad value and the fix."""
    command = list(args.remote_command or [])
    if command[:1] == ["--"]:
        command = command[1:]
    if command[:1] == ["lm-align"]:
        command = command[1:]
    command += [f"--config.{o}" for o in overrides]
    if not command:
        raise LaunchError(
            "no command after `--`: give the lm-align command every worker runs, e.g. "
            "`lm-align launch tpu ... -- train --config experiments/default.py`"
        )
    accelerator = parse_accelerator(args.accelerator)
    if args.num_slices < 1:
        raise LaunchError(
            f"--num-slices={args.num_slices}; use 1 (one TPU VM) or more "
            "(a multislice queued resource)"
        )
    if not args.zone:
        raise LaunchError("--zone is empty; give the zone of the TPU, e.g. us-west4-a")
    if bool(args.gke_cluster) != bool(args.docker_image):
        raise LaunchError(
            "--gke-cluster and --docker-image go together: xpk runs the command in that "
            "image on that cluster (give both, or neither for TPU VMs)"
        )
    if args.gke_cluster:
        for flag, value in (
            ("--runtime-version", args.runtime_version),
            ("--spot", args.spot),
            ("--reuse", args.reuse),
        ):
            if value:
                raise LaunchError(
                    f"{flag} applies to TPU VMs, not to --gke-cluster (the cluster's node "
                    "pools fix the TPU software and capacity type); drop it"
                )
    name = check_name(args.name)
    if args.num_slices > 1 and not args.gke_cluster:
        check_name(f"{name}-{args.num_slices - 1}", "node name")
    bucket = parse_bucket(args.bucket) if getattr(args, "bucket", None) else None
    if bucket and args.gke_cluster:
        raise LaunchError(
            "--bucket applies to TPU VMs, not to --gke-cluster: mount the bucket in the pods "
            "(e.g. with GKE's Cloud Storage FUSE CSI driver) and give an absolute --workdir "
            "inside it"
        )
    workdir = find_workdir(command)
    if bucket and command[0] in RUN_COMMANDS:
        if workdir is None:
            command = with_workdir(command, in_bucket(f"runs/{name}"))
        elif not os.path.isabs(workdir):
            inside = posixpath.normpath(workdir)
            if inside == os.pardir or inside.startswith(os.pardir + "/"):
                raise LaunchError(
                    f"--workdir {workdir} leaves the bucket mount: with --bucket a relative "
                    "--workdir is taken relative to the bucket; give one inside it, e.g. "
                    "runs/my-run (or an absolute path, kept as given)"
                )
            command = with_workdir(command, in_bucket(inside))
    archive = os.path.join(tempfile.gettempdir(), f"lm_align-{name}.tar.gz")
    return Job(
        name=name,
        zone=args.zone,
        accelerator=accelerator,
        command=tuple(command),
        project=args.project,
        num_slices=args.num_slices,
        runtime_version=args.runtime_version or accelerator.generation.runtime_version,
        spot=args.spot,
        reuse=args.reuse,
        teardown=args.teardown,
        gke_cluster=args.gke_cluster,
        docker_image=args.docker_image,
        bucket=bucket,
        workdir_given=workdir,
        source_dir=getattr(args, "source_dir", None) or SOURCE_DIR,
        archive=getattr(args, "archive", None) or archive,
    )


def _hosts(acc: Accelerator, slices: int = 1) -> str:
    n = acc.hosts * slices
    return "1 host" if n == 1 else f"{n} hosts"


def _workers(acc: Accelerator) -> str:
    return "the worker" if acc.hosts == 1 else f"all {acc.hosts} workers"


def shared_dir_problem(job: Job) -> tuple[str, str] | None:
    """(what is wrong, how to fix it) when the processes of a run over several hosts would
    each write their own run directory; None when they share one (or there is one host)."""
    if job.hosts < 2 or not job.runs or job.bucket:
        return None
    workdir = job.workdir_given
    if workdir is not None and os.path.isabs(workdir):
        return None  # the user's own shared mount, we trust
    if job.gke_cluster:
        where = "the image's working directory, in each host's container"
        fix = (
            "mount shared storage at the same path in every pod (e.g. a Cloud Storage bucket "
            "with GKE's Cloud Storage FUSE CSI driver) and give an absolute --workdir inside it"
        )
    else:
        where = f"~/{REMOTE_DIR} on each worker's own disk"
        fix = (
            "add --bucket BUCKET (a Cloud Storage bucket that every worker mounts with gcsfuse; "
            "the run directory goes there) or give an absolute --workdir on storage every "
            "worker mounts at the same path"
        )
    run_dir = f"--workdir {workdir}" if workdir is not None else "the default runs/<experiment>"
    problem = (
        f"the {job.hosts} hosts write one run directory together, so it must be storage every "
        f"host mounts at the same path, but {run_dir} is under {where}"
    )
    return problem, fix


def header(job: Job) -> list[str]:
    """Comment lines that say what the plan runs on, and where the run directory is."""
    acc = job.accelerator
    lines = []
    if acc.alias:
        lines.append(f"# accelerator {acc.given} is an alias of {acc.name}")
    if job.multislice:
        lines.append(
            f"# {acc.describe()} per slice; {job.num_slices} slices: "
            f"{acc.chips * job.num_slices} chips over {_hosts(acc, job.num_slices)}"
        )
    else:
        lines.append(f"# {acc.describe()}")
    if not job.gke_cluster:
        lines.append(f"# TPU software (runtime) version {job.runtime_version}")
        if job.multislice:
            lines.append(
                "# multislice: the queued resource gives every node its MEGASCALE_* settings "
                "(tpu-env metadata, read by jax); nothing is set by hand"
            )
    if job.bucket:
        lines.append(
            f"# --bucket: every worker mounts gs://{job.bucket} at ~/{BUCKET_MOUNT} (gcsfuse), "
            "the same path on every host"
        )
        given = job.workdir_given
        if job.runs and (given is None or not os.path.isabs(given)):
            inside = f"runs/{job.name}" if given is None else posixpath.normpath(given)
            why = (
                "no --workdir given"
                if given is None
                else f"--workdir {given} is taken relative to the bucket mount"
            )
            hosts = "the host" if job.hosts == 1 else f"all {job.hosts} hosts"
            lines.append(
                f"# {why}: the run directory is ~/{BUCKET_MOUNT}/{inside} on {hosts} "
                f"(gs://{job.bucket}/{inside}); it outlives the TPU"
            )
        elif job.runs:
            lines.append(f"# --workdir {given} is absolute: kept as given (not in the bucket)")
    problem = shared_dir_problem(job)
    if problem:
        lines.append(f"# WARNING: {problem[0]}")
        lines.append(f"# WARNING: {problem[1]}; until then the launcher refuses to start this run")
    return lines


def plan(job: Job) -> list[Step]:
    """Every step of the launch, in order (pure: nothing runs)."""
    if job.gke_cluster:
        return _plan_xpk(job)
    acc, z, p = job.accelerator, job.zone, job.project
    steps = []
    if job.multislice:
        what = (
            f"queued resource {job.name}: {job.num_slices} slices "
            f"({', '.join(job.nodes)}) of {acc.name}, {_hosts(acc)} each"
        )
        describe = queued_resource_describe_argv(job.name, z, p)
        create = queued_resource_create_argv(
            job.name, z, p, acc.name, job.runtime_version, job.num_slices, job.spot
        )
        ready, dead = QUEUED_RESOURCE_READY, QUEUED_RESOURCE_DEAD
    else:
        what = f"TPU VM {job.name}: {acc.name}, {_hosts(acc)}"
        describe = tpu_vm_describe_argv(job.name, z, p)
        create = tpu_vm_create_argv(job.name, z, p, acc.name, job.runtime_version, job.spot)
        ready, dead = TPU_VM_READY, TPU_VM_DEAD
    spot = " (spot)" if job.spot else ""
    if job.reuse:
        steps.append(
            Step(
                f"Look up the {what} (--reuse: kept if it exists)",
                tuple(describe),
                "lookup",
                ready=ready,
                dead=dead,
            )
        )
        steps.append(Step(f"Create it{spot} unless the lookup found it", tuple(create), "create"))
    else:
        steps.append(Step(f"Create the {what}{spot}", tuple(create), "create"))
    steps.append(
        Step(
            f"Wait until it is {ready} (checked every {POLL_S:.0f} s)",
            tuple(describe),
            "wait",
            ready=ready,
            dead=dead,
        )
    )
    steps.append(Step(pack_comment(job.source_dir, job.archive), None, "pack"))
    for i, node in enumerate(job.nodes):
        where = f"{_workers(acc)} of slice {i} ({node})" if job.multislice else _workers(acc)
        steps.append(
            Step(
                f"Copy it to {where}",
                tuple(tpu_vm_scp_to_argv(node, z, p, job.archive, REMOTE_ARCHIVE)),
                "stream",
                prefix=f"[slice {i}] ",
                group=1,
            )
        )
    for i, node in enumerate(job.nodes):
        where = f"{_workers(acc)} of slice {i}" if job.multislice else _workers(acc)
        steps.append(
            Step(
                f"{_sentence(setup_comment(job.bucket))} on {where} ({SETUP_SCRIPT})",
                tuple(tpu_vm_ssh_argv(node, z, p, setup_command(job.bucket))),
                "stream",
                prefix=f"[slice {i}] ",
                group=2,
            )
        )
    for i, node in enumerate(job.nodes):
        where = f"{_workers(acc)} of slice {i}" if job.multislice else _workers(acc)
        together = ", with the other slices" if job.multislice else ""
        steps.append(
            Step(
                f"Run lm-align {' '.join(job.command[:1])} on {where} at once{together} "
                f"(output prefixed [slice {i}])",
                tuple(tpu_vm_ssh_argv(node, z, p, remote_command(job.command))),
                "stream",
                prefix=f"[slice {i}] ",
                group=3,
            )
        )
    if job.teardown:
        if job.multislice:
            delete = queued_resource_delete_argv(job.name, z, p)
            comment = f"Delete the queued resource {job.name} and its nodes (--teardown)"
        else:
            delete = tpu_vm_delete_argv(job.name, z, p)
            comment = f"Delete the TPU VM {job.name} (--teardown)"
        steps.append(Step(comment, tuple(delete), "teardown"))
    return steps


def pack_comment(source_dir: str, archive: str) -> str:
    """The pack step's comment; names the checkout only when it is not this lm_align's
    (so that the dry run does not depend on where the checkout is)."""
    if os.path.abspath(source_dir) == SOURCE_DIR:
        what = "this lm_align checkout's git-tracked (and untracked, not ignored) files"
    else:
        what = f"the git-tracked (and untracked, not ignored) files of {source_dir}"
    return f"Pack {what} into {archive} (here, in Python)"


def setup_comment(bucket: str | None) -> str:
    """What `setup_command(bucket)` does, for a step comment (lowercase, without where)."""
    if not bucket:
        return f"unpack it to ~/{REMOTE_DIR} and install lm_align with jax[tpu]"
    return (
        f"unpack it to ~/{REMOTE_DIR}, mount gs://{bucket} at ~/{BUCKET_MOUNT} (gcsfuse, "
        "installed if missing) and install lm_align with jax[tpu]"
    )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _plan_xpk(job: Job) -> list[Step]:
    acc, c, w, z, p = job.accelerator, job.gke_cluster, job.name, job.zone, job.project
    slices = f"{job.num_slices} slice{'s' if job.multislice else ''}"
    create = xpk_create_argv(
        c, w, acc.name, job.num_slices, job.docker_image, z, p, lm_align_command(job.command)
    )
    steps = [
        Step(
            f"Submit the workload {w} to the GKE cluster {c}: {slices} of {acc.name} "
            f"({_hosts(acc, job.num_slices)}), image {job.docker_image}, the command on every host",
            tuple(create),
            "run",
        ),
        Step(
            "Follow it until it ends (logs: Cloud Logging, or kubectl logs on the cluster)",
            tuple(xpk_wait_argv(c, w, z, p)),
            "stream",
            group=1,
        ),
    ]
    if job.teardown:
        steps.append(
            Step(
                f"Delete the workload {w} (--teardown)",
                tuple(xpk_delete_argv(c, w, z, p)),
                "teardown",
            )
        )
    return steps


def shell_line(argv: Sequence[str]) -> str:
    """`argv` as a shell command line; `--flag=value` keeps the flag outside the quotes."""
    words = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if arg.startswith("--") and eq and re.fullmatch(r"--[a-z][-a-z0-9]*", flag):
            words.append(f"{flag}={shlex.quote(value)}")
        else:
            words.append(shlex.quote(arg))
    return " ".join(words)


def format_plan(job: Job, steps: Sequence[Step]) -> str:
    """The dry-run text: header comments, then per step `# N. comment` and its command."""
    lines = header(job)
    for i, step in enumerate(steps, 1):
        lines.append(f"# {i}. {step.comment}")
        if step.argv is not None:
            lines.append(shell_line(step.argv))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Running a plan


@dataclasses.dataclass
class Result:
    returncode: int
    output: str = ""  # captured stdout (when not streamed)


Runner = Callable[..., Result]


def subprocess_runner(
    argv: Sequence[str], *, prefix: str | None = None, out=None, err=None
) -> Result:
    """Runs `argv`. With `prefix`, streams its output (stdout and stderr) line by line
    to sys.stdout, each line prefixed; with `out`/`err` (files), writes them there;
    otherwise captures stdout (returned) and passes stderr through."""
    kwargs = dict(stdin=subprocess.DEVNULL, start_new_session=True)
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
        return Result(subprocess.run(list(argv), stdout=out, stderr=err, **kwargs).returncode)
    proc = subprocess.run(list(argv), stdout=subprocess.PIPE, text=True, **kwargs)
    return Result(proc.returncode, proc.stdout)


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
    state or a timeout. Returns the state."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        result = runner(argv)
        state = result.output.strip() if result.returncode == 0 else ""
        if state == ready:
            return state
        if state in dead:
            raise LaunchError(f"{name} is {state}: delete it and create it again")
        if state != last:
            log(f"launcher: {name} is {state or 'not there yet'}; waiting for {ready}")
            last = state
        if time.monotonic() > deadline:
            raise LaunchError(f"{name} was not {ready} after {timeout_s:.0f} s (last: {state})")
        time.sleep(poll_s)


def execute(
    steps: Sequence[Step],
    *,
    job: Job | None = None,
    runner: Runner = subprocess_runner,
    poll_s: float = POLL_S,
    log: Callable[[str], None] = print,
) -> int:
    """Runs a plan; returns the exit status of its main command (0: every worker succeeded).

    The "teardown" steps run last in any case (after a failure or Ctrl-C too).
    """
    skip_create = False
    running = False  # the command is running on the workers
    status = 0
    i = 0
    main = [s for s in steps if s.kind != "teardown"]
    try:
        while i < len(main):
            step = main[i]
            log(f"launcher: {step.comment}")
            if step.argv is not None:
                log(f"  {shell_line(step.argv)}")
            if step.kind == "lookup":
                result = runner(step.argv)
                state = result.output.strip()
                if result.returncode == 0 and state in step.dead:
                    raise LaunchError(
                        f"{job.name} exists but is {state}: delete it (see the --teardown "
                        "command of --dry-run) or use another --name"
                    )
                skip_create = result.returncode == 0
                found = f"found it ({state}); reusing it" if skip_create else "not found"
                log(f"launcher: {found}")
            elif step.kind == "create":
                if not skip_create:
                    _check(runner(step.argv, prefix=""), step)
            elif step.kind == "wait":
                wait_for_state(
                    runner, step.argv, step.ready, step.dead, name=job.name, poll_s=poll_s, log=log
                )
            elif step.kind == "pack":
                n = pack_source(job.source_dir, job.archive)
                log(f"launcher: packed {n} files of {job.source_dir}")
            elif step.kind == "stream":
                group = [s for s in main[i:] if s.kind == "stream" and s.group == step.group]
                for other in group[1:]:
                    log(f"launcher: {other.comment}\n  {shell_line(other.argv)}")
                last_group = not any(s.kind == "stream" for s in main[i + len(group) :])
                running = last_group
                codes = _run_parallel(runner, group)
                i += len(group) - 1
                if any(codes):
                    if not last_group:
                        _check(Result(next(c for c in codes if c)), step)
                    status = next(c for c in codes if c)
            else:
                _check(runner(step.argv, prefix=""), step)
            i += 1
    except KeyboardInterrupt:
        log("launcher: interrupted")
        status = 130
        if running and job is not None and not job.gke_cluster:
            for node in job.nodes:  # ssh does not carry Ctrl-C to the workers
                runner(tpu_vm_ssh_argv(node, job.zone, job.project, stop_command()), prefix="")
    finally:
        for step in steps:
            if step.kind == "teardown":
                log(f"launcher: {step.comment}")
                result = runner(step.argv, prefix="")
                if result.returncode:
                    log(
                        f"launcher: teardown failed (exit status {result.returncode}); "
                        f"delete it by hand: {shell_line(step.argv)}"
                    )
    return status


def _check(result: Result, step: Step) -> None:
    if result.returncode != 0:
        raise LaunchError(
            f"step failed (exit status {result.returncode}): {step.comment}\n  "
            f"{shell_line(step.argv)}"
        )


def _run_parallel(runner: Runner, steps: Sequence[Step]) -> list[int]:
    """Runs the steps at once (one thread each); returns their exit statuses."""
    codes = [0] * len(steps)

    def one(k):
        codes[k] = runner(steps[k].argv, prefix=steps[k].prefix).returncode

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(len(steps))]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.2)  # a short wait keeps Ctrl-C responsive
    return codes


# ---------------------------------------------------------------------------
# Command line


def add_parser(launch_sub) -> None:
    p = launch_sub.add_parser(
        "tpu",
        help="run an lm-align command on every worker of Cloud TPU slices (or GKE via xpk)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dry-run", action="store_true", help="print every command; run nothing")
    p.add_argument("--name", required=True, help="TPU VM / queued resource / workload name")
    p.add_argument(
        "--accelerator", required=True, help="slice type, e.g. v5litepod-16 (alias v5e-16), v4-8"
    )
    p.add_argument("--zone", required=True, help="e.g. us-west4-a")
    p.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
    p.add_argument(
        "--num-slices", type=int, default=1, help="1: a TPU VM; 2+: a multislice queued resource"
    )
    p.add_argument("--runtime-version", help="TPU software version (default: per generation)")
    p.add_argument("--spot", action="store_true", help="Spot capacity (cheaper, preemptible)")
    p.add_argument("--reuse", action="store_true", help="keep the TPU of that name if it exists")
    p.add_argument("--teardown", action="store_true", help="delete the TPU / workload at the end")
    p.add_argument(
        "--bucket",
        help="Cloud Storage bucket every worker mounts (gcsfuse) at ~/lm_align_bucket; the run "
        "directory of train/align goes there (needed for runs over several hosts)",
    )
    p.add_argument("--gke-cluster", help="run through xpk on this GKE cluster instead")
    p.add_argument("--docker-image", help="with --gke-cluster: image holding lm_align")
    p.add_argument(
        "remote_command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="the lm-align command every worker runs, e.g. -- train --config ...",
    )
    p.set_defaults(fn=cmd_tpu)


def cmd_tpu(args, overrides) -> int:
    try:
        job = job_from_args(args, overrides)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps = plan(job)
    if args.dry_run:
        sys.stdout.write(format_plan(job, steps))
        return 0
    problem = shared_dir_problem(job)
    if problem:
        print(f"error: {problem[0]}: {problem[1]} (see --dry-run)", file=sys.stderr)
        return 2
    for line in header(job):
        print(line.replace("# ", "launcher: ", 1), flush=True)
    try:
        return execute(steps, job=job, log=lambda line: print(line, flush=True))
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
