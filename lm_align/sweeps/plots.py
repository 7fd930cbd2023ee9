"""Figures of a sweep: loss vs LR (one curve per width) and max attention logit vs LR.

Drawn with matplotlib's Agg canvas (no display, no pyplot state), in the
style of the small-scale-proxies paper (Wortsman et al. 2023, figure 1):
log-scale LR axis, one colour per group (e.g. `model.d_model`), solid vs
dashed lines per compare value (e.g. `model.qk_layernorm`), a star at each
curve's optimum, and diverged runs drawn as x at the curve's loss at
initialisation. Next to each PNG the same numbers go to CSV.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lm_align.sweeps import analysis
from lm_align.sweeps.fit import power_law
from lm_align.sweeps.summary import write_csv

LINESTYLES = ("-", "--", ":", "-.")
LOSS_PNG = "loss_vs_lr.png"
ATTN_PNG = "max_attn_logit_vs_lr.png"
POINTS_CSV = "points.csv"
OPTIMAL_CSV = "optimal_lr.csv"
SENSITIVITY_CSV = "lr_sensitivity.csv"


def short(key: str | None) -> str:
    return key.rsplit(".", 1)[-1] if key else ""


def _value(value: Any) -> str:
    """A group or compare value for a label: floats in %g (1.2e+04, 0.003, 128)."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _label(key: str | None, value: Any) -> str:
    return f"{short(key)}={_value(value)}" if key else "all runs"


def _figure(ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0 * ncols, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _styles(points: Sequence[Mapping[str, Any]]):
    """Colour per group value, line style per compare value."""
    from matplotlib import colormaps

    groups = sorted({p["group"] for p in points}, key=analysis.sort_key)
    compares = sorted({p["compare"] for p in points}, key=analysis.sort_key)
    if all(isinstance(c, bool) for c in compares):
        compares.reverse()  # True (e.g. with qk-layernorm) solid, False dashed
    cmap = colormaps["viridis"]
    colors = {
        g: (cmap(i / max(len(groups) - 1, 1) * 0.85) if len(groups) > 1 else "C0")
        for i, g in enumerate(groups)
    }
    styles = {c: LINESTYLES[i % len(LINESTYLES)] for i, c in enumerate(compares)}
    return colors, styles


def _curves(points):
    curves: dict[tuple, list] = {}
    for p in points:
        curves.setdefault((p["compare"], p["group"]), []).append(p)
    return curves


def plot_loss_vs_lr(
    points: Sequence[Mapping[str, Any]],
    sensitivity: Sequence[Mapping[str, Any]],
    path: str,
    *,
    x: str,
    group: str | None,
    compare: str | None,
    metric: str,
    title: str = "",
) -> None:
    """Final `metric` vs LR per curve; with groups, also LR sensitivity vs group.

    Curves are labelled with their LR sensitivity. A diverged run is an x at
    its curve's init loss (the value `lr_sensitivity` counts it as); the
    star marks the lowest finite loss.
    """
    from matplotlib.lines import Line2D

    with_panel = group is not None
    fig, axes = _figure(2 if with_panel else 1)
    ax = axes[0]
    colors, styles = _styles(points)
    sens = {(r["compare"], r["group"]): r["lr_sensitivity"] for r in sensitivity}
    for (cmp_value, group_value), curve in _curves(points).items():
        loss0 = analysis.group_init_loss(curve)
        xs = [p["x"] for p in curve]
        ys = [loss0 if p["diverged"] else p["loss"] for p in curve]
        color, style = colors[group_value], styles[cmp_value]
        parts = [_label(group, group_value)] if group else []
        parts += [_label(compare, cmp_value)] if compare else []
        s = sens.get((cmp_value, group_value), math.nan)
        label = ", ".join(parts or ["all runs"]) + (
            f" (LR sens. {s:.3f})" if math.isfinite(s) else ""
        )
        ax.plot(xs, ys, linestyle=style, color=color, marker="o", markersize=4, label=label)
        bad = [(a, b) for a, b, p in zip(xs, ys, curve) if p["diverged"] and math.isfinite(b)]
        if bad:
            ax.scatter(*zip(*bad), marker="x", s=60, color=color, zorder=3)
        best = analysis.optimal_lr(xs, [p["loss"] for p in curve])
        if best is not None:
            best_loss = min(p["loss"] for p in curve if math.isfinite(p["loss"]))
            ax.scatter([best], [best_loss], marker="*", s=220, color=color, edgecolor="k", zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel(f"{x} (log scale)")
    ax.set_ylabel(f"final {metric}")
    ax.grid(True, which="both", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], color="0.3", marker="*", linestyle="", markersize=12, label="optimum"),
        Line2D([], [], color="0.3", marker="x", linestyle="", label="diverged (at init loss)"),
    ]
    ax.legend(handles=handles, fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    if with_panel:
        _plot_sensitivity_panel(axes[1], sensitivity, group, compare, styles)
    fig.savefig(path, dpi=120)


def _power_law_or_none(xs, ys):
    """`sweeps.fit.power_law` of positive points (at least 3), else None."""
    pts = [(x, y) for x, y in zip(xs, ys) if x > 0 and y is not None and np.isfinite(y) and y > 0]
    if len(pts) < 3 or len({x for x, _ in pts}) < 2:
        return None
    return power_law(*zip(*pts))


def _plot_sensitivity_panel(ax, sensitivity, group, compare, styles) -> None:
    """LR sensitivity vs group value, one line per compare value; with a numeric
    group and 3+ positive points, the fitted power law (exponent, 95% CI) too."""
    values = sorted({r["group"] for r in sensitivity}, key=analysis.sort_key)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    position = {v: (float(v) if numeric else i) for i, v in enumerate(values)}
    by_compare: dict[Any, list] = {}
    for r in sensitivity:
        by_compare.setdefault(r["compare"], []).append(r)
    for cmp_value, rs in by_compare.items():
        rs = sorted(rs, key=lambda r: analysis.sort_key(r["group"]))
        label = _label(compare, cmp_value) if compare else "LR sensitivity"
        xs = [position[r["group"]] for r in rs]
        ys = [r["lr_sensitivity"] for r in rs]
        fit = _power_law_or_none(xs, ys) if numeric else None
        if fit is not None:
            lo, hi = fit.exponent_ci
            label += f" ~ {short(group)}^{fit.exponent:.2f} [{lo:.2f}, {hi:.2f}]"
            grid = np.geomspace(min(xs), max(xs), 50)
            ax.plot(grid, fit(grid), color="0.5", linewidth=1, linestyle=styles[cmp_value])
        ax.plot(xs, ys, linestyle="none" if fit else styles[cmp_value], color="k", marker="o", label=label)
    if numeric and all(v > 0 for v in values) and len(values) > 1:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks([position[v] for v in values], [_value(v) for v in values])
    ax.set_xlabel(group)
    ax.set_ylabel("LR sensitivity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_max_attn_logit_vs_lr(
    points: Sequence[Mapping[str, Any]],
    path: str,
    *,
    x: str,
    group: str | None,
    compare: str | None,
    title: str = "",
) -> None:
    """Max attention logit (over layers, last logged step) vs LR, log y.

    A diverged run's value is its last finite logged step, drawn as x.
    Non-positive or missing values are left out (the axis is logarithmic).
    """
    fig, (ax,) = _figure(1)
    colors, styles = _styles(points)
    for (cmp_value, group_value), curve in _curves(points).items():
        kept = [
            p
            for p in curve
            if math.isfinite(p["max_attn_logit_final"]) and p["max_attn_logit_final"] > 0
        ]
        if not kept:
            continue
        parts = [_label(group, group_value)] if group else []
        parts += [_label(compare, cmp_value)] if compare else []
        color = colors[group_value]
        ax.plot(
            [p["x"] for p in kept],
            [p["max_attn_logit_final"] for p in kept],
            linestyle=styles[cmp_value],
            color=color,
            marker="o",
            markersize=4,
            label=", ".join(parts or ["all runs"]),
        )
        bad = [(p["x"], p["max_attn_logit_final"]) for p in kept if p["diverged"]]
        if bad:
            ax.scatter(*zip(*bad), marker="x", s=60, color=color, zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"{x} (log scale)")
    ax.set_ylabel("max attention logit, final step (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=120)


@dataclasses.dataclass
class SweepReport:
    """What `plot_sweep` computed and wrote."""

    x: str
    group: str | None
    compare: str | None
    metric: str
    points: list[dict]
    transfer: list[dict]  # analysis.transfer_table
    sensitivity: list[dict]  # analysis.sensitivity_table
    shift: dict  # compare value -> lr_shift_in_grid_steps
    files: list[str]


def plot_sweep(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str,
    *,
    x: str = "optimizer.lr",
    group: str | None = None,
    compare: str | None = None,
    metric: str = "eval_loss",
    title: str = "",
) -> SweepReport:
    """Writes loss_vs_lr.png, max_attn_logit_vs_lr.png and the CSVs of `rows` to `out_dir`.

    points.csv: one line per grid point (`loss_plotted` is what the figure
    shows: the metric, or the init loss for a diverged run); optimal_lr.csv:
    `analysis.transfer_table`; lr_sensitivity.csv: `analysis.sensitivity_table`.
    """
    points = analysis.grid_points(rows, x, group, metric, compare)
    if not points:
        raise ValueError(
            "no finished or diverged runs to plot; wait for the sweep to finish some runs"
        )
    if not any(math.isfinite(p["x"]) for p in points):
        raise ValueError(f"no run has a numeric {x!r}; choose the LR key with --x")
    transfer = analysis.transfer_table(rows, x, group, metric, compare)
    sensitivity = analysis.sensitivity_table(rows, x, group, metric, compare)
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in (LOSS_PNG, ATTN_PNG)}
    plot_loss_vs_lr(
        points,
        sensitivity,
        paths[LOSS_PNG],
        x=x,
        group=group,
        compare=compare,
        metric=metric,
        title=title,
    )
    plot_max_attn_logit_vs_lr(
        points, paths[ATTN_PNG], x=x, group=group, compare=compare, title=title
    )
    csv_paths = _write_sweep_csvs(
        out_dir, points, transfer, sensitivity, x=x, group=group, compare=compare, metric=metric
    )
    files = [paths[LOSS_PNG], paths[ATTN_PNG], *csv_paths]
    shift = _shift_per_compare(transfer)
    return SweepReport(x, group, compare, metric, points, transfer, sensitivity, shift, files)


def _shift_per_compare(transfer: Sequence[Mapping[str, Any]]) -> dict:
    """compare value -> the optimal LR's shift across groups, in grid steps."""
    shift = {}
    for cmp_value in dict.fromkeys(r["compare"] for r in transfer):
        shift[cmp_value] = analysis.lr_shift_in_grid_steps(
            [r for r in transfer if r["compare"] == cmp_value]
        )
    return shift


def _renamed(r: Mapping[str, Any], group: str | None, compare: str | None) -> dict:
    """A table row with its "group"/"compare" values also under the keys they stand for."""
    out = dict(r)
    if compare:
        out[compare] = r["compare"]
    if group:
        out[group] = r["group"]
    return out


def _write_sweep_csvs(
    out_dir, points, transfer, sensitivity, *, x, group, compare, metric
) -> list[str]:
    """Writes points.csv, optimal_lr.csv and lr_sensitivity.csv; returns their paths."""
    key_columns = [k for k in (compare, group) if k]
    point_rows = []
    for p in points:
        loss0 = analysis.group_init_loss(
            [q for q in points if (q["compare"], q["group"]) == (p["compare"], p["group"])]
        )
        plotted = loss0 if p["diverged"] else p["loss"]
        point_rows.append(
            dict(
                _renamed(p, group, compare),
                **{x: p["x"], metric: p["loss"], "loss_plotted": plotted},
            )
        )
    csv_paths = [os.path.join(out_dir, n) for n in (POINTS_CSV, OPTIMAL_CSV, SENSITIVITY_CSV)]
    write_csv(
        csv_paths[0],
        point_rows,
        ["name", "status", *key_columns, x, metric, "loss_plotted", "diverged", "init_loss"]
        + ["max_attn_logit_final", "max_attn_logit_peak"],
    )
    write_csv(
        csv_paths[1],
        [_renamed(r, group, compare) for r in transfer],
        [*key_columns, "optimal_lr", "grid_index", "shift", "fitted_lr", "fitted_shift"]
        + ["best_loss", "runs", "nonfinite"],
    )
    write_csv(
        csv_paths[2],
        [_renamed(r, group, compare) for r in sensitivity],
        [*key_columns, "lr_sensitivity", "init_loss", "best_loss", "runs", "nonfinite"],
    )
    return csv_paths


def plot_lines(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str,
    *,
    x: str,
    group: str | None,
    metric: str,
    compare: str | None = None,
    title: str = "",
) -> tuple[str, list[tuple[Any, Any, Any, Any]]]:
    """`metric` against `x` (log scale), one colour per `group` value and one line style
    per `compare` value, no LR analysis.

    For sweeps that are not LR sweeps (e.g. model size x training length), or a
    quantity other than the loss against the LR (e.g. the final log Z). Returns
    (the PNG path, [(compare value, group value, x, metric)] sorted).
    """
    points = sorted(
        (
            (r.get(compare) if compare else None, r.get(group) if group else None, r[x], r[metric])
            for r in rows
            if r.get(x) is not None
            and r.get(metric) is not None
            and math.isfinite(analysis.as_float(r[metric]))
        ),
        key=lambda p: tuple(analysis.sort_key(v) for v in p),
    )
    if not points:
        raise ValueError(f"no finished run has both {x!r} and {metric!r} in the summary")
    dicts = [{"group": g, "compare": c} for c, g, _, _ in points]
    colors, styles = _styles(dicts)
    fig, (ax,) = _figure(1)
    for c, g in dict.fromkeys((c, g) for c, g, _, _ in points):
        xs = [p[2] for p in points if p[:2] == (c, g)]
        ys = [p[3] for p in points if p[:2] == (c, g)]
        parts = ([_label(group, g)] if group else []) + ([_label(compare, c)] if compare else [])
        ax.plot(xs, ys, marker="o", markersize=4, color=colors[g], linestyle=styles[c],
                label=", ".join(parts) or None)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(f"{x} (log scale)")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title, fontsize=10)
    if group or compare:
        ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{metric}_vs_{short(x)}.png")
    fig.savefig(path, dpi=120)
    return path, points
