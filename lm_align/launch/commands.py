"""`lm-align launch {local,tpu} ... -- <lm-align command>`."""

from __future__ import annotations

import argparse
import functools


def add_parsers(sub, fit_check=None) -> None:
    """`lm-align launch local|tpu`; `fit_check` (see `lm_align.launch.tpu.cmd_tpu`) is what
    `launch tpu` runs before creating anything (None: no check)."""
    from lm_align.launch import local

    p = sub.add_parser(
        "launch", help="run an lm-align command as several processes, here or on Cloud TPU"
    )
    launch_sub = p.add_subparsers(dest="launch_target", required=True)
    local.add_parser(launch_sub)
    add_tpu_parser(launch_sub, fit_check)


def add_tpu_parser(launch_sub, fit_check=None) -> None:
    """`lm-align launch tpu` (`lm_align.launch.tpu`)."""
    from lm_align.launch import tpu

    p = launch_sub.add_parser(
        "tpu",
        help="run an lm-align command on every worker of Cloud TPU slices (or GKE via xpk)",
        description=tpu.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dry-run", action="store_true", help="print every command; run nothing")
    p.add_argument(
        "--skip-fit-check",
        action="store_true",
        help="launch without first compiling the job for the accelerator (lm-align compile)",
    )
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
    p.set_defaults(fn=functools.partial(tpu.cmd_tpu, fit_check=fit_check))
