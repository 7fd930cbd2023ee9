"""`lm-align launch local`: a pod in miniature, several processes on this machine.

    lm-align launch local --num-processes 2 --devices-per-process 4 -- train --config ...

Starts N copies of `lm-align <command>` with the multi-process environment
(`LM_ALIGN_COORDINATOR`, `LM_ALIGN_NUM_PROCESSES`, `LM_ALIGN_PROCESS_ID`, see
`lm_align.distributed`), each with its own simulated CPU devices, talking
through JAX's CPU collectives exactly as hosts of a pod do. Their output is
streamed line by line with a `[pI]` prefix.

SIGTERM or Ctrl-C is forwarded to every process as SIGTERM (they agree on a
step, save a checkpoint and exit; rerun the same command to resume). When a
process exits with an error the others are given the heartbeat timeout to
notice and exit by themselves, then stopped; the exit status is the first
failing process's (0 when all succeed).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from lm_align import distributed

GRACE_S = 15  # beyond the heartbeat timeout, before the survivors are killed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(
    base: dict, *, coordinator: str, num_processes: int, process_id: int, devices: int,
    heartbeat_s: int,
) -> dict:  # fmt: skip
    """The environment of process `process_id`: multi-process settings and CPU devices."""
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env[distributed.ENV_COORDINATOR] = coordinator
    env[distributed.ENV_NUM_PROCESSES] = str(num_processes)
    env[distributed.ENV_PROCESS_ID] = str(process_id)
    env[distributed.ENV_HEARTBEAT] = str(heartbeat_s)
    return env


def _stream(proc: subprocess.Popen, prefix: str, out) -> None:
    for line in proc.stdout:
        out.write(f"{prefix}{line}")
        out.flush()


def launch(
    command: list[str],
    *,
    num_processes: int,
    devices_per_process: int,
    heartbeat_s: int = 30,
    port: int | None = None,
    out=None,
) -> int:
    """Runs `lm-align <command>` as `num_processes` processes; returns the exit status."""
    out = sys.stdout if out is None else out
    coordinator = f"localhost:{port or free_port()}"
    procs, threads = [], []
    print(
        f"launching {num_processes} processes x {devices_per_process} CPU devices "
        f"(coordinator {coordinator}, heartbeat timeout {heartbeat_s}s): lm-align "
        + " ".join(command),
        file=out,
        flush=True,
    )
    for i in range(num_processes):
        env = process_env(
            dict(os.environ), coordinator=coordinator, num_processes=num_processes,
            process_id=i, devices=devices_per_process, heartbeat_s=heartbeat_s,
        )  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "lm_align.cli", *command],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # signals reach them only through this launcher
        )
        procs.append(proc)
        print(f"launcher: process {i} is pid {proc.pid}", file=out, flush=True)
        t = threading.Thread(target=_stream, args=(proc, f"[p{i}] ", out), daemon=True)
        t.start()
        threads.append(t)

    def forward(signum, frame):
        print(f"launcher: {signal.Signals(signum).name}: stopping every process (SIGTERM)",
              file=out, flush=True)  # fmt: skip
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    status, failed_at, reported = 0, None, set()
    try:
        while True:
            running = [p.poll() for p in procs].count(None)
            first = _report_failures(procs, reported, running, heartbeat_s, out)
            if first is not None and failed_at is None:
                status, failed_at = first, time.monotonic()
            if not running:
                break
            if failed_at is not None and time.monotonic() - failed_at > heartbeat_s + GRACE_S:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        print(f"launcher: process {i} is still alive; killing it", file=out,
                              flush=True)  # fmt: skip
                        p.kill()
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for t in threads:
            t.join(timeout=5)
    for p in procs:
        if p.returncode != 0 and status == 0:
            status = p.returncode
    if status:
        codes = ", ".join(f"p{i}: {_describe(p.returncode)}" for i, p in enumerate(procs))
        print(f"launcher: failed ({codes})", file=out, flush=True)
    return 1 if status < 0 else status


def _report_failures(procs, reported: set, running: int, heartbeat_s, out) -> int | None:
    """Prints each newly failed process once (also several that ended between two polls);
    returns the first new failure's exit status, or None."""
    first = None
    for i, p in enumerate(procs):
        if p.returncode in (None, 0) or i in reported:
            continue
        reported.add(i)
        first = p.returncode if first is None else first
        wait = f"; the others stop within the {heartbeat_s}s heartbeat timeout" if running else ""
        print(f"launcher: process {i} exited with status {_describe(p.returncode)}{wait}",
              file=out, flush=True)  # fmt: skip
    return first


def _describe(code: int) -> str:
    if code < 0:
        return f"{code} (killed by {signal.Signals(-code).name})"
    return str(code)


def add_parser(launch_sub) -> None:
    p = launch_sub.add_parser(
        "local",
        help="run an lm-align command as several processes on this machine (a local pod)",
        description=__doc__,
    )
    p.add_argument("--num-processes", type=int, required=True, help="processes to start (>= 1)")
    p.add_argument(
        "--devices-per-process", type=int, default=1, help="simulated CPU devices per process"
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=30,
        help="seconds after which the others stop when a process dies (default 30)",
    )
    p.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    p.add_argument(
        "lm_align_command",
        nargs="+",
        metavar="COMMAND",
        help="the lm-align command after --, e.g. train --config ...",
    )
    p.set_defaults(fn=cmd_local)


def cmd_local(args, overrides) -> int:
    command = list(args.lm_align_command) + [f"--config.{o}" for o in overrides]
    for name, value in (
        ("--num-processes", args.num_processes),
        ("--devices-per-process", args.devices_per_process),
        ("--heartbeat-timeout", args.heartbeat_timeout),
    ):
        if value < 1:
            print(f"error: {name}={value}; use 1 or more", file=sys.stderr)
            return 2
    return launch(
        command,
        num_processes=args.num_processes,
        devices_per_process=args.devices_per_process,
        heartbeat_s=args.heartbeat_timeout,
        port=args.port,
    )
