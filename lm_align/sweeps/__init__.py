"""Sweeps: run an experiment's `get_sweep()` grid as separate train processes, then analyse it.

    from lm_align.sweeps import run_sweep, load_summary, lr_sensitivity
    result = run_sweep("experiments/lr_sweep.py", "runs/lr_sweep", parallel=2)
    rows = load_summary("runs/lr_sweep")

Importing this package does not import jax (the analysis is numpy only).
See docs/sweeps.md.
"""

from lm_align.sweeps.analysis import (
    DEFAULT_LR_GRID,
    lr_sensitivity,
    lr_shift_in_grid_steps,
    optimal_lr,
    sensitivity_table,
    transfer_table,
)
from lm_align.sweeps.executor import Executor, LocalExecutor, RunEvent, RunSpec
from lm_align.sweeps.fit import PowerLawFit, power_law
from lm_align.sweeps.runner import SweepResult, load_sweep, plan_sweep, run_sweep
from lm_align.sweeps.summary import load_summary

__all__ = [
    "DEFAULT_LR_GRID",
    "Executor",
    "LocalExecutor",
    "PowerLawFit",
    "RunEvent",
    "RunSpec",
    "SweepResult",
    "load_summary",
    "load_sweep",
    "lr_sensitivity",
    "lr_shift_in_grid_steps",
    "optimal_lr",
    "plan_sweep",
    "power_law",
    "run_sweep",
    "sensitivity_table",
    "transfer_table",
]
