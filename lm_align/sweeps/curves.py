"""Training curves of a sweep: a metric against step, one line per run.

`lm-align plot --sweep DIR --curves` draws, for sweeps whose runs differ in
how they train rather than along one LR axis (LR schedules of several lengths:
experiments/wsd.py), each finished run's `--metric` (default `eval_loss`)
from its metrics.jsonl against the step, next to its learning rate. One
colour per `--group` value (e.g. `train.steps`), one line style per value of
the other varying override keys (e.g. `optimizer.schedule` with
`optimizer.cooldown`). It also tabulates every run's metric at the steps
where runs end, so that a run can be read against another at the same step
(a cosine run of 500 steps against the constant-LR run at step 500):

    rows = summary.load_summary("runs/wsd")
    png, table = plot_curves("runs/wsd", rows, "runs/wsd", group="train.steps",
                             override_keys=["optimizer.schedule", "train.steps", "optimizer.cooldown"])
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from lm_align.sweeps import analysis, summary
from lm_align.sweeps.plots import LINESTYLES, _figure, short
from lm_align.sweeps.summary import write_csv

CURVES_CSV = "curves.csv"


def read_curve(run_dir: str, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric` in a run's metrics.jsonl, rows without it left out."""
    steps, values = [], []
    for row in summary.read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        if row.get(metric) is not None and "step" in row:
            steps.append(int(row["step"]))
            values.append(analysis.as_float(row[metric]))
    return steps, values


def _label(keys: Sequence[str], values: Sequence[Any]) -> str:
    parts = [f"{short(k)}={v}" for k, v in zip(keys, values) if v is not None]
    return " ".join(parts) or "run"


def _ylim(curves: Sequence[tuple[list[int], list[float]]]) -> tuple[float, float] | None:
    """The metric's range after the first 10% of the longest run (the early drop hides the end)."""
    last = max((s[-1] for s, _ in curves if s), default=0)
    late = [v for s, vs in curves for t, v in zip(s, vs) if t >= 0.1 * last and math.isfinite(v)]
    if not late:
        return None
    lo, hi = min(late), max(late)
    pad = 0.05 * (hi - lo or abs(hi) or 1.0)
    return lo - pad, hi + pad


def plot_curves(
    sweep_dir: str,
    rows: Sequence[Mapping[str, Any]],
    out_dir: str,
    *,
    override_keys: Sequence[str],
    metric: str = "eval_loss",
    group: str | None = None,
    title: str = "",
) -> tuple[str, list[dict[str, Any]]]:
    """Draws `metric` and the LR against step for every finished run of a sweep.

    Args:
      sweep_dir: the sweep's --workdir (one subdirectory per run, by `name`).
      rows: its summary rows (`summary.load_summary`).
      out_dir: where `{metric}_vs_step.png` and curves.csv go.
      override_keys: the sweep's override keys; every key but `group` that
        varies sets the line style.
      metric: the metrics.jsonl column to draw (its LR panel is `lr`).
      group: the key whose value sets the colour (None: one colour).
      title: the figure's title.

    Returns:
      (the PNG path, one dict per run: name, its override values and
      `metric` at each step where some run ends, None where it has none).

    Raises:
      ValueError: when no finished run logged `metric`.
    """
    finished = [r for r in rows if r.get("status") == "finished"]
    style_keys = [
        k for k in override_keys
        if k != group and len({repr(r.get(k)) for r in finished}) > 1
    ]  # fmt: skip
    runs = []
    for r in sorted(finished, key=lambda r: analysis.sort_key(r.get(group))):
        run_dir = os.path.join(sweep_dir, r["name"])
        curve = read_curve(run_dir, metric)
        if curve[0]:
            compare = _label(style_keys, [r.get(k) for k in style_keys])
            runs.append((r, compare, curve, read_curve(run_dir, "lr")))
    if not runs:
        raise ValueError(f"no finished run of {sweep_dir} logged {metric!r} in its metrics.jsonl")
    png = _draw(runs, group, metric, title, out_dir)

    ends = sorted({steps[-1] for _, _, (steps, _), _ in runs})
    table = []
    for r, compare, (steps, values), _ in runs:
        at = dict(zip(steps, values))
        row = {"name": r["name"], **{k: r.get(k) for k in override_keys}}
        row.update({f"{metric}@{t}": at.get(t) for t in ends})
        table.append(row)
    write_csv(os.path.join(out_dir, CURVES_CSV), table, list(table[0]))
    return png, table


def _draw(runs, group: str | None, metric: str, title: str, out_dir: str) -> str:
    """The two panels (metric, LR) of `plot_curves`; returns the PNG path."""
    groups = list(dict.fromkeys(r.get(group) for r, _, _, _ in runs))  # in sort order
    colors = {g: f"C{i % 10}" for i, g in enumerate(groups)}  # qualitative: lengths, not a scale
    compares = sorted({c for _, c, _, _ in runs})
    styles = {c: LINESTYLES[i % len(LINESTYLES)] for i, c in enumerate(compares)}

    fig, (ax, ax_lr) = _figure(2)
    for r, compare, (steps, values), (lr_steps, lrs) in runs:
        kw = {"color": colors[r.get(group)], "linestyle": styles[compare], "linewidth": 1.4}
        name = f"{short(group)}={r.get(group)} {compare}" if group else compare
        ax.plot(steps, values, label=name, **kw)
        ax.plot(steps[-1:], values[-1:], "o", color=kw["color"], markersize=4)  # where it ends
        ax_lr.plot(lr_steps, lrs, **kw)
    limits = _ylim([c for _, _, c, _ in runs])
    if limits:
        ax.set_ylim(*limits)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    for a in (ax, ax_lr):
        a.grid(alpha=0.3)
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, f"{metric}_vs_step.png")
    fig.savefig(png, dpi=120)
    return png
