"""Learning from the model's own samples: sample files, policy evaluation, ReST-EM, BoN."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lm_align.align.config import align_base_config
from lm_align.align.policy_eval import evaluate_policy
from lm_align.config import ConfigError
from lm_align.data import DataError
from lm_align.data.arithmetic import arithmetic_exact
from lm_align.data.preference import load_samples
from lm_align.data.tokenizers import make_tokenizer
from lm_align.models import TransformerConfig
from lm_align.models.pure import PureModel
from tests.helpers import REPO, env_with_devices


def test_sample_files_keep_repeats_and_equal_rewards(tmp_path):
    path = tmp_path / "s.jsonl"
    lines = [
        {"prompt": "1+1=", "responses": ["2", "2", "3"], "rewards": [1, 1, 0]},
        {"prompt": "2+2=", "responses": ["5"], "rewards": [0.0]},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records = load_samples(str(path))
    assert [r.responses for r in records] == [["2", "2", "3"], ["5"]]
    np.testing.assert_array_equal(records[0].labels, [1.0, 1.0, 0.0])
    path.write_text(json.dumps({"prompt": "x", "responses": ["a"], "rewards": [1, 0]}) + "\n")
    with pytest.raises(DataError, match="K=1 numbers"):
        load_samples(str(path))


@pytest.mark.parametrize(
    "loss,fmt", [("reinforce", "pairwise"), ("dpo", "samples"), ("bon_rlb_p", "listwise")]
)
def test_policy_gradient_losses_and_only_they_take_samples(loss, fmt):
    from lm_align.align import trainer

    cfg = align_base_config()
    cfg.align.update(loss=loss, format=fmt, train_file="x")
    with pytest.raises(ConfigError, match="only they train on 'samples'"):
        trainer.setup(cfg)


def _first_byte_even(prompts, responses):
    """Accepts responses whose first byte is even: about half the samples of an
    untrained byte model, so both outcomes occur."""
    return np.array([float(bool(r) and r.encode("utf-8")[0] % 2 == 0) for r in responses])


PROMPTS = [f"{a}+{b}=" for a, b in [(1, 2), (30, 4), (5, 67), (8, 8), (12, 21), (9, 9)]]


@pytest.fixture(scope="module")
def tiny():
    model = PureModel(TransformerConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    return model, model.init(0), make_tokenizer("byte")


def _comb_pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_evaluate_policy_against_hand_computed_numbers(tiny):
    model, params, tok = tiny
    drawn = []

    def oracle_selector(samples, k):  # the verifier itself picks: bon@N is then pass@N
        drawn.append(samples)
        flat = [r for rs in samples.responses for r in rs]
        return _first_byte_even(None, flat).reshape(len(PROMPTS), -1)

    r = evaluate_policy(
        model, params, tok, PROMPTS, _first_byte_even, num_samples=4, ks=(1, 2, 4), seed=3,
        reference_params=params, selector=oracle_selector,
    )  # fmt: skip
    s = drawn[0]
    correct = np.array([[_first_byte_even(None, [x])[0] for x in rs] for rs in s.responses])
    c = correct.sum(axis=1).astype(int)
    # Some samples are right and some wrong, on some prompt neither all nor none:
    # otherwise every number below would be 0 or 1 whatever the code did.
    assert 0 < c.sum() < correct.size and np.any((c > 0) & (c < 4))
    assert r["sample_accuracy"] == pytest.approx(c.sum() / correct.size)
    for k in (1, 2, 4):
        want = np.mean([_comb_pass_at_k(4, ci, k) for ci in c])
        assert r[f"pass@{k}"] == pytest.approx(want, abs=1e-12)
    assert r["pass@4"] == pytest.approx(np.mean(c > 0)) == pytest.approx(r["bon@4"])
    eos = tok.eos_id
    lengths = [len(t) - (bool(t) and t[-1] == eos) for ts in s.token_ids for t in ts]
    assert r["mean_length"] == pytest.approx(np.mean(lengths))
    assert abs(r["kl"]) < 1e-4  # the policy is its own reference
    assert 0.0 <= r["ece"] <= 1.0 and 0.0 < r["greedy_confidence"] <= 1.0
    # The default selector (mean token log-prob) at n = 1 can only pick sample 0.
    plain = evaluate_policy(model, params, tok, PROMPTS, _first_byte_even, num_samples=4,
                            ks=(1, 4), seed=3)  # fmt: skip
    assert plain["bon@1"] == pytest.approx(correct[:, 0].mean())
    assert plain["pass@4"] == r["pass@4"]  # the same draws from the same seed
    with pytest.raises(ValueError, match="ks"):
        evaluate_policy(model, params, tok, PROMPTS, _first_byte_even, num_samples=2, ks=(3,))


def test_e_step_keeps_accepted_samples_up_to_the_cap(tiny):
    from lm_align.align.rest_em import DEFAULTS, e_step

    model, params, tok = tiny
    spec = {**DEFAULTS, "num_samples": 6, "max_new_tokens": 4, "max_per_problem": 2}
    samples, kept, counts = e_step(model, params, tok, PROMPTS, _first_byte_even, spec, seed=1)
    assert len(samples) == 6 * len(PROMPTS) == counts["samples"]
    rewards = np.array([x["reward"] for x in samples]).reshape(len(PROMPTS), 6)
    assert 0 < rewards.sum() < rewards.size  # both outcomes occur
    for p, prompt in enumerate(PROMPTS):
        good = [x["response"] for x in samples[6 * p : 6 * p + 6] if x["reward"] > 0.5]
        good = [g for g in good if g.strip()]
        assert [k["completion"] for k in kept if k["prompt"] == prompt] == good[:2]
    assert counts["kept"] == len(kept)
    assert counts["problems_solved"] == sum(rewards[p].max() > 0.5 for p in range(len(PROMPTS)))
    assert counts["sample_accuracy"] == pytest.approx(rewards.mean())


def test_bon_samples_file_holds_every_sample_and_its_reward(tiny, tmp_path):
    from lm_align.align.bon import DEFAULTS, write_samples

    model, params, tok = tiny
    spec = {**DEFAULTS, "num_samples": 4, "max_new_tokens": 4}
    path = str(tmp_path / "samples.jsonl")
    stats = write_samples(model, params, tok, PROMPTS, _first_byte_even, spec, path, seed=2)
    with open(path) as f:
        rows = [json.loads(x) for x in f]
    assert [r["prompt"] for r in rows] == PROMPTS
    for r in rows:
        assert len(r["responses"]) == 4
        assert r["rewards"] == _first_byte_even(None, r["responses"]).tolist()
    rewards = np.array([r["rewards"] for r in rows])
    assert 0 < rewards.sum() < rewards.size
    assert stats == {"problems": len(PROMPTS), "sample_accuracy": pytest.approx(rewards.mean())}
    assert len(load_samples(path)) == len(PROMPTS)  # the "samples" format reads it back


def _run(args, timeout=1200):
    proc = subprocess.run(
        [sys.executable, "-m", "lm_align.cli", *args],
        env=env_with_devices(1), capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_rest_em_quick_runs_and_resumes(tmp_path):
    workdir = tmp_path / "rest"
    args = [
        "rest-em", "--config", os.path.join(REPO, "experiments", "rest_em_arithmetic.py:quick"),
        "--workdir", str(workdir), "--config.train.progress=false",
        "--config.train.tensorboard=false",
    ]  # fmt: skip
    _run(args)
    rows = json.loads((workdir / "results.json").read_text())
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for i in (1, 2):
        kept = [json.loads(x) for x in (workdir / f"iter_{i}" / "kept.jsonl").open()]
        assert kept and len(kept) == rows[i]["kept"]
        assert all(arithmetic_exact(k["prompt"], k["completion"]) == 1.0 for k in kept)
    # An interrupted run (iteration 2 evaluated but not recorded) continues there.
    os.remove(workdir / "iter_2" / "eval.json")
    os.remove(workdir / "results.json")
    again = _run(args)
    assert "E-step" not in again.stdout and "already finished" in again.stdout
    assert json.loads((workdir / "results.json").read_text()) == rows


@pytest.mark.slow
def test_bon_quick_reports_every_method(tmp_path):
    workdir = tmp_path / "bon"
    _run(
        [
            "bon", "--config", os.path.join(REPO, "experiments", "bon_arithmetic.py:quick"),
            "--workdir", str(workdir), "--config.train.progress=false",
            "--config.train.tensorboard=false",
        ]
    )  # fmt: skip
    rows = json.loads((workdir / "results.json").read_text())
    assert [r["method"] for r in rows] == [
        "start",
        "bon_rlb_p",
        "bon_rlb",
        "bon_aware_sft",
        "bon_imitation",
        "reinforce",
        "bon_sft",
    ]
    for r in rows:
        assert 0 <= r["pass@1"] <= r["pass@4"] <= 1
        # A binary verifier selects a correct sample whenever one of the 4 is.
        assert r["bon_selector"] == "verifier" and r["bon_likelihood@4"] <= r["bon@4"]
        assert {"carry", "no_carry", "op=+"} <= set(r["slices"])


def test_eval_cli_prints_the_report(tmp_path):
    from lm_align import config as config_lib
    from lm_align.train import train

    cfg = config_lib.load_config(os.path.join(REPO, "experiments", "default.py"))
    cfg = config_lib.apply_overrides(
        cfg,
        [
            "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
            "train.steps=2", "train.batch_size=8", "train.answer_eval_examples=0",
            "optimizer.warmup_steps=1",
            "train.progress=false", "train.tensorboard=false", "train.eval_batches=1",
        ],
    )  # fmt: skip
    train(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
    out = tmp_path / "report.json"
    proc = _run(
        [
            "eval", "--policy", str(tmp_path / "run"), "--reference", str(tmp_path / "run"),
            "--num-prompts", "8", "--num-samples", "4", "--ks", "1,4", "--json",
            "--out", str(out), "--distinct",
        ],
        timeout=600,
    )  # fmt: skip
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    for key in ("greedy_accuracy", "pass@1", "pass@4", "bon@4", "bon_likelihood@4", "ece"):
        assert key in report
    assert abs(report["kl"]) < 1e-4 and report["mean_length"] > 0
    assert report["bon_selector"] == "verifier" and report["num_prompts"] == 8
    # Arithmetic: per-slice accuracy; each of the 8 distinct problems is in one op slice.
    assert report["slices"]["op=+"]["count"] == 8
    assert report["slices"]["carry"]["count"] + report["slices"]["no_carry"]["count"] == 8


def test_plot_lines_of_a_non_lr_sweep(tmp_path):
    from lm_align.sweeps.plots import plot_lines

    runs = [(64, 400, 0.1), (32, 400, 0.0), (64, 1200, 0.3), (32, 1200, None), (32, 2000, math.nan)]
    rows = [
        {"model.d_model": d, "train.steps": s, "answer_exact_match": acc} for (d, s, acc) in runs
    ]
    path, points = plot_lines(
        rows, str(tmp_path), x="model.d_model", group="train.steps", metric="answer_exact_match"
    )
    assert os.path.exists(path) and path.endswith("answer_exact_match_vs_d_model.png")
    # (compare, group, x, metric); the None and NaN rows are left out
    assert points == [(None, 400, 32, 0.0), (None, 400, 64, 0.1), (None, 1200, 64, 0.3)]
    # A compare key splits the lines: its value leads each point, sorted on it first.
    _, points = plot_lines(
        rows, str(tmp_path), x="train.steps", group=None, compare="model.d_model",
        metric="answer_exact_match",
    )  # fmt: skip
    assert points == [(32, None, 400, 0.0), (64, None, 400, 0.1), (64, None, 1200, 0.3)]
    with pytest.raises(ValueError, match="no finished run"):
        plot_lines(rows, str(tmp_path), x="model.d_model", group=None, metric="eval_loss")
