"""The cloud's vocabulary: one pure argv builder per gcloud / xpk operation.

Every `*_argv` function returns the argument tuple of one command and runs
nothing; `lm_align.launch.steps` runs them. The shell commands a worker runs
(`setup_command`, `remote_command`, `stop_command`) are built here too, as are
the rules for the names these commands take (`check_name`, `parse_bucket`).

    >>> tpu_vm_delete_argv("my-tpu", "us-west4-a", None)
    ('gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'my-tpu', '--zone=us-west4-a', '--quiet')
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

GCLOUD = "gcloud"
XPK = "xpk"
REMOTE_DIR = "lm_align"  # the checkout on every worker, relative to its home directory
REMOTE_ARCHIVE = "lm_align_src.tar.gz"  # where the packed checkout is copied, ditto
SETUP_SCRIPT = "launch/tpu_worker_setup.sh"  # in the checkout
BUCKET_MOUNT = "lm_align_bucket"  # where --bucket is mounted on every worker, relative to home
SSH_UNREACHABLE = 255  # gcloud ssh's exit status when it could not reach a worker
TPU_VM_READY = "READY"
QUEUED_RESOURCE_READY = "ACTIVE"
# States after which waiting is pointless (the TPU must be deleted and created again).
TPU_VM_DEAD = ("PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "DELETING", "HIDDEN")
QUEUED_RESOURCE_DEAD = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")
NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,60}[a-z0-9])?")
BUCKET_RE = re.compile(r"[a-z0-9][-_.a-z0-9]{1,61}[a-z0-9]")

Argv = tuple[str, ...]


class LaunchError(ValueError):
    """A bad launch request (unknown accelerator, bad name, ...) or a failed step."""


# ---------------------------------------------------------------------------
# Names


def check_name(name: str, what: str = "--name") -> str:
    """`name` if it is a valid TPU / workload name; LaunchError naming `what` otherwise."""
    if not NAME_RE.fullmatch(name or ""):
        raise LaunchError(
            f"{what} {name!r}: TPU and workload names are lowercase letters, digits and '-', "
            "starting with a letter and not ending with '-' (at most 62 characters), "
            "e.g. lm-align-v5e"
        )
    return name


def check_zone(zone: str | None) -> str:
    if not zone:
        raise LaunchError("--zone is empty; give the zone of the TPU, e.g. us-west4-a")
    return zone


def check_slices(num_slices: int) -> int:
    if num_slices < 1:
        raise LaunchError(f"--num-slices={num_slices}; use 1 or more")
    return num_slices


def node_names(name: str, num_slices: int, what: str = "--name") -> list[str]:
    """The TPU VM of each slice: `name` alone, or `name-0`, `name-1`, ... (checked)."""
    check_name(name, what)
    if num_slices == 1:
        return [name]
    return [check_name(f"{name}-{i}", "node name") for i in range(num_slices)]


def parse_bucket(text: str, what: str = "--bucket") -> str:
    """`my-bucket` or `gs://my-bucket` -> `my-bucket`; LaunchError if it is not a bucket name."""
    name = text.strip()
    name = name.removeprefix("gs://")
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


# ---------------------------------------------------------------------------
# TPU VMs


def location_flags(zone: str, project: str | None) -> list[str]:
    return [f"--zone={zone}"] + ([f"--project={project}"] if project else [])


def _spot(spot: bool) -> list[str]:
    return ["--spot"] if spot else []


def _tpu_vm(verb: str, *args: str) -> Argv:
    return (GCLOUD, "compute", "tpus", "tpu-vm", verb, *args)


def tpu_vm_create_argv(name, zone, project, accelerator_type, version, spot=False) -> Argv:
    flags = [f"--accelerator-type={accelerator_type}", f"--version={version}"]
    return _tpu_vm("create", name, *location_flags(zone, project), *flags, *_spot(spot))


def tpu_vm_describe_argv(name, zone, project) -> Argv:
    """Prints the node's state (READY, CREATING, PREEMPTED, ...); fails if there is none."""
    return _tpu_vm("describe", name, *location_flags(zone, project), "--format=value(state)")


def tpu_vm_delete_argv(name, zone, project) -> Argv:
    return _tpu_vm("delete", name, *location_flags(zone, project), "--quiet")


def tpu_vm_scp_to_argv(name, zone, project, local, remote, worker="all") -> Argv:
    """Copies the local file `local` to `remote` (relative to home) on `worker` (or all)."""
    return _tpu_vm(
        "scp", local, f"{name}:{remote}", *location_flags(zone, project), f"--worker={worker}"
    )


def tpu_vm_scp_from_argv(name, zone, project, remote, local, worker="0") -> Argv:
    """Copies the directory `remote` of `worker` (recursively) into the local directory `local`."""
    return _tpu_vm(
        "scp",
        f"{name}:{remote}",
        local,
        "--recurse",
        *location_flags(zone, project),
        f"--worker={worker}",
    )


def tpu_vm_ssh_argv(name, zone, project, command, worker="all") -> Argv:
    """Runs the shell command `command` on `worker` (default: all workers at once).

    Exits with the remote command's status (the first failing worker's), or
    255 (`SSH_UNREACHABLE`) when ssh could not reach a worker.
    """
    return _tpu_vm(
        "ssh", name, *location_flags(zone, project), f"--worker={worker}", f"--command={command}"
    )


# ---------------------------------------------------------------------------
# Queued resources (multislice)


def _queued(verb: str, *args: str) -> Argv:
    return (GCLOUD, "compute", "tpus", "queued-resources", verb, *args)


def queued_resource_create_argv(
    name, zone, project, accelerator_type, runtime_version, node_count, spot=False
) -> Argv:
    """A queued resource of `node_count` slices named `<name>-0`, `<name>-1`, ..."""
    flags = [f"--accelerator-type={accelerator_type}", f"--runtime-version={runtime_version}"]
    flags += [f"--node-count={node_count}", f"--node-prefix={name}"]
    return _queued("create", name, *location_flags(zone, project), *flags, *_spot(spot))


def queued_resource_describe_argv(name, zone, project) -> Argv:
    """Prints the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...)."""
    return _queued("describe", name, *location_flags(zone, project), "--format=value(state.state)")


def queued_resource_delete_argv(name, zone, project) -> Argv:
    """Deletes the queued resource and (--force) its nodes."""
    return _queued("delete", name, *location_flags(zone, project), "--force", "--quiet")


# ---------------------------------------------------------------------------
# GKE through xpk


def xpk_create_argv(
    cluster, workload, tpu_type, num_slices, docker_image, zone, project, command
) -> Argv:
    argv = [XPK, "workload", "create", f"--cluster={cluster}", f"--workload={workload}"]
    argv += [f"--tpu-type={tpu_type}", f"--num-slices={num_slices}"]
    argv += [f"--docker-image={docker_image}", *location_flags(zone, project)]
    return (*argv, f"--command={command}")


def xpk_wait_argv(cluster, workload, zone, project) -> Argv:
    """Follows the workload until it ends; exits 0 on success, 125 on failure."""
    argv = [XPK, "workload", "list", f"--cluster={cluster}"]
    return (*argv, f"--wait-for-job-completion={workload}", *location_flags(zone, project))


def xpk_delete_argv(cluster, workload, zone, project) -> Argv:
    argv = [XPK, "workload", "delete", f"--cluster={cluster}", f"--workload={workload}"]
    return (*argv, *location_flags(zone, project), "--force")


# ---------------------------------------------------------------------------
# Shell commands run on a worker


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


def setup_comment(bucket: str | None) -> str:
    """What `setup_command(bucket)` does, for a step comment (lowercase, without where)."""
    if not bucket:
        return f"unpack it to ~/{REMOTE_DIR} and install lm_align with jax[tpu]"
    return (
        f"unpack it to ~/{REMOTE_DIR}, mount gs://{bucket} at ~/{BUCKET_MOUNT} (gcsfuse, "
        "installed if missing) and install lm_align with jax[tpu]"
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


def shell_line(argv: Sequence[str]) -> str:
    """`argv` as a shell command line; `--flag=value` keeps the flag outside the quotes.

    >>> shell_line(["gcloud", "--format=value(state)", "a b"])
    "gcloud --format='value(state)' 'a b'"
    """
    words = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if arg.startswith("--") and eq and re.fullmatch(r"--[a-z][-a-z0-9]*", flag):
            words.append(f"{flag}={shlex.quote(value)}")
        else:
            words.append(shlex.quote(arg))
    return " ".join(words)
