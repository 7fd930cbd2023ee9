"""Multi-process (multi-host) start-up: `jax.distributed` from flags, environment or Cloud TPU.

One code path runs on one CPU and on a pod: JAX's multi-controller runtime
starts one process per host, every process runs the same program, and XLA
SPMD runs the sharded steps over all devices. This module decides whether a
process is one of several, initialises `jax.distributed` accordingly, and
checks that what started agrees with what the config asked for.

Where the settings come from, first match wins:

1. flags (`lm-align train --coordinator HOST:PORT --num-processes N
   --process-id I`);
2. the environment: `LM_ALIGN_COORDINATOR`, `LM_ALIGN_NUM_PROCESSES`,
   `LM_ALIGN_PROCESS_ID` (what `lm-align launch local` sets);
3. Cloud TPU: on a TPU VM (TPU chips present), or where
   `TPU_WORKER_HOSTNAMES` lists several hosts or `MEGASCALE_NUM_SLICES` > 1,
   `jax.distributed.initialize()` is called without arguments and JAX finds
   the hosts, this one's id and the slices from the TPU metadata;
4. otherwise: one process, no initialisation.

`LM_ALIGN_HEARTBEAT_TIMEOUT` (seconds, default 100) bounds how long the
others wait when a process dies: JAX's coordination service stops every
process once a peer has missed heartbeats for that long, so a dead host
never leaves the rest hanging in a collective.

On a Cloud TPU VM (or with `LM_ALIGN_WATCH_MAINTENANCE=1` on any Compute
Engine VM) a background thread also watches the metadata server's
`maintenance-event` key, which changes about 60 s before the host is taken
down for maintenance; on `TERMINATE_ON_HOST_MAINTENANCE` the process sends
itself SIGTERM, so the run checkpoints and stops as on a preemption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping

import numpy as np

ENV_COORDINATOR = "LM_ALIGN_COORDINATOR"
ENV_NUM_PROCESSES = "LM_ALIGN_NUM_PROCESSES"
ENV_PROCESS_ID = "LM_ALIGN_PROCESS_ID"
ENV_HEARTBEAT = "LM_ALIGN_HEARTBEAT_TIMEOUT"
ENV_WATCH_MAINTENANCE = "LM_ALIGN_WATCH_MAINTENANCE"  # 1: watch, 0: never; unset: on TPU VMs
ENV_MAINTENANCE_POLL = "LM_ALIGN_MAINTENANCE_POLL_S"
DEFAULT_HEARTBEAT_S = 100


class DistributedError(RuntimeError):
    """The processes, devices and mesh of a multi-process run do not agree."""


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """How this process takes part: `mode` is "single", "explicit" or "tpu"."""

    mode: str
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_S
    source: str = ""  # where the settings came from, for messages


def add_process_flags(parser) -> None:
    """Adds --coordinator/--num-processes/--process-id to an argparse parser."""
    g = parser.add_argument_group("multi-process runs (one process per host)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0")
    g.add_argument("--num-processes", type=int, help="processes in the run")
    g.add_argument("--process-id", type=int, help="this process's id, from 0")


def _int(value, name: str, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name}={value!r} ({where}) is not an integer") from None


def on_tpu_vm() -> bool:
    """Whether this machine has TPU chips (a Cloud TPU VM), without starting a JAX backend."""
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # a JAX without this helper: rely on the environment variables
        return False


def _on_multihost_tpu(env: Mapping[str, str]) -> bool:
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    slices = _int(env.get("MEGASCALE_NUM_SLICES") or 1, "MEGASCALE_NUM_SLICES", "environment")
    return len(hosts) > 1 or slices > 1


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
    tpu_vm: bool | None = None,
) -> ProcessSpec:
    """The ProcessSpec for these flags (None: not given) and environment; validates it.

    `tpu_vm`: whether this is a Cloud TPU VM (None: `on_tpu_vm()`).
    """
    env = os.environ if env is None else env
    heartbeat = _int(env.get(ENV_HEARTBEAT, DEFAULT_HEARTBEAT_S), ENV_HEARTBEAT, "environment")
    if heartbeat < 1:
        raise DistributedError(f"{ENV_HEARTBEAT}={heartbeat}; use a number of seconds >= 1")
    if any(v is not None for v in (coordinator, num_processes, process_id)):
        source = "flags --coordinator/--num-processes/--process-id"
    elif any(env.get(k) for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)):
        source = f"environment {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}"
        coordinator = env.get(ENV_COORDINATOR) or None
        num_processes = env.get(ENV_NUM_PROCESSES) or None
        process_id = env.get(ENV_PROCESS_ID) or None
    elif _on_multihost_tpu(env) or (on_tpu_vm() if tpu_vm is None else tpu_vm):
        return ProcessSpec("tpu", heartbeat_timeout_s=heartbeat, source="Cloud TPU VM")
    else:
        return ProcessSpec("single", heartbeat_timeout_s=heartbeat, source="default")

    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise DistributedError(
            f"{source}: {', '.join(missing)} not given; a multi-process run needs all three "
            "(coordinator HOST:PORT of process 0, the number of processes, and this process's "
            "id from 0)"
        )
    n = _int(num_processes, "num_processes", source)
    i = _int(process_id, "process_id", source)
    if n < 1:
        raise DistributedError(f"num_processes={n} ({source}); use 1 or more")
    if not 0 <= i < n:
        raise DistributedError(
            f"process_id={i} with num_processes={n} ({source}); ids run from 0 to {n - 1}, "
            "one per process"
        )
    host, sep, port = str(coordinator).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedError(
            f"coordinator={coordinator!r} ({source}); give HOST:PORT of process 0, "
            "e.g. 10.0.0.2:1234 or localhost:1234"
        )
    if n == 1:
        return ProcessSpec("single", heartbeat_timeout_s=heartbeat, source=source)
    return ProcessSpec("explicit", str(coordinator), n, i, heartbeat, source)


def initialize(spec: ProcessSpec) -> None:
    """Initialises jax.distributed for `spec` (nothing for one process) and checks the result.

    Call before any other JAX call that touches devices. Raises
    DistributedError when the runtime disagrees with `spec`, e.g. every
    process believing it is process 0 (mismatched or missing settings).
    """
    if spec.mode == "single":
        return
    import jax

    if spec.mode == "explicit":
        jax.distributed.initialize(
            coordinator_address=spec.coordinator,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            heartbeat_timeout_seconds=spec.heartbeat_timeout_s,
        )
        if jax.process_count() != spec.num_processes or jax.process_index() != spec.process_id:
            raise DistributedError(
                f"jax.distributed reports process {jax.process_index()} of "
                f"{jax.process_count()}, but {spec.source} asked for process "
                f"{spec.process_id} of {spec.num_processes}"
            )
    else:
        jax.distributed.initialize(heartbeat_timeout_seconds=spec.heartbeat_timeout_s)
        hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
        if jax.process_count() == 1 and len(hosts) > 1:
            raise DistributedError(
                f"this TPU VM has {len(hosts)} hosts (TPU_WORKER_HOSTNAMES) but JAX started as a "
                "single process: run the same command on every worker (`gcloud compute tpus "
                "tpu-vm ssh ... --worker=all`, or `lm-align launch tpu`), not on one"
            )


def metadata_url(key: str, env: Mapping[str, str] | None = None) -> str:
    """The Compute Engine metadata server URL of `key` (`GCE_METADATA_IP` overrides the host)."""
    env = os.environ if env is None else env
    host = env.get("GCE_METADATA_IP", "metadata.google.internal")
    return f"http://{host}/computeMetadata/v1/{key}"


def watch_maintenance(
    on_event: Callable[[str], None] | None = None,
    *,
    interval_s: float | None = None,
    env: Mapping[str, str] | None = None,
) -> threading.Thread:
    """Starts a daemon thread that polls `instance/maintenance-event`.

    On a value starting with TERMINATE it calls `on_event(value)` (default:
    print a line and send this process SIGTERM) and ends. An unreachable
    metadata server is retried at the same interval.
    """
    env = os.environ if env is None else env
    interval = float(env.get(ENV_MAINTENANCE_POLL, 5.0) if interval_s is None else interval_s)
    request = urllib.request.Request(
        metadata_url("instance/maintenance-event", env), headers={"Metadata-Flavor": "Google"}
    )

    def stop_now(value: str) -> None:
        print(f"maintenance event {value}: checkpointing and stopping (SIGTERM)", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    def loop():
        while True:
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    value = r.read().decode().strip()
            except OSError:
                value = ""
            if value.startswith("TERMINATE"):
                (on_event or stop_now)(value)
                return
            time.sleep(interval)

    thread = threading.Thread(target=loop, name="lm_align maintenance watch", daemon=True)
    thread.start()
    return thread


def should_watch_maintenance(spec: ProcessSpec, env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    setting = env.get(ENV_WATCH_MAINTENANCE, "")
    if setting not in ("", "0", "1"):
        raise DistributedError(f"{ENV_WATCH_MAINTENANCE}={setting!r}; use 1 (watch) or 0 (never)")
    return setting == "1" or (setting == "" and spec.mode == "tpu")


def check_startup(config_json: str, workdir: str) -> None:
    """The start-up checks of a multi-process run (nothing for one process).

    Every process prints `describe()`, then all must agree on their local
    device counts, their config and their view of `workdir`.
    """
    import jax

    if jax.process_count() == 1:
        return
    print(describe(), flush=True)  # every process: bring-up problems show here
    check_devices()
    check_same_config(config_json)
    check_shared_workdir(workdir)


def describe() -> str:
    """'process I of N: L local <platform> devices of T' for this process."""
    import jax

    return (
        f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} "
        f"local {jax.devices()[0].platform} device(s) of {jax.device_count()}"
    )


def check_devices() -> None:
    """Every process sees the same number of local devices."""
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    counts = multihost_utils.process_allgather(np.int32(jax.local_device_count())).ravel()
    if len(set(counts.tolist())) != 1:
        raise DistributedError(
            f"processes see different numbers of local devices {counts.tolist()}; start every "
            "process with the same devices (e.g. the same "
            "--xla_force_host_platform_device_count, or one process per TPU host)"
        )


def all_true(flag: bool) -> bool:
    """True when `flag` is true on every process (a collective: call it on all of them)."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(bool(flag)))))


def check_shared_workdir(workdir: str) -> None:
    """Fails unless every process sees the same `workdir` (checkpoints need one directory).

    Process 0 writes a marker file; every other process must find it. On a
    pod, put the run directory on storage every host mounts at the same path
    (a gcsfuse-mounted bucket or a Filestore/NFS share).
    """
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    nonce = multihost_utils.broadcast_one_to_all(np.int64(np.random.SeedSequence().entropy % 2**62))
    marker = os.path.join(workdir, f".lm_align_shared_{int(nonce)}")
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(marker, "w") as f:
            f.write("written by process 0 to check that every process sees this directory\n")
    multihost_utils.sync_global_devices("lm_align shared workdir marker written")
    seen = os.path.exists(marker)
    everyone = multihost_utils.process_allgather(np.int32(seen)).ravel()
    multihost_utils.sync_global_devices("lm_align shared workdir marker checked")
    if jax.process_index() == 0:
        os.remove(marker)
    if not everyone.all():
        blind = [i for i, ok in enumerate(everyone.tolist()) if not ok]
        raise DistributedError(
            f"process(es) {blind} do not see {workdir} as process 0 writes it: the run directory "
            "must be one directory shared by every host (checkpoints are written by all of them "
            "together). Mount the same storage at the same path on every host (e.g. a Cloud "
            "Storage bucket with gcsfuse, or a Filestore share) and pass --workdir inside it"
        )


def check_same_config(config_json: str) -> None:
    """Fails when the processes were started with different configs."""
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = hashlib.sha256(config_json.encode()).digest()[:8]
    mine = np.frombuffer(digest, dtype=np.uint32)
    everyone = multihost_utils.process_allgather(mine)
    if not np.all(everyone == mine[None]):
        raise DistributedError(
            f"process {jax.process_index()}'s config differs from another process's; start every "
            "process with the same --config and --config.* overrides"
        )
