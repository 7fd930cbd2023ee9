"""Where a process learns it is one of several, and the errors for inconsistent settings."""

import subprocess
import sys

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
