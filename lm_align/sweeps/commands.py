"""`lm-align sweep` and `lm-align plot`.

    lm-align sweep --config experiments/x.py[:arg] --workdir DIR [--parallel N] [--max-runs N]
                   [--dry-run] [--config.group.field=value ...]
                   [--executor tpu --tpu-name NAME --accelerator TYPE --zone ZONE
                    [--num-slices N] [--project P] [--max-retries K] [--spot] [--bucket B]
                    [--skip-fit-check]]
    lm-align plot --sweep DIR [--x optimizer.lr] [--group KEY] [--compare KEY]
                  [--metric eval_loss] [--out DIR] [--lines | --curves] [--predict N]

`sweep` exits 0 when no run failed (every run finished or diverged, or was
left for a later call by --max-runs), 1 when a run failed, 2 on a config
error (nothing started), and 128 + the signal number when stopped by
SIGTERM/SIGINT/SIGHUP (rerun the same command to resume).

`--executor tpu` runs the runs on Cloud TPU VMs instead of this machine
(`lm_align.sweeps.tpu_executor`, docs/launching_tpu.md). Before any TPU VM is
created (and before a dry run prints its commands) each distinct run is
compiled for the accelerator (`lm-align compile`, docs/tpu_compile.md); a run
that does not fit stops the sweep with exit status 1. --skip-fit-check skips it.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys

NONE = "none"  # --group none / --compare none: do not split by a key
# --executor tpu's flags: (option, attribute); given without it they are an error.
TPU_FLAGS = (
    ("--tpu-name", "tpu_name"),
    ("--accelerator", "accelerator"),
    ("--zone", "zone"),
    ("--num-slices", "num_slices"),
    ("--project", "project"),
    ("--max-retries", "max_retries"),
    ("--runtime-version", "runtime_version"),
    ("--spot", "spot"),
    ("--bucket", "bucket"),
    ("--skip-fit-check", "skip_fit_check"),
)


def add_parsers(subparsers, fit_check=None) -> None:
    """Registers the `sweep` and `plot` subcommands on an argparse subparsers object;
    `fit_check` (see `cmd_sweep`) runs before a sweep on TPU VMs (None: no check)."""
    p = subparsers.add_parser(
        "sweep", help="run the experiment's get_sweep() runs, one train process each (resumable)"
    )
    p.add_argument("--config", required=True, help="experiment file with get_sweep(), [:arg]")
    p.add_argument("--workdir", required=True, help="sweep directory: one subdirectory per run")
    p.add_argument("--parallel", type=int, default=1, help="runs alive at once (default 1)")
    p.add_argument("--max-runs", type=int, help="start at most N runs now (rerun to continue)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their overrides")
    p.add_argument(
        "--executor",
        choices=("local", "tpu"),
        default="local",
        help="local: processes on this machine (default); tpu: Cloud TPU VMs",
    )
    g = p.add_argument_group("--executor tpu (docs/launching_tpu.md)")
    g.add_argument("--tpu-name", help="TPU VM name (several slices: NAME-0, NAME-1, ...)")
    g.add_argument("--accelerator", help="slice type, e.g. v5litepod-8 (alias v5e-8), v4-8")
    g.add_argument("--zone", help="zone of the TPU VMs, e.g. us-west4-a")
    g.add_argument("--num-slices", type=int, help="TPU VMs, each one run at a time (default 1)")
    g.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    g.add_argument("--max-retries", type=int, help="reruns of a preempted run (default 2)")
    g.add_argument("--runtime-version", help="TPU software version (default: per generation)")
    g.add_argument("--spot", action="store_true", default=None, help="create Spot TPU VMs")
    g.add_argument(
        "--bucket",
        help="Cloud Storage bucket every worker mounts (gcsfuse); the runs' directories go "
        "there (resume after any preemption; needed for slices of several hosts)",
    )
    g.add_argument(
        "--skip-fit-check",
        action="store_true",
        default=None,
        help="start without first compiling each run for the accelerator (lm-align compile)",
    )
    p.set_defaults(fn=functools.partial(cmd_sweep, fit_check=fit_check))

    p = subparsers.add_parser("plot", help="loss vs LR, optimal LR per width, LR sensitivity")
    p.add_argument("--sweep", required=True, help="a sweep's --workdir (reads summary.jsonl)")
    p.add_argument("--x", help="LR key (default: the varying override key ending in 'lr')")
    p.add_argument("--group", help="one curve per value (default: another varying key; 'none')")
    p.add_argument("--compare", help="solid vs dashed per value (default: a varying boolean key)")
    p.add_argument("--metric", default="eval_loss", help="summary column to plot")
    p.add_argument("--out", help="output directory (default: the sweep directory)")
    p.add_argument(
        "--predict",
        type=float,
        metavar="GROUP_VALUE",
        help="fit LR sensitivity and the LR where the max attention logit reaches "
        "--threshold against the (numeric) --group on the groups below GROUP_VALUE, "
        "predict both at GROUP_VALUE, and compare with its runs once they exist",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=1e4,
        help="max attention logit of --predict's crossing LR (default 1e4, as in Wortsman et al.)",
    )
    p.add_argument(
        "--lines",
        action="store_true",
        help="just --metric against --x, one line per --group, line style per --compare "
        "(e.g. the final log Z against the LR, or sweeps that are not LR sweeps)",
    )
    p.add_argument(
        "--curves",
        action="store_true",
        help="--metric and the LR against step, one line per run, colour per --group "
        "(e.g. LR schedules of several lengths: experiments/wsd.py)",
    )
    p.set_defaults(fn=cmd_plot)


def cmd_sweep(args, overrides, fit_check=None) -> int:
    """Runs (or with --dry-run lists) the sweep. With --executor tpu, `fit_check(commands,
    accelerator, num_slices, write)` first compiles each run's step for one slice of the
    accelerator, unless --skip-fit-check."""
    from lm_align.launch.accelerators import DoesNotFit
    from lm_align.launch.gcloud import LaunchError
    from lm_align.sweeps import runner

    if args.parallel < 1:
        print(f"error: --parallel={args.parallel}; use 1 or more", file=sys.stderr)
        return 2
    try:
        executor = _executor(args)
        if executor is not None and fit_check is not None and not args.skip_fit_check:
            runs = runner.plan_sweep(args.config, args.workdir, overrides)
            commands = [r.argv[r.argv.index("lm_align.cli") + 1 :] for r in runs]
            fit_check(commands, executor.accelerator, 1, write=print)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, DoesNotFit) else 2
    if args.dry_run:
        runs = runner.plan_sweep(args.config, args.workdir, overrides)
        runner.check_workdir(args.workdir, runs)
        print(f"{len(runs)} runs of {args.config} in {args.workdir} (dry run: nothing started)")
        for line in runner.describe_runs(runs):
            print(f"  {line}")
        if executor is not None:
            _print_tpu_plan(executor, runs)
        return 0
    print(f"lm-align sweep: {args.config} -> {args.workdir}", flush=True)
    try:
        result = runner.run_sweep(
            args.config,
            args.workdir,
            parallel=args.parallel,
            executor=executor,
            extra_overrides=overrides,
            max_runs=args.max_runs,
        )
    except LaunchError as e:  # e.g. the experiment file is outside the copied checkout
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(
        f"{result.count(s)} {s}"
        for s in ("finished", "diverged", "failed", "interrupted", "pending")
        if result.count(s)
    )
    print(f"sweep: {counts}; summary {os.path.join(args.workdir, 'summary.csv')}", flush=True)
    for name in result.failed:
        print(f"  failed: {name} (see {os.path.join(args.workdir, name, 'stderr.log')})")
    if result.stopped_by:
        print(
            f"{result.stopped_by}: running runs were asked to save a checkpoint and stop; "
            "rerun the same command to resume",
            flush=True,
        )
        return 128 + int(getattr(signal, result.stopped_by))
    if result.failed:
        return 1
    left = result.count("pending") + result.count("interrupted")
    if left:
        print(f"{left} runs not done; rerun the same command to continue")
    return 0


def _executor(args):
    """None (run_sweep's LocalExecutor) or the TPUExecutor the tpu flags describe."""
    from lm_align.launch.gcloud import LaunchError

    given = [flag for flag, attr in TPU_FLAGS if getattr(args, attr) is not None]
    if args.executor != "tpu":
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise LaunchError(
                f"{', '.join(given)} {verb} to --executor tpu; add --executor tpu, or drop "
                f"{'it' if len(given) == 1 else 'them'} to run on this machine"
            )
        return None
    missing = [f for f, a in TPU_FLAGS[:3] if not getattr(args, a)]
    if missing:
        raise LaunchError(
            f"--executor tpu needs {', '.join(missing)} (e.g. --tpu-name sweep "
            "--accelerator v5litepod-8 --zone us-west4-a)"
        )
    if args.parallel != 1:
        raise LaunchError(
            f"--parallel={args.parallel} applies to --executor local; on TPU each slice runs one "
            "run at a time: use --num-slices N to run N at once"
        )
    from lm_align.sweeps.tpu_executor import TPUExecutor

    return TPUExecutor(
        args.tpu_name,
        args.accelerator,
        args.zone,
        num_slices=1 if args.num_slices is None else args.num_slices,
        project=args.project,
        runtime_version=args.runtime_version,
        spot=bool(args.spot),
        max_retries=2 if args.max_retries is None else args.max_retries,
        bucket=args.bucket,
    )


def _print_tpu_plan(executor, runs) -> None:
    from lm_align.launch.gcloud import shell_line

    acc = executor.accelerator
    print(
        f"\n--executor tpu: {len(executor.slices)} slice(s) of {acc.describe()}; "
        "the gcloud commands, if every slice were missing and no run preempted:"
    )
    for line in executor.comments(runs):
        print(line)
    shown = runs[: len(executor.slices)]
    for i, step in enumerate(executor.plan(shown), 1):
        print(f"# {i}. {step.comment}")
        if step.argv is not None:
            print(shell_line(step.argv))
    if len(runs) > len(shown):
        print(f"# ... and the same three commands for each of the other {len(runs) - len(shown)} "
              "runs, on whichever slice is free")  # fmt: skip


def _override_keys(sweep_dir: str, rows) -> list[str]:
    from lm_align.sweeps import runner, summary

    record = summary.read_json(os.path.join(sweep_dir, runner.SWEEP_JSON))
    if record is not None:
        return list(dict.fromkeys(k for r in record["runs"] for k in r["overrides"]))
    fixed = {"name", "index", "status", *summary.METRIC_COLUMNS}
    return [k for k in (rows[0] if rows else {}) if k not in fixed]


def _choose(value, inferred):
    if value is None:
        return inferred
    return None if value.lower() == NONE else value


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(rows, columns, headers=None) -> list[str]:
    """Lines of a plain-text table: `columns` of each row, left-aligned."""
    headers = list(headers or columns)
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return lines


def cmd_plot(args, overrides) -> int:
    from lm_align.config import ConfigError
    from lm_align.sweeps import analysis, plots, summary

    if overrides:
        raise ConfigError(f"plot takes no --config.* overrides (got {overrides})")
    try:
        rows = summary.load_summary(args.sweep)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = _override_keys(args.sweep, rows)
    if args.lines:
        return _plot_lines(args, rows)
    if args.curves:
        return _plot_curves(args, rows, keys)
    inferred = analysis.infer_axes(rows, keys)
    x = args.x or inferred["x"]
    if x is None:
        print(
            f"error: no varying override key ends in 'lr' (keys: {keys}); name the LR key with --x",
            file=sys.stderr,
        )
        return 2
    group = _choose(args.group, inferred["group"])
    compare = _choose(args.compare, inferred["compare"])
    if args.predict is not None and not group:
        print("error: --predict needs a numeric --group (e.g. params_non_embedding)", file=sys.stderr)
        return 2
    try:
        report = plots.plot_sweep(
            rows,
            args.out or args.sweep,
            x=x,
            group=group,
            compare=compare,
            metric=args.metric,
            title=os.path.basename(os.path.normpath(args.sweep)),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_sweep_report(report, x=x, group=group, compare=compare, metric=args.metric)
    if args.predict is not None:
        table = analysis.prediction_table(
            rows, args.predict, x=x, group=group, metric=args.metric, compare=compare,
            threshold=args.threshold,
        )  # fmt: skip
        _print_prediction(table, args.predict, group, compare)
    return 0


def _print_prediction(table, at, group, compare) -> None:
    """The --predict table: each trend's fit on the smaller groups, its prediction at `at`
    with a 95% interval, and the measured value with the relative error once it exists."""
    from lm_align.sweeps import plots

    print(f"\nprediction at {plots.short(group)}={_fmt(at)} from the smaller groups:")
    for r in table:
        where = f" ({plots.short(compare)}={r['compare']})" if compare else ""
        if r["fit"] is None:
            print(f"  {r['quantity']}{where}: fewer than 3 groups below it with a value")
            continue
        lo, hi = r["predicted_ci"]
        line = (
            f"  {r['quantity']}{where}: {r['fit'].describe()} on {len(r['groups'])} groups; "
            f"predicted {_fmt(r['predicted'])} (95% CI {_fmt(lo)} .. {_fmt(hi)})"
        )
        if r["measured"] is not None:
            inside = "inside" if lo <= r["measured"] <= hi else "outside"
            line += f"; measured {_fmt(r['measured'])} (error {r['error']:+.0%}, {inside} the CI)"
        print(line)


def _plot_lines(args, rows) -> int:
    """`plot --lines`: one line of the metric against --x per group; prints the points."""
    from lm_align.sweeps import plots

    if not args.x:
        print("error: --lines needs --x (the key on the horizontal axis)", file=sys.stderr)
        return 2
    group = None if args.group in (None, NONE) else args.group
    compare = None if args.compare in (None, NONE) else args.compare
    try:
        path, points = plots.plot_lines(
            rows, args.out or args.sweep, x=args.x, group=group, metric=args.metric,
            compare=compare, title=os.path.basename(os.path.normpath(args.sweep)),
        )  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in format_table(
        [{"compare": c, "group": g, "x": x, "metric": m} for c, g, x, m in points],
        ["compare", "group", "x", "metric"] if compare else ["group", "x", "metric"],
        ([plots.short(compare)] if compare else [])
        + [plots.short(group) if group else "group", plots.short(args.x), args.metric],
    ):
        print(f"  {line}")
    print(f"wrote {path}")
    return 0


def _plot_curves(args, rows, keys) -> int:
    """`plot --curves`: --metric and the LR against step per run; prints the metric at the
    steps where runs end."""
    from lm_align.sweeps import curves

    group = None if args.group in (None, NONE) else args.group
    try:
        path, table = curves.plot_curves(
            args.sweep, rows, args.out or args.sweep, override_keys=keys, metric=args.metric,
            group=group, title=os.path.basename(os.path.normpath(args.sweep)),
        )  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    columns = [c for c in table[0] if c != "name"]
    for line in format_table(table, columns, [c.rsplit(".", 1)[-1] for c in columns]):
        print(f"  {line}")
    print(f"wrote {path}")
    return 0


def _print_sweep_report(report, *, x, group, compare, metric) -> None:
    """Prints the optimal-LR table, the shift across groups and the LR sensitivity table."""
    from lm_align.sweeps import plots

    split = [k for k in (compare, group) if k]
    names = {"compare": compare, "group": group}
    key_cols = [c for c in ("compare", "group") if names[c]]
    headers = [plots.short(names[c]) for c in key_cols]
    print(f"x {x}, group {group}, compare {compare}, metric {metric}")
    print(f"\noptimal {x} per {' x '.join(split) or 'sweep'}:")
    cols = [
        "optimal_lr",
        "grid_index",
        "shift",
        "fitted_lr",
        "fitted_shift",
        "best_loss",
        "runs",
        "nonfinite",
    ]
    for line in format_table(report.transfer, key_cols + cols, headers + cols):
        print(f"  {line}")
    if group:
        _print_shifts(report, group=group, compare=compare)
    print(f"\nLR sensitivity (mean of min({metric}, init_loss) - best over the LR grid):")
    cols = ["lr_sensitivity", "init_loss", "best_loss", "runs", "nonfinite"]
    for line in format_table(report.sensitivity, key_cols + cols, headers + cols):
        print(f"  {line}")
    if any(math.isnan(r["init_loss"]) for r in report.sensitivity):
        print(
            "  (nan: no run of that curve logged step 1, whose loss is the loss at initialisation)"
        )
    print("\nwrote " + ", ".join(report.files))


def _print_shifts(report, *, group, compare) -> None:
    """One line per compare value: how far the optimal LR moves across the groups."""
    from lm_align.sweeps import plots

    for cmp_value, steps in report.shift.items():
        where = f" ({plots.short(compare)}={cmp_value})" if compare else ""
        fitted = [r["fitted_shift"] for r in report.transfer if r["compare"] == cmp_value]
        fitted = [f for f in fitted if f is not None]
        span = f"{max(fitted) - min(fitted):.2f}" if fitted else "n/a"
        print(
            f"optimal-LR shift across {plots.short(group)}{where}: {_fmt(steps)} grid steps "
            f"(argmin), {span} grid steps (fitted)"
        )
