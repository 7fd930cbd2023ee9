"""Predicting a larger model's LR sensitivity and attention-logit crossing LR from smaller
ones (`plot --predict`), power-law prediction intervals, and the new summary columns.
Every expected number is worked out by hand or from a closed form."""

import json
import math

import numpy as np
import pytest

from lm_align import cli
from lm_align.sweeps import analysis
from lm_align.sweeps.fit import power_law
from lm_align.sweeps.summary import run_metrics, write_summary


def test_crossing_lr_worked_example():
    # Between (1e-2, 100) and (1e-1, 1e4): log10 value goes 2 -> 4 while log10 LR goes
    # -2 -> -1, so log10 value 3 is reached halfway, at LR 10**-1.5.
    lrs, values = [1e-3, 1e-2, 1e-1], [10.0, 100.0, 1e4]
    assert analysis.crossing_lr(lrs, values, 1e3) == pytest.approx(10**-1.5, rel=1e-12)
    assert analysis.crossing_lr(lrs[::-1], values[::-1], 1e3) == pytest.approx(10**-1.5, rel=1e-12)
    assert analysis.crossing_lr(lrs, values, 1e5) is None  # never reached
    assert analysis.crossing_lr(lrs, values, 5.0) is None  # the lowest LR already reaches it
    # Skipped: NaN (would make the answer NaN), 0 and -5 (log of them fails), inf (would
    # count as the crossing at 7e-2 and put it at 1e-2).
    lrs += [2e-2, 3e-2, 5e-2, 7e-2]
    values += [-5.0, "nan", 0.0, float("inf")]
    assert analysis.crossing_lr(lrs, values, 1e3) == pytest.approx(10**-1.5, rel=1e-12)


def test_predict_ci_of_an_exact_power_law_is_the_curve():
    x = np.geomspace(1e4, 1e6, 5)
    fit = power_law(x, 3.0 * x**-0.5)
    truth = 3.0 * 1e8**-0.5  # 3e-4, two decades past the data
    assert float(fit(1e8)) == pytest.approx(truth, rel=1e-9)
    lo, hi = fit.predict_ci(1e8)  # every resample gives the same line: a zero-width interval
    assert lo == pytest.approx(truth, rel=1e-9) and hi == pytest.approx(truth, rel=1e-9)


def test_predict_ci_covers_the_truth_and_widens_with_distance():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e3, 1e5, 40)
    y = 2.0 * x**-0.3 * np.exp(0.1 * rng.standard_normal(x.size))  # 10% lognormal noise
    fit = power_law(x, y)
    widths = []
    for at in (1e6, 1e8):
        lo, hi = fit.predict_ci(at)
        assert lo < 2.0 * at**-0.3 < hi
        widths.append(math.log(hi / lo))  # relative width: y itself shrinks with x
    assert widths[1] > 1.5 * widths[0] > 0


GROUPS = (10_000, 100_000, 1_000_000, 10_000_000)  # e.g. non-embedding parameters
LRS = [10 ** (e + 0.1) for e in np.linspace(-4, 0, 9)]  # half-decade grid, off the crossings
PREFACTOR = {True: 0.1, False: 0.03}  # crossing LR at the smallest group, per compare value


def lr_c(g, qk):
    """The LR where the max attention logit reaches 1e4: 0.1 * (g / 1e4)^-0.5 (qk on)."""
    return PREFACTOR[qk] * (g / 1e4) ** -0.5


def sensitivity(g):
    return 0.5 * (g / 1e4) ** -0.25


def _rows():
    """Summary rows whose crossing LR (threshold 1e4) is lr_c exactly: the logit is
    (lr / lr_c)^2 * 1e4, a straight line in log-log, so interpolation is exact. The loss is
    2.0 at one LR and 2.0 + 9/8 s at the 8 others (init 5.0): LR sensitivity 8 * (9/8 s) / 9 = s."""
    rows = []
    for qk in (True, False):
        for g in GROUPS:
            for i, lr in enumerate(LRS):
                rows.append({
                    "name": f"run{len(rows)}", "index": len(rows), "status": "finished",
                    "optimizer.lr": lr, "params": g, "model.qk_layernorm": qk,
                    "init_loss": 5.0, "eval_loss": 2.0 if i == 4 else 2.0 + 9 / 8 * sensitivity(g),
                    "max_attn_logit_final": (lr / lr_c(g, qk)) ** 2 * 1e4,
                })  # fmt: skip
    return rows


def test_prediction_table_extrapolates_exact_power_laws():
    kw = {"group": "params", "metric": "eval_loss", "compare": "model.qk_layernorm"}
    table = analysis.prediction_table(_rows(), 1e7, threshold=1e4, **kw)
    by = {(r["compare"], r["quantity"]): r for r in table}
    assert set(by) == {(c, q) for c in (True, False) for q in ("lr_sensitivity", "lr_at_attn_logit_10000")}  # fmt: skip
    for qk in (True, False):
        r = by[(qk, "lr_at_attn_logit_10000")]
        assert r["groups"] == [1e4, 1e5, 1e6]
        assert r["fit"].exponent == pytest.approx(-0.5, rel=1e-6)
        truth = PREFACTOR[qk] * 10**-1.5  # lr_c(1e7)
        assert r["predicted"] == pytest.approx(truth, rel=1e-6)
        assert r["measured"] == pytest.approx(truth, rel=1e-6)
        assert abs(r["error"]) < 1e-6
        lo, hi = r["predicted_ci"]
        assert lo == pytest.approx(truth, rel=1e-6) and hi == pytest.approx(truth, rel=1e-6)
        r = by[(qk, "lr_sensitivity")]
        assert r["fit"].exponent == pytest.approx(-0.25, rel=1e-6)
        assert r["predicted"] == pytest.approx(0.5 * 1e3**-0.25, rel=1e-6)
        assert r["measured"] == pytest.approx(0.5 * 1e3**-0.25, rel=1e-6)
    # At 1e6 only two groups lie below: no fit, but the measured value is still there.
    table = analysis.prediction_table(_rows(), 1e6, threshold=1e4, **kw)
    r = next(r for r in table if r["compare"] is True and r["quantity"].startswith("lr_at"))
    assert r["fit"] is None and r["predicted"] is None and r["predicted_ci"] is None
    assert r["groups"] == [1e4, 1e5] and r["error"] is None
    assert r["measured"] == pytest.approx(0.1 * 10**-1.0, rel=1e-6)


def test_run_metrics_log_z_and_non_embedding_params(tmp_path):
    rows = [
        {"step": 1, "loss": 5.6, "log_z_mean": 0.2, "output_logit_mean": -0.1},
        {"step": 10, "loss": 3.0, "log_z_mean": 1.5, "output_logit_mean": -2.25},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = run_metrics(str(tmp_path))
    assert m["log_z_final"] == 1.5 and m["output_logit_mean_final"] == -2.25  # the last row
    assert m["params_non_embedding"] is None  # no config.json yet
    model = {"vocab_size": 259, "d_model": 64, "n_layers": 3, "n_heads": 4, "d_ff": 256}
    (tmp_path / "config.json").write_text(json.dumps({"model": model, "train": {"steps": 10}}))
    # Per layer: q, k, v, out 4 d^2 + MLP d -> 4d -> d 8 d^2 = 12 * 64^2 = 49152; 3 layers:
    # 147456. Embeddings, readout and the layernorm scales do not count (Kaplan's N).
    assert run_metrics(str(tmp_path))["params_non_embedding"] == 147_456
    # qk-layernorm adds only norm scales and the vocabulary only embeddings: the same N.
    model.update(vocab_size=1000, qk_layernorm=True)
    (tmp_path / "config.json").write_text(json.dumps({"model": model}))
    assert run_metrics(str(tmp_path))["params_non_embedding"] == 147_456
    # SwiGLU: three d x d_ff matrices: 3 * (4 * 64^2 + 3 * 64 * 256) = 196608.
    model.update(activation="swiglu")
    (tmp_path / "config.json").write_text(json.dumps({"model": model}))
    assert run_metrics(str(tmp_path))["params_non_embedding"] == 196_608


def test_plot_command_predict(tmp_path, capsys):
    write_summary(str(tmp_path), _rows())
    args = ["plot", "--sweep", str(tmp_path), "--out", str(tmp_path / "plots"), "--predict", "1e7"]
    assert cli.main(args + ["--group", "params"]) == 0
    out = capsys.readouterr().out
    assert "prediction at params=1e+07 from the smaller groups" in out
    # lr_c(1e7) with qk on: 0.1 * 10^-1.5 = 0.0031623 (printed to 4 significant digits).
    line = next(s for s in out.splitlines() if "lr_at_attn_logit_10000 (qk_layernorm=True)" in s)
    assert "predicted 0.003162 " in line and "measured 0.003162" in line
    assert cli.main(args + ["--group", "none"]) == 2
    assert "--predict needs a numeric --group" in capsys.readouterr().err
