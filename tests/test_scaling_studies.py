"""The scaling studies of docs/scaling.md: proxy_scaling.py and adam_eps.py.

Their full sweeps are hours of CPU; here every run of them is planned (each
config valid) and the quick variants run end to end through `lm-align sweep`
and `lm-align plot`, checking the numbers the figures are drawn from.

    lm-align sweep --config experiments/proxy_scaling.py:quick --workdir DIR
    lm-align plot  --sweep DIR --group params_non_embedding --predict N
    lm-align sweep --config experiments/transfer.py:mup,quick --workdir DIR \
        --config.optimizer.name=muon
    lm-align sweep --config experiments/adam_eps.py:quick --workdir DIR
    lm-align plot  --sweep DIR --lines --x optimizer.eps --group model.d_model \
        --compare param.per_layer_eps
"""

import json
import math
import os

import pytest

from lm_align import cli
from lm_align.sweeps.runner import plan_sweep
from lm_align.sweeps.summary import load_summary
from tests.helpers import REPO, lm_align_command

PROXY = os.path.join(REPO, "experiments", "proxy_scaling.py")
ADAM_EPS = os.path.join(REPO, "experiments", "adam_eps.py")
TRANSFER = os.path.join(REPO, "experiments", "transfer.py")


def _plot(capsys, *args) -> str:
    """`lm-align plot ARGS` in this process (the sweeps run as subprocesses); its stdout."""
    assert cli.main(list(args)) == 0
    return capsys.readouterr().out


def _non_embedding(d, layers):
    """Kaplan's N: per layer q, k, v, out (4 d^2) and the GeLU MLP's w_in, w_out (8 d^2)."""
    return layers * 12 * d * d


@pytest.mark.parametrize("study", ["qk_ln", "z_loss", "warmup", "decay"])
def test_proxy_scaling_sweeps_are_valid_and_end_with_the_largest_size(tmp_path, study):
    """56 runs each, smallest size first, so `--max-runs 42` stops before the largest
    (whose prediction docs/scaling.md states first)."""
    runs = plan_sweep(f"{PROXY}:{study}", str(tmp_path))
    assert len(runs) == 4 * 2 * 7
    sizes = [(r.overrides["model.d_model"], r.overrides["model.n_layers"]) for r in runs]
    assert sizes == sorted(sizes) and set(sizes[42:]) == {(128, 4)}
    arms = {tuple(sorted((k, v) for k, v in r.overrides.items() if not k.startswith(("model.d", "model.n", "optimizer.lr")))) for r in runs}  # fmt: skip
    assert len(arms) == 2  # the intervention's two arms, at every size and LR


def test_adam_eps_sweep_plans_every_width_epsilon_and_atan2(tmp_path):
    runs = plan_sweep(ADAM_EPS, str(tmp_path))
    assert len(runs) == 4 * 2 * 4 + 4
    atan2 = [r for r in runs if r.overrides.get("optimizer.name") == "adam_atan2"]
    assert sorted(r.overrides["model.d_model"] for r in atan2) == [32, 64, 128, 256]


def test_quick_proxy_scaling_study_draws_its_figures_and_counts_parameters(tmp_path, capsys):
    lm_align_command("sweep", "--config", f"{PROXY}:quick", "--workdir", str(tmp_path))
    rows = load_summary(str(tmp_path))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"finished"}
    for r in rows:
        d, layers = r["model.d_model"], r["model.n_layers"]
        assert r["params_non_embedding"] == _non_embedding(d, layers)
        assert math.isfinite(r["log_z_final"]) and math.isfinite(r["output_logit_mean_final"])
    out = _plot(
        capsys, "plot", "--sweep", str(tmp_path), "--x", "optimizer.lr",
        "--group", "params_non_embedding", "--predict", "1000000",
    )  # fmt: skip
    assert "fewer than 3 groups below it" in out  # two sizes: nothing to extrapolate from
    for name in ("loss_vs_lr.png", "max_attn_logit_vs_lr.png", "lr_sensitivity.csv"):
        assert os.path.getsize(tmp_path / name) > 0
    out = _plot(
        capsys, "plot", "--sweep", str(tmp_path), "--lines", "--x", "optimizer.lr",
        "--group", "params_non_embedding", "--compare", "model.qk_layernorm",
        "--metric", "log_z_final",
    )  # fmt: skip
    assert os.path.getsize(tmp_path / "log_z_final_vs_lr.png") > 0
    assert (
        len([line for line in out.splitlines() if line.strip().startswith(("True", "False"))]) == 4
    )


def test_quick_adam_eps_study_scales_epsilon_only_away_from_the_base_width(tmp_path, capsys):
    """At the base width per-layer epsilon IS the fixed one (the same run, bit for bit);
    one width up, with eps 1e-4 about the size of the gradients, it is not."""
    lm_align_command("sweep", "--config", f"{ADAM_EPS}:quick", "--workdir", str(tmp_path))
    rows = load_summary(str(tmp_path))
    assert len(rows) == 5 and {r["status"] for r in rows} == {"finished"}
    loss = {
        (r["model.d_model"], r.get("param.per_layer_eps"), r.get("optimizer.name")): r["eval_loss"]
        for r in rows
    }
    assert loss[(16, True, None)] == loss[(16, False, None)]
    assert loss[(32, True, None)] != loss[(32, False, None)]
    assert math.isfinite(loss[(32, None, "adam_atan2")])
    _plot(
        capsys, "plot", "--sweep", str(tmp_path), "--lines", "--x", "optimizer.eps",
        "--group", "model.d_model", "--compare", "param.per_layer_eps",
    )  # fmt: skip
    assert os.path.getsize(tmp_path / "eval_loss_vs_eps.png") > 0


@pytest.mark.parametrize("variant", ["ntk", "mfp"])
def test_transfer_sweeps_of_ntk_and_mfp_are_valid(tmp_path, variant):
    runs = plan_sweep(f"{TRANSFER}:{variant}", str(tmp_path))
    assert len(runs) == 3 * 8


def test_transfer_extend_appends_higher_lrs_after_the_grid(tmp_path):
    """`extend=1` keeps the grid's 24 runs (same names) and adds LR 0.256 per width after
    them, so a finished sweep's directory runs only the three new ones."""
    grid = plan_sweep(f"{TRANSFER}:mup", str(tmp_path))
    extended = plan_sweep(f"{TRANSFER}:mup,extend=1", str(tmp_path))
    assert [r.name for r in extended[:24]] == [r.name for r in grid]
    assert [(r.overrides["model.d_model"], r.overrides["optimizer.lr"]) for r in extended[24:]] == [
        (32, 0.256),
        (64, 0.256),
        (128, 0.256),
    ]


def test_quick_muon_transfer_sweep_trains_with_muon_and_draws_its_figure(tmp_path, capsys):
    """The Muon-vs-AdamW transfer study is `transfer.py:mup` with the optimizer overridden."""
    lm_align_command(
        "sweep", "--config", f"{TRANSFER}:mup,quick", "--workdir", str(tmp_path),
        "--config.optimizer.name=muon",
    )  # fmt: skip
    rows = load_summary(str(tmp_path))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"}
    for r in rows:
        with open(os.path.join(tmp_path, r["name"], "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        assert cfg["optimizer"]["name"] == "muon" and cfg["param"]["name"] == "mup"
        assert r["init_loss"] > r["eval_loss"]  # it learns at both widths
    out = _plot(capsys, "plot", "--sweep", str(tmp_path), "--x", "optimizer.lr")
    assert "optimal-LR shift across d_model" in out
    assert os.path.getsize(tmp_path / "loss_vs_lr.png") > 0
