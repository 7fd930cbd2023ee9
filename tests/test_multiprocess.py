"""Multi-process runs on this machine (`lm-align launch local`), as hosts of a pod run.

Two processes x 4 simulated CPU devices talk through JAX's CPU collectives.
They must train exactly like one process with 8 devices and like 1 device (the
same global batches, with the default packing), resume a checkpoint written by
the other process count, stop together on SIGTERM and resume exactly, and not
hang when one of them dies.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.helpers import (
    DEFAULT_EXPERIMENT,
    REPO,
    TINY,
    env_with_devices,
    losses,
    read_rows,
    run_cli,
)

STEPS = 30
RUN = TINY + [
    f"train.steps={STEPS}",
    "train.checkpoint_every=5",
    "train.async_checkpointing=true",
    "model.vocab_size=260",
]
# The default experiment with its default packing on a data=4 x fsdp=2 mesh: a
# few steps, a checkpoint half way.
SHORT_STEPS = 6
SHORT = TINY + [
    f"train.steps={SHORT_STEPS}",
    "train.checkpoint_every=3",
    "train.async_checkpointing=false",
    "model.vocab_size=260",
    "mesh.data=4",
    "mesh.fsdp=2",
]
HEARTBEAT_S = 5


def _launch_cmd(workdir, overrides=RUN, processes=2, devices=4):
    return [
        sys.executable, "-m", "lm_align.cli", "launch", "local",
        f"--num-processes={processes}", f"--devices-per-process={devices}",
        f"--heartbeat-timeout={HEARTBEAT_S}", "--",
        "train", "--config", DEFAULT_EXPERIMENT, "--workdir", str(workdir),
        *[f"--config.{o}" for o in overrides],
    ]  # fmt: skip


def _launch(workdir, overrides=RUN, timeout=400):
    proc = subprocess.run(
        _launch_cmd(workdir, overrides), env=env_with_devices(1), capture_output=True,
        text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-process x 4-device run."""
    workdir = tmp_path_factory.mktemp("straight")
    out = _launch(workdir)
    assert "[p0] process 0 of 2: 4 local cpu device(s) of 8" in out
    assert "[p1] process 1 of 2: 4 local cpu device(s) of 8" in out
    return losses(workdir)


@pytest.mark.slow
def test_two_processes_match_one_process_and_one_device(straight, tmp_path):
    run_cli(tmp_path / "eight", RUN, devices=8)  # 1 process, mesh data=8
    run_cli(tmp_path / "one", RUN + ["mesh.data=1"], devices=1)
    eight, one = losses(tmp_path / "eight"), losses(tmp_path / "one")
    assert sorted(straight) == sorted(eight) == sorted(one) == list(range(1, STEPS + 1))
    steps = sorted(straight)
    np.testing.assert_allclose([straight[s] for s in steps], [eight[s] for s in steps], rtol=1e-5)
    np.testing.assert_allclose([straight[s] for s in steps], [one[s] for s in steps], rtol=1e-5)


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """SHORT as 2 processes x 4 devices and as 1 process x 8 devices."""
    root = tmp_path_factory.mktemp("short")
    _launch(root / "two", SHORT)
    run_cli(root / "eight", SHORT, devices=8)
    return root


def test_two_processes_and_one_process_train_on_the_same_global_batches(short_runs):
    """Packing happens on the global batch, so the process count changes nothing."""
    two, eight = losses(short_runs / "two"), losses(short_runs / "eight")
    assert sorted(two) == sorted(eight) == list(range(1, SHORT_STEPS + 1))
    np.testing.assert_allclose([two[s] for s in eight], [eight[s] for s in eight], rtol=1e-5)


def _rewind(src, dst, step):
    """A copy of run `src` as it was at the checkpoint of `step` (later ones removed)."""
    shutil.copytree(src, dst)
    for name in os.listdir(dst / "checkpoints"):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(dst / "checkpoints" / name)
    os.remove(dst / "final.json")


@pytest.mark.parametrize("written_by,resumed_by", [("two", "eight"), ("eight", "two")])
def test_resume_on_another_process_count_continues_the_sequence(
    short_runs, tmp_path, written_by, resumed_by
):
    workdir = tmp_path / f"{written_by}_then_{resumed_by}"
    _rewind(short_runs / written_by, workdir, 3)
    if resumed_by == "two":
        out = _launch(workdir, SHORT)
    else:
        out = run_cli(workdir, SHORT, devices=8).stdout
    assert f"resumed from {workdir / 'checkpoints'}/3" in out
    want, got = losses(short_runs / resumed_by), losses(workdir)
    assert sorted(got) == list(range(1, SHORT_STEPS + 1))
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-5)


def _popen_launch(workdir, overrides=RUN):
    """The launcher, running; its output lines collect in `proc.lines` (read by a thread)."""
    proc = subprocess.Popen(
        _launch_cmd(workdir, overrides), env=env_with_devices(1), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    proc.lines = []
    proc.reader = threading.Thread(target=lambda: proc.lines.extend(proc.stdout), daemon=True)
    proc.reader.start()
    return proc


def _finish(proc, timeout):
    proc.wait(timeout=timeout)
    proc.reader.join(timeout=10)
    return "".join(proc.lines)


def _wait_rows(path, rows, proc, timeout=300):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode})")
        if os.path.exists(path) and sum(1 for _ in open(path)) >= rows:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} never reached {rows} rows")


@pytest.mark.slow
def test_sigterm_to_both_processes_then_relaunch_matches_uninterrupted(straight, tmp_path):
    workdir = tmp_path / "interrupted"
    proc = _popen_launch(workdir, RUN + ["train.checkpoint_every=1000"])
    _wait_rows(workdir / "metrics.jsonl", 7, proc)
    proc.send_signal(signal.SIGTERM)  # the launcher forwards it to both processes
    out = _finish(proc, timeout=120)
    assert proc.returncode == 0, out
    saved = re.findall(r"\[p0\] SIGTERM: saved checkpoint at step (\d+)", out)
    assert saved, out
    stopped_at = int(saved[0])
    assert 7 <= stopped_at < STEPS
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(stopped_at)]

    out = _launch(workdir, RUN + ["train.checkpoint_every=1000"])
    assert f"resumed from {workdir / 'checkpoints'}/{stopped_at}" in out
    assert losses(workdir) == straight  # every step, bitwise


@pytest.mark.slow
def test_a_dead_process_stops_the_other_and_a_restart_resumes(straight, tmp_path):
    workdir = tmp_path / "killed"
    proc = _popen_launch(workdir)
    _wait_rows(workdir / "metrics.jsonl", 8, proc)  # past the step-5 checkpoint
    pid = int(re.search(r"process 1 is pid (\d+)", "".join(proc.lines)).group(1))
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    out = _finish(proc, timeout=HEARTBEAT_S + 60)
    waited = time.monotonic() - killed_at
    assert proc.returncode != 0
    assert "process 1 exited with status -9 (killed by SIGKILL)" in out
    # Process 0 stopped by itself, not by the launcher: from the missed heartbeats, or, when
    # the kill cut a collective in flight, aborted by the collective transport (gloo).
    assert "still alive; killing it" not in out
    assert "another task died" in out or "[p0] terminate called" in out, out[-3000:]
    assert re.search(r"process 0 exited with status -?[1-9]", out), out[-3000:]
    assert waited < HEARTBEAT_S + 45, waited

    last = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert last >= 5
    out = _launch(workdir)
    assert f"resumed from {workdir / 'checkpoints'}/{last}" in out
    assert losses(workdir) == straight


@pytest.mark.slow
def test_preference_training_two_processes_match_one(tmp_path):
    from tests.test_align_trainer import EXPERIMENT, _write_data

    _write_data(tmp_path)
    pairs = str(tmp_path / "pairs.jsonl")
    (tmp_path / "exp.py").write_text(EXPERIMENT.format(train=pairs, eval=pairs))
    common = ["align", "--config", str(tmp_path / "exp.py")]
    launch = [
        sys.executable, "-m", "lm_align.cli", "launch", "local", "--num-processes=2",
        "--devices-per-process=2", "--", *common, "--workdir", str(tmp_path / "two"),
    ]  # fmt: skip
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "[p0] end: greedy accuracy" in proc.stdout  # evals ran on both processes
    single = [sys.executable, "-m", "lm_align.cli", *common, "--workdir", str(tmp_path / "one")]
    proc = subprocess.run(
        single, env=env_with_devices(4), capture_output=True, text=True, timeout=400, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    two, one = (
        {r["step"]: r["loss"] for r in read_rows(tmp_path / w) if "loss" in r}  # not step 0's eval
        for w in ("two", "one")
    )
    assert sorted(two) == sorted(one) == list(range(1, 13))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)


CHECKS_SCRIPT = """
import sys
from lm_align import distributed as d
d.initialize(d.resolve())
what, value = sys.argv[1], sys.argv[2]
try:
    d.check_same_config(value) if what == "config" else d.check_shared_workdir(value)
    print("ok", flush=True)
except d.DistributedError as e:
    print(f"error: {e}", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "what,message",
    [
        ("config", "config differs from another process's"),
        ("workdir", "process(es) [1] do not see"),
    ],
)
def test_processes_that_disagree_are_told_why(tmp_path, what, message):
    """Different configs, or run directories that are not one shared directory."""
    from lm_align.launch.local import free_port, process_env

    coordinator = f"localhost:{free_port()}"
    procs = []
    for i in range(2):
        env = process_env(
            dict(os.environ), coordinator=coordinator, num_processes=2, process_id=i,
            devices=1, heartbeat_s=HEARTBEAT_S,
        )  # fmt: skip
        value = str(tmp_path / f"dir{i}") if what == "workdir" else f"config {i}"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", CHECKS_SCRIPT, what, value],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        )
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for out in outs:
        assert message in out, out[-2000:]
