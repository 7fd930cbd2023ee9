"""The alignment study (`lm-align align-study`), shortened: experiments/align_arithmetic.py:quick."""

import json
import os
import subprocess
import sys

import pytest

from lm_align.align import study
from lm_align.config import ConfigError
from tests.helpers import REPO, env_with_devices


def _true_sum(prompt: str) -> str:
    a, b = prompt.rstrip("=").split("+")
    return str(int(a) + int(b))


def _spec(**fields):
    return {**study.DEFAULTS, "methods": ("dpo", "rest_em"), **fields}


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"methods": ()}, "no methods"),
        ({"seeds": ()}, "no seeds"),
        ({"one_seed": ("ppo",)}, r"one_seed names \['ppo'\]"),
        ({"data": {}, "method_data": {"dpo": "triples"}}, "method_data .*triples.*use one of"),
        ({"method_data": {"dpo": "pairs"}}, "needs the data stage"),
        ({"data": {"num_samples": 9, "num_candidates": 8}}, "num_samples=9 must lie in"),
        ({"data": {"num_sample": 4}}, r"data fields \['num_sample'\]"),
        ({"targets": {"dpo": "pass@3"}}, "targets .*pass@3.*use one of"),
        ({"comparisons": {"dpo": "kto"}}, r"comparisons name \['kto'\]"),
        ({"reward_model": "dpo"}, "reward_model='dpo' is also a method"),
    ],
)
def test_a_bad_study_spec_names_the_field_and_the_fix(fields, match):
    with pytest.raises(ConfigError, match=match):
        study._check_spec(_spec(**fields))


@pytest.mark.slow
def test_quick_study_runs_every_stage_and_reports_intervals(tmp_path):
    """A 250-step corrupted base, the data stage, four methods of two kinds (ReST-EM's
    fine-tuning; DPO, LiPO, BoN-RLB), each evaluated on the same 64 distinct problems
    (tests/test_rl_study.py runs the third kind, RL, and a control without a data file)."""
    cmd = [
        sys.executable, "-m", "lm_align.cli", "align-study",
        "--config", os.path.join(REPO, "experiments", "align_arithmetic.py") + ":quick",
        "--workdir", str(tmp_path), "--config.train.progress=false",
        "--config.train.tensorboard=false",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, env=env_with_devices(1), capture_output=True, text=True, timeout=900, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in rows] == [
        "base", "rest_em", "dpo", "lipo_lambda", "bon_rlb"
    ]  # fmt: skip
    base = rows[0]
    assert base["kl"] == pytest.approx(0.0, abs=1e-5)  # the start against itself
    for r in rows[1:]:
        for label in ("greedy accuracy", "pass@1", "pass@4"):
            ci = r[f"delta {label}"]
            assert ci["lo"] <= ci["mean"] <= ci["hi"] and ci["n"] == 64
            # The change is the mean per-problem difference of the two evaluations.
            assert ci["mean"] == pytest.approx(r[label] - base[label], abs=1e-9)
        assert "delta greedy accuracy [carry]" in r
        assert r["improves"] == (r[f"delta {r['target']}"]["lo"] > 0)
    for r in rows:  # a selector picks one of the k samples: correct only if one of them is
        assert 0.0 <= r["bon_rm@4"] <= r["pass@4"] + 1e-9 and r["bon_likelihood@4"] <= r["pass@4"]
    by_method = {r["method"]: r for r in rows}
    # A compared pair: the paired change is the difference of the two methods' means.
    c = by_method["lipo_lambda"]["comparison"]
    assert c["over"] == "dpo" and c["metric"] == "greedy accuracy" and c["n"] == 64
    lipo, dpo = by_method["lipo_lambda"], by_method["dpo"]
    assert c["mean"] == pytest.approx(lipo["greedy accuracy"] - dpo["greedy accuracy"], abs=1e-9)
    assert "comparison" not in by_method["dpo"]
    assert by_method["bon_rlb"]["target"] == "pass@4"
    assert by_method["dpo"]["target"] == "greedy accuracy"
    # Each method trained on its own kind of data, from the start policy.
    for method, key in [("dpo", "align"), ("lipo_lambda", "align"), ("bon_rlb", "align")]:
        cfg = json.loads((tmp_path / method / "seed_0" / "config.json").read_text())
        assert cfg[key]["policy_checkpoint"] == str(tmp_path / "base")
    files = {
        json.loads((tmp_path / m / "seed_0" / "config.json").read_text())["align"]["train_file"]
        for m in ("dpo", "lipo_lambda", "bon_rlb")
    }
    assert files == {str(tmp_path / "data" / f) for f in ("pairs.jsonl", "lists.jsonl",
                                                           "samples.jsonl")}  # fmt: skip
    rm = json.loads((tmp_path / "bradley_terry" / "seed_0" / "config.json").read_text())
    assert rm["align"]["loss"] == "bradley_terry"  # the reward model of bon@k, on the pairs
    assert rm["align"]["train_file"] == str(tmp_path / "data" / "pairs.jsonl")
    rest_em = json.loads((tmp_path / "rest_em" / "seed_0" / "config.json").read_text())
    assert rest_em["data"]["source"] == f"jsonl:{tmp_path / 'data' / 'kept.jsonl'}"

    # The data: rewards are the true sums' exact matches; kept samples are all correct.
    samples = [json.loads(x) for x in (tmp_path / "data" / "samples.jsonl").open()]
    assert len(samples) == 256 and all(len(s["responses"]) == 4 for s in samples)
    for s in samples:
        truth = _true_sum(s["prompt"])
        assert s["rewards"] == [float(r.strip() == truth) for r in s["responses"]]
    kept = [json.loads(x) for x in (tmp_path / "data" / "kept.jsonl").open()]
    assert kept and all(k["completion"].strip() == _true_sum(k["prompt"]) for k in kept)
    pairs = [json.loads(x) for x in (tmp_path / "data" / "pairs.jsonl").open()]
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    assert (tmp_path / "data" / "rso_pairs.jsonl").stat().st_size > 0

    assert (tmp_path / "results.png").stat().st_size > 10_000
    table = (tmp_path / "results.md").read_text()
    assert "| dpo | 1 |" in table and "[95% CI]" in table and "DPO beats the SFT start" in table

    # Rerunning resumes: every stage is found finished, nothing is retrained.
    again = subprocess.run(
        cmd, env=env_with_devices(1), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stdout + again.stderr
    assert "exists, reused" in again.stdout + again.stderr
    assert json.loads((tmp_path / "results.json").read_text()) == rows
