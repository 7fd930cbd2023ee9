"""Where a launched run's directory is: the command's --workdir, moved into the bucket mount
with --bucket, and whether every host of a job sees the same one.

The processes of a run over several hosts write its checkpoints together, into
one directory that every host must see at the same path (lm_align checks this
at start-up). `--bucket` gives them one: every worker mounts the bucket at
~/lm_align_bucket and a relative --workdir goes there.

    >>> move_into_bucket(["train", "--workdir", "runs/a"], "my-tpu")
    ['train', '--workdir', '../lm_align_bucket/runs/a']
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence

from lm_align.launch.gcloud import BUCKET_MOUNT, REMOTE_DIR, LaunchError

# Commands whose processes all write one run directory (--workdir).
RUN_COMMANDS = ("train", "align")


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


def move_into_bucket(command: Sequence[str], name: str) -> list[str]:
    """A train/align `command` with its relative --workdir (none: runs/NAME) moved into the
    bucket mount; an absolute one is kept, and other commands are left alone."""
    command = list(command)
    workdir = find_workdir(command)
    if command[0] not in RUN_COMMANDS:
        return command
    if workdir is None:
        return with_workdir(command, in_bucket(f"runs/{name}"))
    if os.path.isabs(workdir):
        return command
    inside = posixpath.normpath(workdir)
    if inside == os.pardir or inside.startswith(os.pardir + "/"):
        raise LaunchError(
            f"--workdir {workdir} leaves the bucket mount: with --bucket a relative "
            "--workdir is taken relative to the bucket; give one inside it, e.g. "
            "runs/my-run (or an absolute path, kept as given)"
        )
    return with_workdir(command, in_bucket(inside))


def bucket_comments(
    bucket: str, command: Sequence[str], workdir: str | None, name: str, hosts: int
) -> list[str]:
    """Comment lines saying where --bucket puts the run directory of `command`, whose
    --workdir was `workdir` before `move_into_bucket`."""
    mount = f"every worker mounts gs://{bucket} at ~/{BUCKET_MOUNT} (gcsfuse)"
    lines = [f"# --bucket: {mount}, the same path on every host"]
    if command[0] not in RUN_COMMANDS:
        return lines
    if workdir is not None and os.path.isabs(workdir):
        return [*lines, f"# --workdir {workdir} is absolute: kept as given (not in the bucket)"]
    if workdir is None:
        inside, why = f"runs/{name}", "no --workdir given"
    else:
        inside = posixpath.normpath(workdir)
        why = f"--workdir {workdir} is taken relative to the bucket mount"
    on = "the host" if hosts == 1 else f"all {hosts} hosts"
    where = f"~/{BUCKET_MOUNT}/{inside} on {on} (gs://{bucket}/{inside})"
    return [*lines, f"# {why}: the run directory is {where}; it outlives the TPU"]


BUCKET_FIX = (
    "add --bucket BUCKET (a Cloud Storage bucket that every worker mounts with gcsfuse; "
    "the run directory goes there)"
)


def not_shared(hosts: int, run_dir: str, where: str) -> str:
    """Why `hosts` processes cannot write `run_dir` if it is `where` (not shared)."""
    return (
        f"the {hosts} hosts write one run directory together, so it must be storage every "
        f"host mounts at the same path, but {run_dir} is under {where}"
    )


def shared_dir_problem(command: Sequence[str], hosts: int, gke: bool) -> tuple[str, str] | None:
    """(what is wrong, how to fix it) when the `hosts` processes of `command` (without
    --bucket) would each write their own run directory; None when they share one."""
    if hosts < 2 or command[0] not in RUN_COMMANDS:
        return None
    workdir = find_workdir(command)
    if workdir is not None and os.path.isabs(workdir):
        return None  # the user's own shared mount, we trust
    if gke:
        where = "the image's working directory, in each host's container"
        fix = (
            "mount shared storage at the same path in every pod (e.g. a Cloud Storage bucket "
            "with GKE's Cloud Storage FUSE CSI driver) and give an absolute --workdir inside it"
        )
    else:
        where = f"~/{REMOTE_DIR} on each worker's own disk"
        fix = (
            f"{BUCKET_FIX} or give an absolute --workdir on storage every worker mounts at the "
            "same path"
        )
    run_dir = f"--workdir {workdir}" if workdir is not None else "the default runs/<experiment>"
    return not_shared(hosts, run_dir, where), fix
