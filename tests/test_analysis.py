"""Sweep analysis: LR sensitivity (Wortsman et al. 2023, arXiv:2309.14322, section 3; defined
in docs/sweeps.md), optimal LR transfer, the plot command."""

import csv
import math
import os
import subprocess
import sys

import pytest

from lm_align import cli
from lm_align.sweeps import analysis
from lm_align.sweeps.summary import write_summary
from tests.helpers import REPO


def test_lr_sensitivity_worked_example():
    # loss0 = 5.0. Grid losses, then min(loss, loss0) with non-finite -> loss0:
    #   4.0 -> 4.0,  3.0 -> 3.0,  nan -> 5.0,  inf -> 5.0,  6.0 -> 5.0,  None -> 5.0
    # loss* = 3.0; differences 1, 0, 2, 2, 2, 2; sum 9 over 6 LRs -> 1.5
    losses = [4.0, 3.0, float("nan"), float("inf"), 6.0, None]
    assert analysis.lr_sensitivity(losses, 5.0) == pytest.approx(1.5)


def test_lr_sensitivity_edges():
    assert analysis.lr_sensitivity([2.0, 2.0, 2.0], 5.0) == 0.0  # every LR equally good
    assert analysis.lr_sensitivity([float("nan")] * 3, 5.0) == 0.0  # nothing trains: all loss0
    # "nan" strings (as in metrics.jsonl) count as non-finite; order does not matter.
    assert analysis.lr_sensitivity(["nan", 1.0], 3.0) == analysis.lr_sensitivity([1.0, None], 3.0)
    assert analysis.lr_sensitivity(["nan", 1.0], 3.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="init_loss"):
        analysis.lr_sensitivity([1.0], float("nan"))
    with pytest.raises(ValueError, match="empty"):
        analysis.lr_sensitivity([], 1.0)


def test_optimal_lr_ignores_nonfinite():
    lrs = [1e-3, 3e-3, 1e-2, 3e-2]
    assert analysis.optimal_lr(lrs, [3.0, 2.5, float("nan"), float("-inf")]) == 3e-3
    assert analysis.optimal_lr(lrs, [None, "inf", float("nan"), None]) is None
    assert analysis.optimal_lr(lrs, [2.0, 2.0, 3.0, 3.0]) == 1e-3  # ties: the first


def _row(lr, width, loss, *, qk=None, status="finished", init=5.5, attn=3.0):
    row = {
        "name": f"lr={lr}_d={width}_qk={qk}",
        "status": status,
        "optimizer.lr": lr,
        "model.d_model": width,
        "init_loss": init,
        "eval_loss": None if status == "diverged" else loss,
        "max_attn_logit_final": attn,
        "max_attn_logit_peak": attn * 1.5,
    }
    if qk is not None:
        row["model.qk_layernorm"] = qk
    return row


LRS = [1e-3, 3e-3, 1e-2, 3e-2]
# Width 64: optimum at 1e-2 (grid index 2); width 256: optimum at 3e-3 (index 1),
# and 3e-2 diverges at width 256.
ROWS = [_row(lr, 64, loss) for lr, loss in zip(LRS, [3.0, 2.5, 2.2, 2.9])] + [
    _row(1e-3, 256, 2.6),
    _row(3e-3, 256, 2.1),
    _row(1e-2, 256, 2.4),
    _row(3e-2, 256, None, status="diverged"),
    _row(1e-1, 256, 1.0, status="failed"),  # not a grid point
]


def test_transfer_table_and_shift():
    table = analysis.transfer_table(ROWS, x="optimizer.lr", group="model.d_model")
    assert [(r["group"], r["optimal_lr"], r["grid_index"], r["shift"]) for r in table] == [
        (64, 1e-2, 2, 0),
        (256, 3e-3, 1, -1),
    ]
    assert table[1]["best_loss"] == 2.1 and table[1]["nonfinite"] == 1 and table[1]["runs"] == 4
    assert analysis.lr_shift_in_grid_steps(table) == 1


def test_sensitivity_table_counts_divergence_as_init_loss():
    table = analysis.sensitivity_table(ROWS, group="model.d_model")
    # width 64: min(loss, 5.5) = 3.0 2.5 2.2 2.9, best 2.2 -> (0.8 + 0.3 + 0 + 0.7) / 4 = 0.45
    # width 256: 2.6 2.1 2.4 5.5(diverged), best 2.1 -> (0.5 + 0 + 0.3 + 3.4) / 4 = 1.05
    assert [r["group"] for r in table] == [64, 256]
    assert table[0]["lr_sensitivity"] == pytest.approx(0.45)
    assert table[1]["lr_sensitivity"] == pytest.approx(1.05)


def test_infer_axes():
    keys = ["optimizer.lr", "model.d_model", "model.qk_layernorm", "train.steps"]
    rows = [dict(r, **{"train.steps": 100}) for r in _compare_rows()]
    assert analysis.infer_axes(rows, keys) == {
        "x": "optimizer.lr",
        "group": "model.d_model",
        "compare": "model.qk_layernorm",
    }


def _compare_rows():
    """Two widths x two qk_layernorm settings; without qk-LN the high LRs diverge."""
    rows = []
    for width, shift in ((64, 0.0), (128, -0.2)):
        for lr, with_ln, without_ln in zip(LRS, [3.0, 2.6, 2.4, 2.5], [3.0, 2.5, None, None]):
            rows.append(_row(lr, width, with_ln + shift, qk=True, init=5.5))
            status = "finished" if without_ln is not None else "diverged"
            loss = None if without_ln is None else without_ln + shift
            rows.append(_row(lr, width, loss, qk=False, status=status, init=5.5, attn=40.0))
    return rows


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_plot_command_writes_figures_and_the_right_optimum(tmp_path, capsys):
    """`lm-align plot` on a summary written by hand: known optimum per width and qk setting."""
    rows = [dict(r, index=i) for i, r in enumerate(_compare_rows())]
    write_summary(str(tmp_path), rows)
    out = tmp_path / "plots"

    assert cli.main(["plot", "--sweep", str(tmp_path), "--out", str(out)]) == 0

    printed = capsys.readouterr().out
    assert "x optimizer.lr, group model.d_model, compare model.qk_layernorm" in printed
    for name in ("loss_vs_lr.png", "max_attn_logit_vs_lr.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"  # a PNG file
        assert os.path.getsize(out / name) > 10_000
    optimal = _read_csv(out / "optimal_lr.csv")
    assert list(optimal[0])[:2] == ["model.qk_layernorm", "model.d_model"]
    got = {(r["model.qk_layernorm"], r["model.d_model"]): float(r["optimal_lr"]) for r in optimal}
    # qk-LN on: best at 1e-2 (2.4); off: best at 3e-3 (2.5), for both widths.
    assert got == {
        ("true", "64"): 1e-2,
        ("true", "128"): 1e-2,
        ("false", "64"): 3e-3,
        ("false", "128"): 3e-3,
    }
    sens = {
        (r["model.qk_layernorm"], r["model.d_model"]): float(r["lr_sensitivity"])
        for r in _read_csv(out / "lr_sensitivity.csv")
    }
    # qk off, width 64: 3.0 2.5 5.5 5.5, best 2.5 -> (0.5 + 0 + 3 + 3) / 4 = 1.625
    assert sens[("false", "64")] == pytest.approx(1.625)
    # qk on, width 64: 3.0 2.6 2.4 2.5, best 2.4 -> (0.6 + 0.2 + 0 + 0.1) / 4 = 0.225
    assert sens[("true", "64")] == pytest.approx(0.225)
    points = _read_csv(out / "points.csv")
    assert len(points) == 16
    diverged = [p for p in points if p["status"] == "diverged"]
    assert diverged and all(float(p["loss_plotted"]) == 5.5 for p in diverged)
    assert "optimal-LR shift across d_model (qk_layernorm=True): 0 grid steps" in printed


def test_plot_command_without_lr_key_is_an_error(tmp_path, capsys):
    write_summary(str(tmp_path), [{"name": "a", "index": 0, "status": "finished", "x.y": 1}])
    assert cli.main(["plot", "--sweep", str(tmp_path)]) == 2
    assert "--x" in capsys.readouterr().err
    assert cli.main(["plot", "--sweep", str(tmp_path / "missing")]) == 2
    assert "summary.jsonl does not exist" in capsys.readouterr().err


def test_analysis_imports_without_jax():
    code = (
        "import sys; import lm_align.sweeps.analysis, lm_align.sweeps; "
        "assert 'jax' not in sys.modules, 'jax imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_nan_is_not_a_grid_optimum():
    rows = [_row(1e-3, 64, float("nan")), _row(3e-3, 64, 4.0)]
    (entry,) = analysis.transfer_table(rows)
    assert entry["optimal_lr"] == 3e-3 and entry["nonfinite"] == 1
    assert math.isclose(analysis.sensitivity_table(rows)[0]["lr_sensitivity"], (5.5 - 4.0) / 2)


def test_fitted_optimal_lr_finds_the_vertex_between_grid_points():
    grid = [1e-3 * 2**k for k in range(8)]  # 0.001 ... 0.128
    # loss = 1 + (ln lr - ln 0.02)^2: the optimum 0.02 is not a grid point.
    losses = [1 + (math.log(lr) - math.log(0.02)) ** 2 for lr in grid]
    assert analysis.optimal_lr(grid, losses) == 0.016
    assert analysis.fitted_optimal_lr(grid, losses) == pytest.approx(0.02, rel=1e-9)
    assert analysis.grid_ratio(grid) == pytest.approx(2.0)
    # A diverged point is ignored; a monotone curve falls back to the argmin (an edge).
    losses[-1] = float("nan")
    assert analysis.fitted_optimal_lr(grid, losses) == pytest.approx(0.02, rel=1e-9)
    assert analysis.fitted_optimal_lr(grid, [10 - k for k in range(8)]) == 0.128


def test_transfer_table_fitted_shift_is_in_grid_steps():
    grid = [1e-3 * 2**k for k in range(8)]
    rows = []
    for width, opt in ((32, 0.02), (128, 0.005)):  # the optimum moves 2 grid steps down
        for lr in grid:
            loss = 1 + (math.log(lr) - math.log(opt)) ** 2
            rows.append(
                {
                    "status": "finished",
                    "optimizer.lr": lr,
                    "model.d_model": width,
                    "eval_loss": loss,
                    "init_loss": 6.0,
                }
            )
    table = analysis.transfer_table(rows)
    assert [r["fitted_lr"] for r in table] == pytest.approx([0.02, 0.005])
    assert [r["fitted_shift"] for r in table] == pytest.approx([0.0, -2.0])
