"""`lm-align launch {local,tpu} ... -- <lm-align command>`."""

from __future__ import annotations


def add_parsers(sub) -> None:
    from lm_align.launch import local, tpu

    p = sub.add_parser(
        "launch", help="run an lm-align command as several processes, here or on Cloud TPU"
    )
    launch_sub = p.add_subparsers(dest="launch_target", required=True)
    local.add_parser(launch_sub)
    tpu.add_parser(launch_sub)
