"""`lm-align rl-study` and its statistics: the paired bootstrap, the quick study end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lm_align.align.evaluation import paired_bootstrap
from tests.helpers import REPO, env_with_devices


def test_paired_bootstrap_of_a_constant_difference_is_that_constant():
    before = np.asarray([0, 1, 0, 1, 1, 0], float)
    ci = paired_bootstrap(before + 0.25, before)
    assert (ci.mean, ci.lo, ci.hi, ci.n) == (0.25, 0.25, 0.25, 6)
    assert ci.excludes_zero()


def test_paired_bootstrap_covers_the_true_mean_about_95_percent_of_the_time():
    """Per-problem differences drawn with a known mean 0.1 (problems of varying difficulty
    shared by both policies): the interval holds 0.1 in 90-99% of 200 seeded trials."""
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        difficulty = rng.uniform(0, 1, 300)
        before = (rng.uniform(0, 1, 300) > difficulty).astype(float)
        after = before + rng.normal(0.1, 0.5, 300)
        ci = paired_bootstrap(after, before, num_resamples=1000, seed=trial)
        covered += ci.lo <= 0.1 <= ci.hi
    assert 180 <= covered <= 198, covered


def test_pairing_removes_the_shared_problem_difficulty():
    """Two policies that differ by +0.05 on every problem of very unequal difficulty: the
    paired interval excludes 0, although each accuracy alone varies by far more."""
    rng = np.random.default_rng(1)
    before = rng.uniform(0, 1, 200)
    ci = paired_bootstrap(before + 0.05 + rng.normal(0, 0.01, 200), before)
    assert ci.lo > 0.04 and ci.hi < 0.06


def test_paired_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same non-empty"):
        paired_bootstrap(np.zeros(3), np.zeros(4))


def test_quick_study_runs_end_to_end_and_reports_intervals(tmp_path):
    """The shortened study: base, continued-SFT control, GRPO (one seed), evaluations on
    the same distinct problems, the table, the figure; a rerun reads everything back."""
    cmd = [sys.executable, "-m", "lm_align.cli", "rl-study", "--config",
           os.path.join(REPO, "experiments", "rl_arithmetic.py:quick"), "--workdir",
           str(tmp_path), "--config.train.progress=false", "--config.train.tensorboard=false"]  # fmt: skip
    proc = subprocess.run(cmd, env=env_with_devices(1), capture_output=True, text=True,
                          timeout=900, cwd=REPO, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in rows] == ["base", "control", "grpo"]
    for r in rows[1:]:
        for label in ("greedy accuracy", "pass@1"):
            ci = r[f"delta {label}"]
            assert ci["lo"] <= ci["mean"] <= ci["hi"] and ci["n"] == 32
            # The change is the mean per-problem difference of the two policies' reports.
            assert ci["mean"] == pytest.approx(r[label] - rows[0][label], abs=1e-9)
        assert "delta greedy accuracy [carry]" in r and "delta greedy accuracy [no_carry]" in r
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the base against itself
    assert (tmp_path / "results.png").stat().st_size > 10_000
    table = (tmp_path / "results.md").read_text()
    assert "| grpo | 1 |" in table and "[95% CI]" in table
    again = subprocess.run(cmd, env=env_with_devices(1), capture_output=True, text=True,
                           timeout=300, cwd=REPO, check=False)  # fmt: skip
    assert again.returncode == 0 and "already finished" in again.stdout + again.stderr
    assert json.loads((tmp_path / "results.json").read_text()) == rows
