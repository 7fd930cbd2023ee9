"""One row per run of a sweep: WORKDIR/summary.jsonl and WORKDIR/summary.csv.

Columns, in order: `name`, `index`, `status`, one column per override key of
the sweep (the full dotted key, e.g. `optimizer.lr`; empty where a run does
not set it), then the metrics below (None / empty where a run has none yet).

| Column | Definition |
|---|---|
| `init_loss` | `loss` of the `metrics.jsonl` row with `step == 1`: the loss at initialisation, before the first update (None if that step was not logged) |
| `final_train_loss` | `loss` of the last `metrics.jsonl` row |
| `eval_loss` | `eval_loss` of `final.json` (finished runs only) |
| `answer_exact_match` | `answer_exact_match` of `final.json`, if present |
| `max_attn_logit_final` | max over layers of the last row's `max_attn_logit` |
| `max_attn_logit_peak` | max over all rows and layers of `max_attn_logit` |
| `log_z_final` | `log_z_mean` of the last `metrics.jsonl` row: the mean log-normaliser of the output softmax (what z-loss pushes toward 0) |
| `output_logit_mean_final` | `output_logit_mean` of the last `metrics.jsonl` row |
| `params_non_embedding` | the blocks' matmul weights (without embeddings, readout, norms and biases; 12 d^2 per layer for a GeLU MLP of width 4d, Kaplan et al.'s N), from `config.json`'s `model` (`TransformerConfig.num_params(non_embedding=True)`) |
| `steps` | `step` of the last `metrics.jsonl` row |
| `wall_s` | seconds the run's processes ran, summed over attempts |

In summary.jsonl non-finite values are the strings "nan", "inf", "-inf" (as
in metrics.jsonl); `load_summary` turns them back into floats.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from lm_align.utils import write_atomic

SUMMARY_JSONL = "summary.jsonl"
SUMMARY_CSV = "summary.csv"
RUN_JSON = "run.json"
METRIC_COLUMNS = (
    "init_loss",
    "final_train_loss",
    "eval_loss",
    "answer_exact_match",
    "max_attn_logit_final",
    "max_attn_logit_peak",
    "log_z_final",
    "output_logit_mean_final",
    "params_non_embedding",
    "steps",
    "wall_s",
)


def _float(value) -> float | None:
    """A metrics value as a float ("nan"/"inf" strings included); None stays None."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _max_not_nan(values) -> float | None:
    values = [v for v in (_float(x) for x in values) if v is not None and not math.isnan(v)]
    return max(values) if values else None


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSONL file; a partly written last line (a live run) is skipped."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return rows


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_metrics(run_dir: str) -> dict[str, Any]:
    """The metric columns (except `wall_s`) of one run directory."""
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    final = read_json(os.path.join(run_dir, "final.json")) or {}
    first = rows[0] if rows else {}
    last = rows[-1] if rows else {}
    attn_final = last.get("max_attn_logit")
    return {
        "init_loss": _float(first.get("loss")) if first.get("step") == 1 else None,
        "final_train_loss": _float(last.get("loss")),
        "eval_loss": _float(final.get("eval_loss")),
        "answer_exact_match": _float(final.get("answer_exact_match")),
        "max_attn_logit_final": _max_not_nan(attn_final) if attn_final else None,
        "max_attn_logit_peak": _max_not_nan(
            v for r in rows for v in (r.get("max_attn_logit") or ())
        ),
        "log_z_final": _float(last.get("log_z_mean")),
        "output_logit_mean_final": _float(last.get("output_logit_mean")),
        "params_non_embedding": _non_embedding_params(run_dir),
        "steps": last.get("step", final.get("step")),
    }


def _non_embedding_params(run_dir: str) -> int | None:
    """Non-embedding parameter count of the run's model (None before config.json exists)."""
    config = read_json(os.path.join(run_dir, "config.json"))
    if not config or "model" not in config:
        return None
    from lm_align.models.transformer import config_from_dict

    try:
        return config_from_dict(config["model"]).num_params(non_embedding=True)
    except (TypeError, ValueError):  # a config.json of another lm_align version
        return None


def run_row(run_dir: str, record: dict, override_keys: Sequence[str]) -> dict[str, Any]:
    """The summary row of the run described by `record` (its run.json)."""
    overrides = record.get("overrides", {})
    row = {"name": record["name"], "index": record["index"], "status": record["status"]}
    row.update({k: overrides.get(k) for k in override_keys})
    row.update(run_metrics(run_dir))
    row["wall_s"] = record.get("wall_s")
    return row


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    return value


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Writes `rows` as CSV with a header (None -> empty cell), atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in columns])
    write_atomic(path, buf.getvalue())


def write_summary(workdir: str, rows: Sequence[dict]) -> None:
    """Rewrites WORKDIR/summary.jsonl and WORKDIR/summary.csv from `rows`."""
    columns = list(rows[0]) if rows else ["name", "index", "status", *METRIC_COLUMNS]
    lines = [json.dumps({k: _jsonable(v) for k, v in row.items()}) for row in rows]
    write_atomic(os.path.join(workdir, SUMMARY_JSONL), "".join(line + "\n" for line in lines))
    write_csv(os.path.join(workdir, SUMMARY_CSV), rows, columns)


def load_summary(workdir: str) -> list[dict]:
    """The rows of WORKDIR/summary.jsonl, metric columns as floats (or None).

    Raises FileNotFoundError naming the file when the sweep has written none.
    """
    path = os.path.join(workdir, SUMMARY_JSONL)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist; run `lm-align sweep --workdir {workdir} ...` first"
        )
    rows = read_jsonl(path)
    for row in rows:
        for key in METRIC_COLUMNS:
            if key in row and key != "steps":
                row[key] = _float(row[key])
    return rows
