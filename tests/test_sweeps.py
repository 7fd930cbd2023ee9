"""Sweeps end to end: run names, early validation, statuses, resume after SIGTERM, summary."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from lm_align import cli
from lm_align.config import ConfigError
from lm_align.sweeps import LocalExecutor, RunEvent, load_summary, plan_sweep, run_sweep
from lm_align.sweeps.runner import run_names
from lm_align.sweeps.summary import METRIC_COLUMNS, run_metrics
from tests.helpers import DEFAULT_EXPERIMENT, REPO, env_with_devices

# A tiny model: one run compiles and trains 4 steps in seconds. Sweeps are chosen
# by the experiment argument: `sweep.py`, `sweep.py:bad_key`, `sweep.py:changed`.
EXPERIMENT = textwrap.dedent("""
    import importlib.util

    spec = importlib.util.spec_from_file_location("default_experiment", {default!r})
    default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(default)


    def get_config(arg=None):
        cfg = default.get_config()
        cfg.train.steps = 4
        cfg.train.batch_size = 4
        cfg.train.eval_batches = 1
        cfg.train.answer_eval_examples = 0
        cfg.train.progress = False
        cfg.train.tensorboard = False
        cfg.model.d_model = 16
        cfg.model.n_layers = 1
        cfg.model.n_heads = 2
        cfg.model.d_ff = 32
        cfg.data.seq_len = 16
        cfg.optimizer.warmup_steps = 1
        return cfg


    def get_sweep(arg=None):
        if arg == "bad_key":
            return [{{"optimizer.lr": 1e-3}}, {{"optimizer.lr": 1e-3, "model.d_modle": 32}}]
        if arg == "bad_value":
            return [{{"optimizer.lr": 1e-3}}, {{"model.n_heads": 3}}]
        if arg == "changed":
            return [{{"train.eval_batches": 1}}, {{"optimizer.lr": 1e-2}}]
        return [
            {{"train.eval_batches": 1}},
            # Plain SGD at an absurd LR without clipping: non-finite by step 3.
            {{"optimizer.lr": 1e12, "optimizer.name": "sgd", "optimizer.clip_norm": 0.0}},
            # Compiles to the same program as run 0 (JAX's compilation cache reuses it).
            {{"train.eval_batches": 2}},
        ]
""")


@pytest.fixture
def experiment(tmp_path):
    path = tmp_path / "sweep.py"
    path.write_text(EXPERIMENT.format(default=DEFAULT_EXPERIMENT))
    return str(path)


class NeverRun:
    """An executor that fails the test if the sweep tries to start anything."""

    def run(self, runs, callback):
        raise AssertionError(f"started {len(runs)} runs")

    def stop(self, force=False):
        pass


class FakeTrain:
    """An executor that 'trains' instantly: writes two metrics rows and final.json."""

    def __init__(self):
        self.started = []

    def run(self, runs, callback):
        for run in runs:
            self.started.append(run.name)
            callback(RunEvent("started", run))
            rows = [{"step": 1, "loss": 5.5, "max_attn_logit": [1.0]}]
            rows.append({"step": 4, "loss": 4.0, "max_attn_logit": [2.0]})
            with open(os.path.join(run.workdir, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            with open(os.path.join(run.workdir, "final.json"), "w") as f:
                json.dump({"step": 4, "eval_loss": 4.2}, f)
            callback(RunEvent("ended", run, returncode=0, wall_s=0.5))

    def stop(self, force=False):
        pass


def test_run_names_are_deterministic_and_filesystem_safe():
    sweep = [
        {"optimizer.lr": 1e-3, "model.d_model": 128},
        {"optimizer.lr": 3e-4, "model.d_model": 256, "data.source": "text:a/b*.txt"},
        {"model.dropout": 0.1, "optimizer.dropout": True},
    ]
    assert run_names(sweep) == [
        "000_lr=0.001_d_model=128",
        "001_lr=0.0003_d_model=256_source=text-a-b-.txt",
        "002_model.dropout=0.1_optimizer.dropout=true",  # last parts collide: full keys
    ]


def test_bad_override_key_fails_before_any_run(experiment, tmp_path):
    workdir = tmp_path / "sw"
    with pytest.raises(ConfigError, match=r"sweep run 1 .*'model\.d_modle'.*model\.d_model"):
        run_sweep(experiment + ":bad_key", str(workdir), executor=NeverRun())
    with pytest.raises(ConfigError, match=r"sweep run 1 .*n_heads"):  # 16 % 3 != 0
        run_sweep(experiment + ":bad_value", str(workdir), executor=NeverRun())
    assert not workdir.exists()


def test_sweep_command_errors(experiment, tmp_path, capsys):
    plain = tmp_path / "plain.py"
    plain.write_text("from lm_align.train import base_config\nget_config = base_config\n")
    assert cli.main(["sweep", "--config", str(plain), "--workdir", str(tmp_path / "a")]) == 2
    assert "defines no get_sweep()" in capsys.readouterr().err
    args = ["sweep", "--config", experiment, "--workdir", str(tmp_path / "b"), "--dry-run"]
    assert cli.main(args + ["--config.train.stpes=3"]) == 2
    assert "command-line override: unknown config key 'train.stpes'" in capsys.readouterr().err
    assert cli.main(args + ["--config.optimizer.lr=0.1"]) == 2  # the sweep sets it
    assert "optimizer.lr set both on the command line and by sweep run 1" in (
        capsys.readouterr().err
    )
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "3 runs of" in out and "001_lr=1e+12_name=sgd_clip_norm=0  pending" in out
    assert not (tmp_path / "b").exists()  # a dry run creates nothing


def test_changed_sweep_on_restart_is_an_error(experiment, tmp_path):
    workdir = str(tmp_path / "sw")
    fake = FakeTrain()
    result = run_sweep(experiment, workdir, executor=fake, max_runs=2)
    assert fake.started == ["000_eval_batches=1", "001_lr=1e+12_name=sgd_clip_norm=0"]
    assert result.statuses["002_eval_batches=2"] == "pending"
    with pytest.raises(ConfigError, match=r"001_lr=1e\+12_name=sgd_clip_norm=0 holds run 1"):
        run_sweep(experiment + ":changed", workdir, executor=NeverRun())
    # The unchanged sweep continues where it stopped.
    fake = FakeTrain()
    run_sweep(experiment, workdir, executor=fake)
    assert fake.started == ["002_eval_batches=2"]
    rows = load_summary(workdir)
    assert [r["status"] for r in rows] == ["finished"] * 3
    assert rows[0]["init_loss"] == 5.5 and rows[0]["final_train_loss"] == 4.0
    assert rows[0]["eval_loss"] == 4.2 and rows[0]["steps"] == 4
    assert rows[0]["max_attn_logit_final"] == 2.0 and rows[0]["max_attn_logit_peak"] == 2.0
    assert rows[1]["optimizer.name"] == "sgd" and rows[0]["optimizer.name"] is None


def test_run_metrics_takes_init_loss_only_from_step_1(tmp_path):
    rows = [
        {"step": 5, "loss": 3.0, "max_attn_logit": [1.0, 7.0]},
        {"step": 10, "loss": "nan", "max_attn_logit": ["nan", 2.0]},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = run_metrics(str(tmp_path))
    assert m["init_loss"] is None  # step 1 was not logged
    assert m["max_attn_logit_final"] == 2.0 and m["max_attn_logit_peak"] == 7.0
    assert isinstance(m["final_train_loss"], float) and math.isnan(m["final_train_loss"])
    assert m["steps"] == 10 and m["eval_loss"] is None


FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys
    workdir, index = sys.argv[1], int(sys.argv[2])
    if index == 0:
        with open(os.path.join(workdir, "final.json"), "w") as f:
            json.dump({"eval_loss": 1.0}, f)
    elif index == 1:
        print("Traceback: something broke", file=sys.stderr)
        sys.exit(1)
    else:
        print("error: non-finite loss or gradient at step 7 (loss=nan)", file=sys.stderr)
        sys.exit(3)
""")


class ScriptExecutor(LocalExecutor):
    """LocalExecutor running a stand-in script instead of `lm-align train`."""

    def _start(self, run, env):
        argv = (sys.executable, "-c", FAKE_TRAIN, run.workdir, str(run.index))
        return super()._start(type(run)(run.index, run.name, run.overrides, run.workdir, argv), env)


def test_exit_statuses_become_run_statuses(experiment, tmp_path):
    """0 + final.json: finished; 3: diverged; other: failed, with stderr kept."""
    workdir = str(tmp_path / "sw")
    lines = []
    result = run_sweep(experiment, workdir, executor=ScriptExecutor(parallel=2), log=lines.append)
    assert list(result.statuses.values()) == ["finished", "failed", "diverged"]
    with open(os.path.join(workdir, result.runs[1].name, "run.json")) as f:
        failed = json.load(f)
    assert failed["returncode"] == 1 and "something broke" in failed["stderr_tail"]
    with open(os.path.join(workdir, result.runs[1].name, "stderr.log")) as f:
        assert "something broke" in f.read()
    assert any("diverged non-finite loss at step 7" in line for line in lines)
    assert any("failed exit status 1: Traceback: something broke" in line for line in lines)


def _mtimes(run_dir):
    return {
        name: os.stat(os.path.join(run_dir, name)).st_mtime_ns
        for name in ("final.json", "metrics.jsonl", "run.json", "stdout.log")
    }


def test_sigterm_then_resume_skips_finished_runs_and_records_divergence(experiment, tmp_path):
    """SIGTERM after the first run; the rerun leaves it untouched and does the rest."""
    workdir = str(tmp_path / "sw")
    env = env_with_devices(1)  # with the shared compilation cache: run 2 reuses run 0's program
    cmd = [sys.executable, "-m", "lm_align.cli", "sweep", "--config", experiment]
    cmd += ["--workdir", workdir, "--config.train.log_every=1"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = []
    for line in proc.stdout:
        output.append(line)
        if "000_eval_batches=1 finished" in line:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, "".join(output)
    first = os.path.join(workdir, "000_eval_batches=1")
    before = _mtimes(first)
    statuses = {r["name"]: r["status"] for r in load_summary(workdir)}
    assert statuses["000_eval_batches=1"] == "finished"
    assert statuses["001_lr=1e+12_name=sgd_clip_norm=0"] in ("interrupted", "pending")
    assert statuses["002_eval_batches=2"] == "pending"

    again = subprocess.run(
        cmd + ["--parallel", "2"],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[1/3] 000_eval_batches=1 finished earlier; skipped" in again.stdout
    assert "000_eval_batches=1 started" not in again.stdout
    assert _mtimes(first) == before  # not rerun: files untouched
    with open(os.path.join(first, "stdout.log")) as f:
        assert f.read().count("=== ") == 1  # one attempt
    assert "001_lr=1e+12_name=sgd_clip_norm=0 diverged non-finite loss at step" in again.stdout
    assert "sweep: 2 finished, 1 diverged" in again.stdout

    rows = load_summary(workdir)
    assert [r["status"] for r in rows] == ["finished", "diverged", "finished"]
    with open(os.path.join(first, "metrics.jsonl")) as f:
        step1 = json.loads(f.readline())
    assert step1["step"] == 1 and rows[0]["init_loss"] == step1["loss"]
    assert rows[1]["init_loss"] == rows[0]["init_loss"]  # loss before any update: LR-free
    assert rows[1]["eval_loss"] is None and rows[1]["steps"] >= 1
    assert rows[2]["eval_loss"] > 0 and rows[2]["steps"] == 4
    assert rows[0]["max_attn_logit_peak"] >= rows[0]["max_attn_logit_final"] > 0
    with open(os.path.join(workdir, "summary.csv")) as f:
        header = f.readline().strip().split(",")
    assert header[:7] == [
        "name",
        "index",
        "status",
        "train.eval_batches",
        "optimizer.lr",
        "optimizer.name",
        "optimizer.clip_norm",
    ]
    assert header[7:] == [
        "init_loss",
        "final_train_loss",
        "eval_loss",
        "answer_exact_match",
        "max_attn_logit_final",
        "max_attn_logit_peak",
        "log_z_final",
        "output_logit_mean_final",
        "params_non_embedding",
        "steps",
        "wall_s",
    ]


def test_lr_width_experiment_is_a_valid_sweep(tmp_path):
    """experiments/lr_width.py (docs/sweeps.md's example): 24 runs, all configs valid."""
    runs = plan_sweep(os.path.join(REPO, "experiments", "lr_width.py"), str(tmp_path))
    assert len(runs) == 24
    assert runs[0].name == "000_lr=0.001_d_model=32_d_ff=128_qk_layernorm=true"
    assert runs[0].argv[-4:] == (
        "--config.optimizer.lr=0.001",
        "--config.model.d_model=32",
        "--config.model.d_ff=128",
        "--config.model.qk_layernorm=true",
    )


def test_docs_list_every_summary_column():
    with open(os.path.join(REPO, "docs", "sweeps.md"), encoding="utf-8") as f:
        docs = f.read()
    section = docs.split("## The summary", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(\w+)`", section, re.MULTILINE)
    assert documented == ["name", *METRIC_COLUMNS]  # the first row: `name`, `index`, `status`
