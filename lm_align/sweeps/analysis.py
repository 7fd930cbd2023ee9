"""Sweep analysis: LR sensitivity, the optimal LR and how it moves across widths.

numpy only (no jax), so it runs anywhere a sweep's summary.jsonl is.

`rows` below are summary rows (`lm_align.sweeps.load_summary(workdir)`, or
plain dicts with the same keys): each has the swept keys (`optimizer.lr`,
`model.d_model`, ...), the metric (`eval_loss`), `init_loss` and `status`.
Only rows with status `finished` or `diverged` (or no status) are grid
points; a diverged run's loss counts as non-finite whatever its columns say.

References:
  Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
  training instabilities" (arXiv 2309.14322): LR sensitivity, section 3.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # peak LRs of the paper's sweeps
GRID_STATUSES = ("finished", "diverged")


def as_float(value: Any) -> float:
    """`value` as a float; None and unparsable values are NaN ("nan"/"inf" strings parse)."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def lr_sensitivity(final_losses: Iterable[Any], init_loss: float) -> float:
    """LR sensitivity of one sweep over a grid of learning rates.

        sensitivity = mean over eta in the grid of [ min(loss(eta), loss0) - loss* ]

    where `loss0 = init_loss` (the loss at initialisation), a non-finite or
    None `loss(eta)` counts as `loss0`, and `loss* = min over eta of
    min(loss(eta), loss0)` (the best loss of the grid after clipping). It is 0
    when every LR reaches the same loss and grows as fewer LRs train well; a
    grid where nothing trains scores 0 as well (every entry clips to loss0),
    so read it next to the best loss.

    Args:
      final_losses: the final loss of each LR of the grid (any order).
      init_loss: loss0, finite.

    Raises ValueError for an empty grid or a non-finite `init_loss`.

    Examples:
        >>> lr_sensitivity([4.0, 3.0, float("nan"), None], init_loss=5.0)  # (1 + 0 + 2 + 2) / 4
        1.25
    """
    loss0 = as_float(init_loss)
    if not math.isfinite(loss0):
        raise ValueError(f"init_loss={init_loss!r} must be finite (the loss at initialisation)")
    losses = np.array([as_float(v) for v in final_losses], dtype=np.float64)
    if losses.size == 0:
        raise ValueError("final_losses is empty; pass the final loss of every LR of the grid")
    clipped = np.minimum(np.where(np.isfinite(losses), losses, loss0), loss0)
    return float(np.mean(clipped - clipped.min()))


def optimal_lr(lrs: Sequence[Any], losses: Sequence[Any]) -> float | None:
    """The LR of the lowest finite loss (the first, on ties); None if no loss is finite.

    Examples:
        >>> optimal_lr([1e-3, 3e-3, 1e-2], [2.5, 2.2, float("nan")])
        0.003
    """
    if len(lrs) != len(losses):
        raise ValueError(f"{len(lrs)} LRs but {len(losses)} losses")
    values = np.array([as_float(v) for v in losses], dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return None
    return as_float(lrs[int(np.argmin(np.where(finite, values, np.inf)))])


def fitted_optimal_lr(lrs: Sequence[Any], losses: Sequence[Any], points: int = 5) -> float | None:
    """The vertex of a parabola in log(LR) through the `points` grid points nearest the argmin.

    On a fine grid the loss near the optimum is flat to within run-to-run
    noise, so the argmin can jump between neighbours whose losses differ by a
    few thousandths; the fitted vertex uses the shape of the whole basin.
    Falls back to the argmin when fewer than 3 finite points surround it or the
    parabola is not convex, and never leaves the range of the points used.
    """
    best = optimal_lr(lrs, losses)
    if best is None:
        return None
    pairs = sorted(
        (as_float(x), as_float(y))
        for x, y in zip(lrs, losses)
        if as_float(x) > 0 and math.isfinite(as_float(y))
    )
    xs = np.log([x for x, _ in pairs])
    ys = np.array([y for _, y in pairs])
    i = int(np.argmin(ys))
    lo = max(0, min(i - points // 2, len(xs) - points))
    xs, ys = xs[lo : lo + points], ys[lo : lo + points]
    if len(xs) < 3:
        return best
    a, b, _ = np.polyfit(xs, ys, 2)
    if a <= 0:
        return best
    return float(np.exp(np.clip(-b / (2 * a), xs.min(), xs.max())))


def crossing_lr(lrs: Sequence[Any], values: Sequence[Any], threshold: float) -> float | None:
    """The LR at which `values` (e.g. the max attention logit) first reaches `threshold`.

    Interpolated linearly in log LR and log value between the last grid point
    below the threshold and the first at or above it. None when no point
    reaches it, or the first (lowest-LR) point already does (the crossing is
    below the grid). Non-finite or non-positive values are skipped.

    Examples:
        >>> round(crossing_lr([1e-3, 1e-2, 1e-1], [10.0, 100.0, 1e4], 1000.0), 6)
        0.031623
    """
    pairs = sorted(
        (as_float(x), as_float(v))
        for x, v in zip(lrs, values)
        if as_float(x) > 0 and math.isfinite(as_float(v)) and as_float(v) > 0
    )
    for i, (x, v) in enumerate(pairs):
        if v >= threshold:
            if i == 0:
                return None
            (x0, v0), t = pairs[i - 1], math.log(threshold)
            frac = (t - math.log(v0)) / (math.log(v) - math.log(v0))
            return float(math.exp(math.log(x0) + frac * (math.log(x) - math.log(x0))))
    return None


def prediction_table(
    rows: Iterable[Mapping[str, Any]],
    at: float,
    *,
    x: str = "optimizer.lr",
    group: str = "model.d_model",
    metric: str = "eval_loss",
    compare: str | None = None,
    threshold: float = 1e4,
) -> list[dict]:
    """Predict the curve at group value `at` from the smaller groups (power laws).

    Per compare value, two trends of the numeric `group` (e.g. non-embedding
    parameters) are fitted on the groups below `at` with `sweeps.fit.power_law`
    and extrapolated to `at`: the LR sensitivity (`sensitivity_table`) and the
    LR at which the final max attention logit reaches `threshold`
    (`crossing_lr`). Returns one dict per (compare, quantity) with `compare`,
    `quantity`, `fit` (the PowerLawFit or None with fewer than 3 usable
    groups), `groups` (the groups fitted), `predicted`, `predicted_ci` (95%),
    `measured` (at the group within 1% of `at`, None if it has not run) and
    `error` (measured / predicted - 1).
    """
    from lm_align.sweeps.fit import power_law

    rows = list(rows)
    points = grid_points(rows, x, group, metric, compare)
    crossing = {
        key: crossing_lr([p["x"] for p in c], [p["max_attn_logit_final"] for p in c], threshold)
        for key, c in _curves(points).items()
    }
    sens = {
        (r["compare"], r["group"]): r["lr_sensitivity"]
        for r in sensitivity_table(rows, x, group, metric, compare)
    }
    out = []
    for quantity, values in (("lr_sensitivity", sens), (f"lr_at_attn_logit_{threshold:g}", crossing)):
        for cmp_value in dict.fromkeys(c for c, _ in values):
            known = {
                as_float(g): v
                for (c, g), v in values.items()
                if c == cmp_value and v is not None and math.isfinite(v) and v > 0
            }
            # Within 1% is the same size (a size key may count a few more parameters,
            # e.g. norm scales, in one arm than in the other).
            same = [v for g, v in known.items() if abs(math.log(g / at)) < 0.01]
            train = sorted((g, v) for g, v in known.items() if math.log(at / g) >= 0.01)
            fit = None
            if len(train) >= 3:
                fit = power_law([g for g, _ in train], [v for _, v in train])
            measured = same[0] if same else None
            predicted = float(fit(at)) if fit else None
            out.append(
                {
                    "compare": cmp_value,
                    "quantity": quantity,
                    "fit": fit,
                    "groups": [g for g, _ in train],
                    "predicted": predicted,
                    "predicted_ci": fit.predict_ci(at) if fit else None,
                    "measured": measured,
                    "error": measured / predicted - 1 if measured and predicted else None,
                }
            )
    return out


def grid_ratio(grid: Sequence[float]) -> float:
    """The median ratio between consecutive LRs of a (geometric) grid."""
    g = sorted(v for v in grid if v > 0)
    return float(np.median(np.array(g[1:]) / np.array(g[:-1]))) if len(g) > 1 else math.nan


def sort_key(value: Any):
    """Orders numbers numerically, then strings, then None."""
    if value is None:
        return (2, 0.0, "")
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def grid_points(
    rows: Iterable[Mapping[str, Any]],
    x: str = "optimizer.lr",
    group: str | None = "model.d_model",
    metric: str = "eval_loss",
    compare: str | None = None,
) -> list[dict]:
    """The grid points of `rows`, sorted by (compare, group, x).

    Each point: `name`, `status`, `x`, `group`, `compare` (the row's values of
    those keys; None where a key is None or absent), `loss` (the metric as a
    float, NaN when non-finite, missing or the run diverged), `diverged`
    (True when `loss` is NaN), `init_loss`, `max_attn_logit_final`,
    `max_attn_logit_peak`.
    """
    points = []
    for row in rows:
        status = row.get("status", "finished")
        if status not in GRID_STATUSES:
            continue
        loss = math.nan if status == "diverged" else as_float(row.get(metric))
        loss = loss if math.isfinite(loss) else math.nan
        points.append(
            {
                "name": row.get("name"),
                "status": status,
                "x": as_float(row.get(x)),
                "group": row.get(group) if group else None,
                "compare": row.get(compare) if compare else None,
                "loss": loss,
                "diverged": math.isnan(loss),
                "init_loss": as_float(row.get("init_loss")),
                "max_attn_logit_final": as_float(row.get("max_attn_logit_final")),
                "max_attn_logit_peak": as_float(row.get("max_attn_logit_peak")),
            }
        )
    points.sort(key=lambda p: (sort_key(p["compare"]), sort_key(p["group"]), p["x"]))
    return points


def _curves(points: Sequence[Mapping[str, Any]]) -> dict[tuple, list[Mapping[str, Any]]]:
    """(compare, group) -> its points in x order (the order of `grid_points`)."""
    curves: dict[tuple, list] = {}
    for p in points:
        curves.setdefault((p["compare"], p["group"]), []).append(p)
    return curves


def group_init_loss(points: Sequence[Mapping[str, Any]]) -> float:
    """loss0 of one curve: the median finite `init_loss` of its points (NaN if none).

    The loss at initialisation is measured before the first update, so it is
    the same for every LR of a curve; the median ignores runs that did not log it.
    """
    values = [p["init_loss"] for p in points if math.isfinite(p["init_loss"])]
    return float(np.median(values)) if values else math.nan


def transfer_table(
    rows: Iterable[Mapping[str, Any]],
    x: str = "optimizer.lr",
    group: str | None = "model.d_model",
    metric: str = "eval_loss",
    compare: str | None = None,
) -> list[dict]:
    """The optimal LR of each group (e.g. each width), per compare value.

    Returns one dict per (compare, group), in sorted order, with
    `compare`, `group`, `optimal_lr` (argmin of the finite `metric`; None if
    none is finite), `grid_index` (its position in the sorted LRs of the whole
    sweep), `shift` (`grid_index` minus that of the first group with the same
    compare value), `fitted_lr` (:func:`fitted_optimal_lr`), `fitted_shift`
    (log(fitted_lr / that of the first group) / log(grid ratio): the move in
    grid steps, a float), `best_loss`, `runs` (grid points) and `nonfinite`
    (how many of them diverged or have no finite metric).
    """
    points = grid_points(rows, x, group, metric, compare)
    grid = sorted({p["x"] for p in points if math.isfinite(p["x"])})
    table, first_index, first_fit = [], {}, {}
    ratio = grid_ratio(grid)
    for (cmp_value, group_value), curve in _curves(points).items():
        lr = optimal_lr([p["x"] for p in curve], [p["loss"] for p in curve])
        fit = fitted_optimal_lr([p["x"] for p in curve], [p["loss"] for p in curve])
        index = grid.index(lr) if lr is not None else None
        if index is not None:
            first_index.setdefault(cmp_value, index)
            first_fit.setdefault(cmp_value, fit)
        shift = None if index is None else index - first_index[cmp_value]
        fitted_shift = (
            None
            if fit is None or not math.isfinite(ratio)
            else math.log(fit / first_fit[cmp_value]) / math.log(ratio)
        )
        finite = [p["loss"] for p in curve if math.isfinite(p["loss"])]
        table.append(
            {
                "compare": cmp_value,
                "group": group_value,
                "optimal_lr": lr,
                "grid_index": index,
                "shift": shift,
                "fitted_lr": fit,
                "fitted_shift": fitted_shift,
                "best_loss": min(finite) if finite else None,
                "runs": len(curve),
                "nonfinite": len(curve) - len(finite),
            }
        )
    return table


def lr_shift_in_grid_steps(table: Sequence[Mapping[str, Any]]) -> int | None:
    """How far the optimal LR moves across groups: max - min of `grid_index`.

    Pass the rows of `transfer_table` for one compare value. 0 means every
    group has the same optimal LR; under a parameterization that transfers
    it stays within 1 (one grid step). None when no group has an optimum.
    """
    indices = [r["grid_index"] for r in table if r.get("grid_index") is not None]
    return max(indices) - min(indices) if indices else None


def sensitivity_table(
    rows: Iterable[Mapping[str, Any]],
    x: str = "optimizer.lr",
    group: str | None = "model.d_model",
    metric: str = "eval_loss",
    compare: str | None = None,
) -> list[dict]:
    """`lr_sensitivity` of each (compare, group) curve over its LRs.

    loss0 is the curve's `group_init_loss` (`init_loss` is the train loss at
    step 1, z-loss included; `eval_loss` has none, a difference of about
    `train.z_loss_coef * log_z_mean**2`). Returns one dict per curve with
    `compare`, `group`, `lr_sensitivity` (NaN when no run logged step 1),
    `init_loss`, `best_loss`, `runs`, `nonfinite`.
    """
    table = []
    for (cmp_value, group_value), curve in _curves(
        grid_points(rows, x, group, metric, compare)
    ).items():
        loss0 = group_init_loss(curve)
        losses = [p["loss"] for p in curve]
        finite = [v for v in losses if math.isfinite(v)]
        table.append(
            {
                "compare": cmp_value,
                "group": group_value,
                "lr_sensitivity": lr_sensitivity(losses, loss0)
                if math.isfinite(loss0)
                else math.nan,
                "init_loss": loss0,
                "best_loss": min(finite) if finite else None,
                "runs": len(curve),
                "nonfinite": len(curve) - len(finite),
            }
        )
    return table


def varying_keys(rows: Sequence[Mapping[str, Any]], keys: Iterable[str]) -> list[str]:
    """The keys of `keys` that take more than one value over `rows`."""
    out = []
    for key in keys:
        values = {json_key(row.get(key)) for row in rows}
        if len(values) > 1:
            out.append(key)
    return out


def json_key(value: Any) -> str:
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


def infer_axes(
    rows: Sequence[Mapping[str, Any]], override_keys: Sequence[str]
) -> dict[str, str | None]:
    """Default `x`, `group`, `compare` keys for a sweep's rows.

    x: the varying key ending in `lr` (`optimizer.lr` first); compare: a
    varying key whose values are all booleans; group: the first other varying
    key whose values are not booleans. Keys not found are None.
    """
    varying = varying_keys(rows, override_keys)
    lr_keys = [k for k in varying if k.rsplit(".", 1)[-1].endswith("lr")]
    x = "optimizer.lr" if "optimizer.lr" in lr_keys else (lr_keys[0] if lr_keys else None)

    def is_bool_key(key):
        return all(isinstance(row.get(key), bool) for row in rows if row.get(key) is not None)

    rest = [k for k in varying if k != x]
    compare = next((k for k in rest if is_bool_key(k)), None)
    group = next((k for k in rest if not is_bool_key(k)), None)
    return {"x": x, "group": group, "compare": compare}
