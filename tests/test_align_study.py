"""The end-to-end alignment study, shortened (experiments/align_arithmetic.py:quick)."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, env_with_devices


@pytest.mark.slow
def test_quick_study_runs_every_stage_and_writes_the_table(tmp_path):
    workdir = tmp_path / "study"
    cmd = [
        sys.executable, "-m", "lm_align.cli", "align-study",
        "--config", os.path.join(REPO, "experiments", "align_arithmetic.py") + ":quick",
        "--workdir", str(workdir), "--config.train.progress=false",
        "--config.train.tensorboard=false",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, env=env_with_devices(1), capture_output=True, text=True, timeout=900, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((workdir / "results.json").read_text())
    assert [r["method"] for r in rows] == ["SFT (start)", "dpo", "lipo_lambda"]
    start = rows[0]
    assert 0.0 < start["eval_answer_exact_match"] < 1.0  # a policy with room to improve
    assert abs(start["eval_kl"]) < 1e-4
    for r in rows[1:]:
        assert 0.0 <= r["eval_answer_exact_match"] <= 1.0 and r["eval_kl"] is not None
    assert "| dpo |" in (workdir / "results.md").read_text()
    pairs = (workdir / "prefs" / "pairs.jsonl").read_text().splitlines()
    assert pairs and all(json.loads(p)["chosen"] != json.loads(p)["rejected"] for p in pairs)

    # Rerunning resumes: every stage is found finished, nothing is retrained.
    again = subprocess.run(
        cmd, env=env_with_devices(1), capture_output=True, text=True, timeout=900, cwd=REPO
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert "already finished" in again.stdout and "exists, reused" in again.stdout
    assert json.loads((workdir / "results.json").read_text()) == rows
