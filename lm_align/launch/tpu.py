"""`lm-align launch tpu`: run an lm-align command on every worker of Cloud TPU slices.

    lm-align launch tpu [--dry-run] --name NAME --accelerator TYPE --zone ZONE [--project P]
        [--num-slices N] [--runtime-version V] [--spot] [--reuse] [--teardown] [--bucket BUCKET]
        [--gke-cluster CLUSTER --docker-image IMG] [--skip-fit-check]
        -- <lm-align command and its arguments>

First, here, the job's step (a `train` or `align` command's) is compiled for the
accelerator and its number of slices (`lm-align compile`, docs/tpu_compile.md):
a job that does not fit the chips' HBM stops with exit status 1, naming the
memory it needs and what would make it fit, before any TPU is created or any
gcloud command is printed. --skip-fit-check launches without this check.

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
what it does, and runs nothing: it runs the same steps (`launch_steps`) as
the launch, through `lm_align.launch.steps.DryRunner`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from collections.abc import Sequence

from lm_align.launch import gcloud as g
from lm_align.launch import workdir as wd
from lm_align.launch.accelerators import Accelerator, DoesNotFit, hosts_text, parse_accelerator
from lm_align.launch.gcloud import LaunchError
from lm_align.launch.steps import (
    POLL_S,
    SOURCE_DIR,
    Create,
    Lookup,
    Pack,
    Run,
    Runner,
    Step,
    SubprocessRunner,
    Teardown,
    Together,
    Wait,
    dry_run,
    execute,
)


@dataclasses.dataclass(frozen=True)
class Job:
    """A launch request, checked: see `job_from_args`."""

    name: str
    zone: str
    accelerator: Accelerator
    command: tuple[str, ...]  # lm-align arguments, e.g. ("train", "--config", ...)
    project: str | None = None
    num_slices: int = 1
    runtime_version: str | None = None  # None: the generation's default
    spot: bool = False
    reuse: bool = False
    teardown: bool = False
    gke_cluster: str | None = None
    docker_image: str | None = None
    bucket: str | None = None  # mounted at ~/lm_align_bucket on every worker
    workdir_given: str | None = None  # the command's --workdir before --bucket moved it
    source_dir: str = SOURCE_DIR

    @property
    def runtime(self) -> str:
        """The TPU software version the TPU is created with."""
        return self.runtime_version or self.accelerator.generation.runtime_version

    @property
    def archive(self) -> str:
        """Where the packed checkout is written, here."""
        return os.path.join(tempfile.gettempdir(), f"lm_align-{self.name}.tar.gz")

    @property
    def multislice(self) -> bool:
        return self.num_slices > 1

    @property
    def hosts(self) -> int:
        """Hosts (= JAX processes) of the whole job."""
        return self.accelerator.hosts * self.num_slices

    @property
    def nodes(self) -> list[str]:
        """The TPU VM of each slice."""
        return g.node_names(self.name, self.num_slices)


# ---------------------------------------------------------------------------
# Checking the request (once)


def job_from_args(args, overrides: Sequence[str] = ()) -> Job:
    """Checks the parsed command line; LaunchError names the bad value and the fix."""
    command = _command(args.remote_command, overrides)
    accelerator = parse_accelerator(args.accelerator)
    g.check_slices(args.num_slices)
    g.check_zone(args.zone)
    _check_gke(args)
    name = g.check_name(args.name)
    if not args.gke_cluster:
        g.node_names(name, args.num_slices)
    bucket = g.parse_bucket(args.bucket) if args.bucket else None
    workdir = wd.find_workdir(command)
    if bucket:
        command = wd.move_into_bucket(command, name)
    return Job(
        name=name,
        zone=args.zone,
        accelerator=accelerator,
        command=tuple(command),
        project=args.project,
        num_slices=args.num_slices,
        runtime_version=args.runtime_version,
        spot=args.spot,
        reuse=args.reuse,
        teardown=args.teardown,
        gke_cluster=args.gke_cluster,
        docker_image=args.docker_image,
        bucket=bucket,
        workdir_given=workdir,
    )


def _command(remote_command: Sequence[str] | None, overrides: Sequence[str]) -> list[str]:
    """The lm-align arguments after `--` (a leading `lm-align` dropped), overrides appended."""
    command = list(remote_command or [])
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
    return command


def _check_gke(args) -> None:
    if bool(args.gke_cluster) != bool(args.docker_image):
        raise LaunchError(
            "--gke-cluster and --docker-image go together: xpk runs the command in that "
            "image on that cluster (give both, or neither for TPU VMs)"
        )
    if not args.gke_cluster:
        return
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
    if args.bucket:
        raise LaunchError(
            "--bucket applies to TPU VMs, not to --gke-cluster: mount the bucket in the pods "
            "(e.g. with GKE's Cloud Storage FUSE CSI driver) and give an absolute --workdir "
            "inside it"
        )


def shared_dir_problem(job: Job) -> tuple[str, str] | None:
    """(what is wrong, how to fix it) when the processes of a run over several hosts would
    each write their own run directory; None when they share one (--bucket, one host, or an
    absolute --workdir)."""
    if job.bucket:
        return None
    return wd.shared_dir_problem(job.command, job.hosts, gke=bool(job.gke_cluster))


# ---------------------------------------------------------------------------
# The steps (pure)


def header(job: Job) -> list[str]:
    """Comment lines that say what the steps run on, and where the run directory is."""
    acc = job.accelerator
    lines = [f"# accelerator {acc.given} is an alias of {acc.name}"] if acc.alias else []
    if job.multislice:
        lines.append(
            f"# {acc.describe()} per slice; {job.num_slices} slices: "
            f"{acc.chips * job.num_slices} chips over {hosts_text(job.hosts)}"
        )
    else:
        lines.append(f"# {acc.describe()}")
    if not job.gke_cluster:
        lines.append(f"# TPU software (runtime) version {job.runtime}")
    if job.multislice and not job.gke_cluster:
        lines.append(
            "# multislice: the queued resource gives every node its MEGASCALE_* "
            "settings (tpu-env metadata, read by jax); nothing is set by hand"
        )
    if job.bucket:
        lines += wd.bucket_comments(job.bucket, job.command, job.workdir_given, job.name, job.hosts)
    problem = shared_dir_problem(job)
    if problem:
        lines.append(f"# WARNING: {problem[0]}")
        lines.append(f"# WARNING: {problem[1]}; until then the launcher refuses to start this run")
    return lines


def launch_steps(job: Job) -> list[Step]:
    """Every step of the launch, in order (pure: nothing runs)."""
    if job.gke_cluster:
        return _xpk_steps(job)
    return [
        *_tpu_steps(job),
        Pack(job.source_dir, job.archive),
        *_worker_steps(job),
        *_teardown_steps(job),
    ]


def _tpu_steps(job: Job) -> list[Step]:
    """Create (or with --reuse find) the TPU VM or queued resource; wait until usable."""
    acc, z, p, name = job.accelerator, job.zone, job.project, job.name
    if job.multislice:
        what = (
            f"queued resource {name}: {job.num_slices} slices ({', '.join(job.nodes)}) "
            f"of {acc.name}, {hosts_text(acc.hosts)} each"
        )
        describe = g.queued_resource_describe_argv(name, z, p)
        create = g.queued_resource_create_argv(
            name, z, p, acc.name, job.runtime, job.num_slices, job.spot
        )
        ready, dead = g.QUEUED_RESOURCE_READY, g.QUEUED_RESOURCE_DEAD
    else:
        what = f"TPU VM {name}: {acc.name}, {hosts_text(acc.hosts)}"
        describe = g.tpu_vm_describe_argv(name, z, p)
        create = g.tpu_vm_create_argv(name, z, p, acc.name, job.runtime, job.spot)
        ready, dead = g.TPU_VM_READY, g.TPU_VM_DEAD
    spot = " (spot)" if job.spot else ""
    if job.reuse:
        lookup = Lookup(f"Look up the {what} (--reuse: kept if it exists)", describe, dead)
        made = Create(f"Create it{spot} unless the lookup found it", create, name, lookup)
    else:
        made = Create(f"Create the {what}{spot}", create, name)
    wait = Wait(
        f"Wait until it is {ready} (checked every {POLL_S:.0f} s)",
        describe,
        name,
        ready,
        dead,
    )
    return [made, wait]


def _teardown_steps(job: Job) -> list[Step]:
    """With --teardown: delete the TPU VM or queued resource (run last in any case)."""
    if not job.teardown:
        return []
    if job.multislice:
        delete = g.queued_resource_delete_argv(job.name, job.zone, job.project)
        return [
            Teardown(f"Delete the queued resource {job.name} and its nodes (--teardown)", delete)
        ]
    delete = g.tpu_vm_delete_argv(job.name, job.zone, job.project)
    return [Teardown(f"Delete the TPU VM {job.name} (--teardown)", delete)]


def _worker_steps(job: Job) -> list[Step]:
    """Copy the checkout to every worker, set them up, then run the command on all at once."""
    acc, z, p = job.accelerator, job.zone, job.project
    workers = "the worker" if acc.hosts == 1 else f"all {acc.hosts} workers"
    copy, setup, run = [], [], []
    for i, node in enumerate(job.nodes):
        where = f"{workers} of slice {i}" if job.multislice else workers
        prefix = f"[slice {i}] "
        scp = g.tpu_vm_scp_to_argv(node, z, p, job.archive, g.REMOTE_ARCHIVE)
        node_named = f" ({node})" if job.multislice else ""
        copy.append(Run(f"Copy it to {where}{node_named}", scp, prefix))
        ssh = g.tpu_vm_ssh_argv(node, z, p, g.setup_command(job.bucket))
        what = g.setup_comment(job.bucket)
        setup.append(
            Run(f"{what[:1].upper()}{what[1:]} on {where} ({g.SETUP_SCRIPT})", ssh, prefix)
        )
        ssh = g.tpu_vm_ssh_argv(node, z, p, g.remote_command(job.command))
        together = ", with the other slices" if job.multislice else ""
        run.append(
            Run(
                f"Run lm-align {job.command[0]} on {where} at once{together} "
                f"(output prefixed {prefix.strip()})",
                ssh,
                prefix,
            )
        )
    stop = tuple(g.tpu_vm_ssh_argv(node, z, p, g.stop_command()) for node in job.nodes)
    return [
        Together(tuple(copy)),
        Together(tuple(setup)),
        Together(tuple(run), main=True, stop=stop),
    ]


def _xpk_steps(job: Job) -> list[Step]:
    """Submit the workload, follow it until it ends; with --teardown, delete it."""
    acc, c, w, z, p = job.accelerator, job.gke_cluster, job.name, job.zone, job.project
    slices = f"{job.num_slices} slice{'s' if job.multislice else ''}"
    command = g.lm_align_command(job.command)
    create = g.xpk_create_argv(c, w, acc.name, job.num_slices, job.docker_image, z, p, command)
    submit = (
        f"Submit the workload {w} to the GKE cluster {c}: {slices} of {acc.name} "
        f"({hosts_text(job.hosts)}), image {job.docker_image}, the command on every host"
    )
    follow = "Follow it until it ends (logs: Cloud Logging, or kubectl logs on the cluster)"
    steps = [Run(submit, create), Together((Run(follow, g.xpk_wait_argv(c, w, z, p)),), main=True)]
    if job.teardown:
        delete = g.xpk_delete_argv(c, w, z, p)
        steps.append(Teardown(f"Delete the workload {w} (--teardown)", delete))
    return steps


def cmd_tpu(args, overrides, runner: Runner | None = None, fit_check=None) -> int:
    """Checks the request, then prints (--dry-run) or runs its steps through `runner`.

    `fit_check(commands, accelerator, num_slices, write)` (`lm-align compile`'s, given by
    the command line) compiles the job for the accelerator first, unless
    --skip-fit-check: a job that does not fit stops here, before any gcloud command.
    """
    try:
        job = job_from_args(args, overrides)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if fit_check is not None and not args.skip_fit_check:
        try:
            fit_check([job.command], job.accelerator, job.num_slices, write=print)
        except LaunchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1 if isinstance(e, DoesNotFit) else 2
    steps = launch_steps(job)
    problem = shared_dir_problem(job)
    if problem and not args.dry_run:
        print(f"error: {problem[0]}: {problem[1]} (see --dry-run)", file=sys.stderr)
        return 2
    for line in header(job):
        print(line, flush=True)
    if args.dry_run:
        dry_run(steps, write=print)
        return 0
    try:
        return execute(
            steps,
            runner or SubprocessRunner(),
            log=lambda line: print(f"launcher: {line}", flush=True),
        )
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
