"""Shared test utilities: running lm-align in a subprocess with simulated devices."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_EXPERIMENT = os.path.join(REPO, "experiments", "default.py")

# A model small enough that a run compiles and trains in seconds.
TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.d_ff=64",
    "data.seq_len=32",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.answer_eval_examples=0",
    "train.progress=false",
    "train.tensorboard=false",
    "optimizer.warmup_steps=2",
]


# The suite compiles hundreds of tiny programs and runs each for a few steps: XLA's
# full LLVM optimisation of the CPU code (level 2) costs far more than it saves at
# these sizes. Level 1 compiles about twice as fast and runs the longer tests
# faster than level 0. Set for the test process (tests/conftest.py) and every
# subprocess; the semantics of the programs do not depend on it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"

# A persistent XLA compilation cache shared by the lm-align processes the tests
# start (not by the test process itself): a program compiled by one subprocess
# (most run the same tiny model) is loaded by the next instead of compiled again.
# It lives under the git-ignored .pytest_cache, or in $LM_ALIGN_TEST_COMPILATION_CACHE
# (`.ci/run` sets a fresh one per run). JAX_ENABLE_COMPILATION_CACHE=false turns it
# off. JAX keys each entry by the program, the XLA flags and the jax version.
COMPILATION_CACHE_DIR = os.environ.get("LM_ALIGN_TEST_COMPILATION_CACHE") or os.path.join(
    REPO, ".pytest_cache", "jax_compilation_cache"
)


def env_with_devices(n: int) -> dict:
    """The environment for an lm-align subprocess on `n` simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={n}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = COMPILATION_CACHE_DIR
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env


def cli_args(workdir, overrides, config=DEFAULT_EXPERIMENT):
    return [
        sys.executable,
        "-m",
        "lm_align.cli",
        "train",
        "--config",
        config,
        "--workdir",
        str(workdir),
        *[f"--config.{o}" for o in overrides],
    ]


def run_cli(workdir, overrides, *, devices=1, timeout=300, check=True):
    proc = subprocess.run(
        cli_args(workdir, overrides),
        env=env_with_devices(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"lm-align failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def lm_align_command(*args, timeout=600) -> str:
    """Runs `python -m lm_align.cli ARGS` (one device, from the repository root), asserts
    it exits 0 (its output in the message), and returns its stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "lm_align.cli", *args], check=False, capture_output=True,
        text=True, env=env_with_devices(1), cwd=REPO, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def read_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_rows(workdir)}


def sigterm_after_rows(cmd, metrics_path, rows=5, *, timeout=240):
    """Starts `cmd`, sends SIGTERM once `metrics_path` has `rows` lines; returns (rc, output)."""
    import signal
    import time

    proc = subprocess.Popen(
        cmd, env=env_with_devices(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, cwd=REPO,
    )  # fmt: skip
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(metrics_path) and len(open(metrics_path).read().splitlines()) >= rows:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out
