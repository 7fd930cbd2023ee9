"""Where a process learns it is one of several, and the errors for inconsistent settings."""

import subprocess
import sys
import threading
import time

import pytest

from lm_align import distributed as d
from lm_align.launch.local import process_env
from tests.helpers import REPO


def test_single_process_by_default():
    spec = d.resolve(env={})
    assert spec.mode == "single" and spec.num_processes == 1


def test_flags_win_over_the_environment():
    env = {d.ENV_COORDINATOR: "other:1", d.ENV_NUM_PROCESSES: "4", d.ENV_PROCESS_ID: "3"}
    spec = d.resolve("10.0.0.2:1234", 2, 1, env=env)
    assert (spec.mode, spec.coordinator, spec.num_processes, spec.process_id) == (
        "explicit", "10.0.0.2:1234", 2, 1,
    )  # fmt: skip


def test_environment_as_set_by_launch_local():
    env = process_env(
        {}, coordinator="localhost:999", num_processes=2, process_id=1, devices=4, heartbeat_s=7
    )
    spec = d.resolve(env=env)
    assert (spec.coordinator, spec.num_processes, spec.process_id) == ("localhost:999", 2, 1)
    assert spec.heartbeat_timeout_s == 7
    assert env["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=4")


def test_multihost_tpu_is_detected_from_its_environment():
    assert d.resolve(env={"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}).mode == "tpu"
    assert d.resolve(env={"MEGASCALE_NUM_SLICES": "2"}).mode == "tpu"
    assert d.resolve(env={"TPU_WORKER_HOSTNAMES": "localhost"}).mode == "single"


@pytest.mark.parametrize(
    "args,message",
    [
        (("localhost:1", 2, None), "process_id not given"),
        ((None, 2, 0), "coordinator not given"),
        (("localhost:1", 2, 2), "process_id=2 with num_processes=2"),
        (("localhost:1", 0, 0), "num_processes=0"),
        (("localhost", 2, 0), "coordinator='localhost'"),
        (("localhost:1", "two", 0), "num_processes='two'"),
    ],
)
def test_inconsistent_settings_are_named(args, message):
    with pytest.raises(d.DistributedError, match=message):
        d.resolve(*args, env={})


def test_bad_environment_is_named():
    with pytest.raises(d.DistributedError, match=f"{d.ENV_PROCESS_ID}"):
        d.resolve(env={d.ENV_COORDINATOR: "h:1", d.ENV_NUM_PROCESSES: "2"})


def test_cli_reports_bad_process_flags_before_starting():
    proc = subprocess.run(
        [sys.executable, "-m", "lm_align.cli", "train", "--num-processes=2", "--process-id=0"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "coordinator not given" in proc.stderr


def test_launch_local_rejects_bad_counts():
    proc = subprocess.run(
        [sys.executable, "-m", "lm_align.cli", "launch", "local", "--num-processes=0", "--",
         "train"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--num-processes=0; use 1 or more" in proc.stderr


def test_a_tpu_vm_initialises_from_the_tpu_metadata():
    assert d.resolve(env={}, tpu_vm=True).mode == "tpu"
    assert d.resolve(env={}, tpu_vm=False).mode == "single"
    # Explicit settings still win on a TPU VM.
    assert d.resolve("h:1", 2, 0, env={}, tpu_vm=True).mode == "explicit"


class _FakeMetadata:
    """A metadata server whose maintenance-event value the test sets."""

    def __init__(self):
        import http.server

        owner = self
        self.value, self.requests = "NONE", []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append((self.path, self.headers.get("Metadata-Flavor")))
                body = owner.value.encode()
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = f"127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def metadata():
    server = _FakeMetadata()
    yield server
    server.server.shutdown()


def test_maintenance_watch_fires_on_terminate(metadata):
    events = []
    thread = d.watch_maintenance(
        events.append, interval_s=0.05, env={"GCE_METADATA_IP": metadata.address}
    )
    time.sleep(0.3)
    assert events == [] and thread.is_alive()
    metadata.value = "MIGRATE_ON_HOST_MAINTENANCE"  # live migration: keep training
    time.sleep(0.3)
    assert events == []
    metadata.value = "TERMINATE_ON_HOST_MAINTENANCE"
    thread.join(timeout=5)
    assert events == ["TERMINATE_ON_HOST_MAINTENANCE"]
    path, flavor = metadata.requests[0]
    assert path == "/computeMetadata/v1/instance/maintenance-event" and flavor == "Google"


def test_maintenance_watch_is_on_for_tpu_vms_and_settable():
    tpu, single = d.ProcessSpec("tpu"), d.ProcessSpec("single")
    assert d.should_watch_maintenance(tpu, env={})
    assert not d.should_watch_maintenance(single, env={})
    assert d.should_watch_maintenance(single, env={d.ENV_WATCH_MAINTENANCE: "1"})
    assert not d.should_watch_maintenance(tpu, env={d.ENV_WATCH_MAINTENANCE: "0"})
    with pytest.raises(d.DistributedError, match="use 1 \\(watch\\) or 0"):
        d.should_watch_maintenance(tpu, env={d.ENV_WATCH_MAINTENANCE: "yes"})


@pytest.mark.slow
def test_train_checkpoints_and_stops_on_a_maintenance_event(metadata, tmp_path):
    from tests.helpers import TINY, cli_args, env_with_devices, losses

    workdir = tmp_path / "run"
    env = env_with_devices(1)
    env.update(
        {"GCE_METADATA_IP": metadata.address, d.ENV_WATCH_MAINTENANCE: "1",
         d.ENV_MAINTENANCE_POLL: "0.1"}
    )  # fmt: skip
    proc = subprocess.Popen(
        cli_args(workdir, TINY + ["train.steps=400", "train.checkpoint_every=1000"]),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    t0 = time.monotonic()
    while not ((workdir / "metrics.jsonl").exists() and len(losses(workdir)) >= 3):
        assert proc.poll() is None and time.monotonic() - t0 < 240
        time.sleep(0.2)
    metadata.value = "TERMINATE_ON_HOST_MAINTENANCE"
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "maintenance event TERMINATE_ON_HOST_MAINTENANCE: checkpointing and stopping" in out
    assert "SIGTERM: saved checkpoint at step" in out
    assert max(losses(workdir)) < 400


def test_launcher_reports_every_failed_process_even_when_they_end_between_two_polls():
    """Process 1 killed and process 0 aborting right after it, both seen in one poll:
    each is reported once, and the first failure's status is the launcher's."""
    import io
    import types

    from lm_align.launch.local import _report_failures

    procs = [types.SimpleNamespace(returncode=-6), types.SimpleNamespace(returncode=-9)]
    out, reported = io.StringIO(), set()
    assert _report_failures(procs, reported, 0, 5, out) == -6
    lines = out.getvalue().splitlines()
    assert lines == [
        "launcher: process 0 exited with status -6 (killed by SIGABRT)",
        "launcher: process 1 exited with status -9 (killed by SIGKILL)",
    ]
    assert _report_failures(procs, reported, 0, 5, out) is None  # not twice
    # One failed while another still runs: the heartbeat note says what happens next.
    procs = [types.SimpleNamespace(returncode=None), types.SimpleNamespace(returncode=1)]
    out = io.StringIO()
    assert _report_failures(procs, set(), 1, 5, out) == 1
    assert "process 1 exited with status 1; the others stop within the 5s heartbeat" in (
        out.getvalue()
    )
