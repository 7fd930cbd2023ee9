"""Metric writers: WORKDIR/metrics.jsonl (always), TensorBoard, and a progress bar.

metrics.jsonl holds one JSON object per logged step; docs/metrics.md documents
every key. Per-layer arrays (e.g. `max_attn_logit`, shape [n_layers]) are
written as lists in JSONL and as `name/layer_i` scalars in TensorBoard.
Only process 0 writes.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping

import jax

from lm_align.utils import jsonable


class MetricWriter:
    """Appends metric rows to JSONL and TensorBoard; drops rows past a resumed step."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        _truncate_after(self.path, resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        row = {"step": int(step), **{k: jsonable(v) for k, v in metrics.items()}}
        if not self.enabled:
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k == "step":
                    continue
                if isinstance(v, list):
                    for i, x in enumerate(v):
                        if isinstance(x, (int, float)):
                            self._tb.add_scalar(f"{k}/layer_{i}", x, step)
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        return row

    def close(self):
        if self._tb is not None:
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    """Keeps rows with step <= `step` (a resumed run rewrites what followed)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    if len(kept) != len(rows):
        with open(path, "w") as f:
            f.writelines(kept)


def read_metrics(workdir: str) -> list[dict]:
    """All rows of WORKDIR/metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """tqdm progress bar with ETA on stderr (process 0 only, optional)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
                file=sys.stderr,
                disable=not sys.stderr.isatty(),
            )

    def update(self, n: int = 1, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def write(self, text: str):
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text)
        elif jax.process_index() == 0:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
