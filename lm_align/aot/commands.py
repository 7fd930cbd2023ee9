"""`lm-align compile`, and the fit check `launch tpu` and `sweep --executor tpu` run first.

    lm-align compile --topology v5e:4x4 [--num-slices N] --config FILE[:variant]
        [--config.group.field=value ...] [--mfu 0.4] [--json]

Exit status 0 when the step fits, 1 when it does not (`DoesNotFit`: the
memory needed and available, and the levers that would fit it), 2 for bad
input (config, topology, libtpu missing).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from lm_align import config as config_lib
from lm_align.aot.report import DEFAULT_MFU, CompileReport, compile_report
from lm_align.aot.topology import GIB, TopologyError
from lm_align.launch.accelerators import Accelerator, DoesNotFit, parse_topology
from lm_align.launch.gcloud import LaunchError, check_slices

# Commands whose step the fit check compiles (their configs train a model).
CHECKED_COMMANDS = {"train": "default", "align": None}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compile",
        help="compile the experiment's step for a TPU topology on this host: memory, FLOPs, "
        "collectives, fits or not",
        description=__doc__,
    )
    p.add_argument(
        "--topology",
        required=True,
        help="v5e:4x4, v5p:2x2x2, v6e:8x8, ... or a slice type (v5e-16)",
    )
    p.add_argument("--num-slices", type=int, default=1, help="slices joined by multislice (DCN)")
    p.add_argument("--config", required=True, help="experiment file, optionally with :variant")
    p.add_argument(
        "--mfu", type=float, default=DEFAULT_MFU, help="MFU of the second roofline figure"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_compile)


def cmd_compile(args, overrides) -> int:
    cfg, _ = config_lib.load_experiment(args.config, overrides)
    try:
        acc = parse_topology(args.topology)
        check_slices(args.num_slices)
        report = compile_report(cfg, acc, args.num_slices, mfu=args.mfu)
    except (LaunchError, TopologyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"lm-align compile: {args.config} for {describe_target(acc, args.num_slices)}")
        print("\n".join(format_report(report)), flush=True)
    if not report.fits:
        print(f"error: {does_not_fit(report)}", file=sys.stderr)
        return 1
    return 0


def describe_target(acc: Accelerator, num_slices: int) -> str:
    gen = acc.generation
    slices = f"{num_slices} x " if num_slices > 1 else ""
    return (
        f"{slices}{acc.topology} ({acc.name}: {acc.chips} chips of TPU {gen.name}, "
        f"{gen.hbm_gib:g} GiB HBM and {gen.peak_bf16_flops / 1e12:g} TFLOP/s bf16 each)"
    )


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _seconds(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    return f"{t * 1e3:.2f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"


def does_not_fit(r: CompileReport) -> DoesNotFit:
    """The named error: memory needed vs usable, and each lever with its estimate."""
    lines = [
        (
            f"does not fit: the {r.step} needs {_gib(r.needed_bytes)} per chip; "
            f"{r.topology} chips leave {_gib(r.usable_hbm_bytes)} of {_gib(r.hbm_bytes)} "
            "HBM usable"
        )
    ]
    for lever in r.levers:
        flags = " ".join(f"--config.{o}" for o in lever.overrides)
        if lever.topology:
            flags = f"--topology {lever.topology} {flags}"
        verdict = "fits" if lever.fits else "still too large"
        lines.append(
            f"  {lever.name}: {flags} -> about {_gib(lever.estimated_bytes)} per chip "
            f"({verdict}; {lever.note})"
        )
    if not r.levers:
        lines.append("  no lever estimated (XLA did not say how much the step needs)")
    return DoesNotFit("\n".join(lines))


def _collective_lines(r: CompileReport) -> list[str]:
    lines = [
        (
            "collectives (optimised HLO, per chip; 'in loops' run once per iteration, "
            "'per step' multiplies by the trip counts):"
        ),
        f"  {'kind':<19}{'count':>6}{'in loops':>10}{'bytes':>12}{'per step':>10}{'bytes/step':>12}",
    ]
    for kind, c in r.collectives.items():
        lines.append(
            f"  {kind:<19}{c.count:>6}{c.in_loops:>10}{_bytes(c.bytes):>12}"
            f"{c.per_step_count:>10}{_bytes(c.per_step_bytes):>12}"
        )
    if not r.trip_counts_known:
        lines.append("  (some loop trip counts could not be read: those loops count once per step)")
    return lines


def format_report(r: CompileReport) -> list[str]:
    """The report as text (docs/tpu_compile.md explains each line)."""
    lines = [
        f"step          {r.step}, {r.tokens_per_step:,} tokens per step",
        f"mesh          {r.mesh} over {r.chips} chips"
        + (f" ({r.num_slices} slices: data spans them)" if r.num_slices > 1 else ""),
        f"params        {r.params:,}",
        f"compile       {r.compile_time_s:.1f} s",
    ]
    verdict = "fits" if r.fits else "DOES NOT FIT"
    if r.memory is None:
        lines.append(f"memory/chip   {_bytes(r.needed_bytes)} (XLA refused: out of HBM)")
    else:
        m = r.memory
        lines.append(
            f"memory/chip   {_bytes(m.total)} = arguments {_bytes(m.arguments)} + temporaries "
            f"{_bytes(m.temporaries)} + outputs {_bytes(m.outputs)} - aliased {_bytes(m.aliased)}"
        )
    lines.append(
        f"HBM/chip      {_gib(r.usable_hbm_bytes)} usable of {_gib(r.hbm_bytes)}: {verdict}"
    )
    lines += [
        f"flops         {r.flops_per_token:.4g} per token, {r.flops_per_step:.4g} per step",
        (
            f"roofline      step >= {_seconds(r.min_step_time_s)}, <= {r.max_tokens_per_s:,.0f} "
            f"tokens/s at 100% of the bf16 peak ({r.peak_flops:.3g} FLOP/s); at {r.mfu:.0%} MFU "
            f"{_seconds(r.min_step_time_s / r.mfu)}, {r.max_tokens_per_s * r.mfu:,.0f} tokens/s"
        ),
    ]
    if r.compute_dtype != "bfloat16":
        lines.append(
            f"              (model.dtype={r.compute_dtype}: TPU matmuls in float32 take several "
            "bf16 passes, so this bound is optimistic; set model.dtype=bfloat16)"
        )
    if r.collectives is not None:
        lines += _collective_lines(r)
    return lines


# ---------------------------------------------------------------------------
# The fit check before a launch


def _experiment(command: Sequence[str]):
    """(config, spec) of an lm-align command's --config and --config.* overrides, or None
    when the command trains no model here (e.g. `sample`)."""
    overrides, rest = config_lib.parse_override_args(list(command))
    if not rest or rest[0] not in CHECKED_COMMANDS:
        return None
    spec = None
    for i, arg in enumerate(rest):
        if arg == "--config" and i + 1 < len(rest):
            spec = rest[i + 1]
        elif arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
    default = CHECKED_COMMANDS[rest[0]]
    if spec is None and default is None:
        raise config_lib.ConfigError(f"`lm-align {rest[0]}` needs --config FILE")
    return config_lib.load_experiment(spec, overrides, default=default or "default")


def _shape_key(cfg) -> str:
    """The config with every non-zero float replaced: runs that differ only in learning
    rates or coefficients compile to the same memory, so one compile covers them."""

    def blank(d):
        if isinstance(d, dict):
            return {k: blank(v) for k, v in d.items()}
        return "<float>" if isinstance(d, float) and d != 0.0 else d

    return json.dumps(blank(cfg.to_dict()), sort_keys=True, default=str)


def fit_check(
    commands: Sequence[Sequence[str]], acc: Accelerator, num_slices: int, write=print
) -> None:
    """Compiles the step of each distinct job among `commands` (lm-align argument lists)
    for `num_slices` slices of `acc`; writes one `# fit check` line each; raises
    DoesNotFit for the first that does not fit, LaunchError when it cannot check."""
    seen = set()
    for command in commands:
        try:
            loaded = _experiment(command)
        except config_lib.ConfigError as e:
            raise LaunchError(f"fit check: {e}") from None
        if loaded is None:
            write(f"# fit check: `lm-align {command[0]}` trains no model; nothing to compile")
            continue
        cfg, spec = loaded
        key = _shape_key(cfg)
        if key in seen:
            continue
        seen.add(key)
        try:
            r = compile_report(cfg, acc, num_slices)
        except TopologyError as e:
            raise LaunchError(f"fit check: {e} (or skip the check: --skip-fit-check)") from None
        except config_lib.ConfigError as e:
            raise LaunchError(f"fit check of {spec}: {e}") from None
        write(
            f"# fit check ({r.topology}{f' x {num_slices}' if num_slices > 1 else ''}, "
            f"{spec}): {r.step}, {_bytes(r.needed_bytes)} of {_gib(r.usable_hbm_bytes)} per chip, "
            f"{'fits' if r.fits else 'DOES NOT FIT'} (mesh {r.mesh}; compiled in "
            f"{r.compile_time_s:.1f} s)"
        )
        if not r.fits:
            raise does_not_fit(r)
