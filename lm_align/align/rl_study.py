"""`lm-align rl-study`: online RL algorithms against a continued-SFT control, with intervals.

    lm-align rl-study --config experiments/rl_arithmetic.py --workdir runs/rl_study

The experiment file provides

    get_config("base")          the start policy (`lm-align train`)
    get_config("control")       continued SFT from the base on the same data
                                (`lm-align train`; `train.init_from` is filled in)
    get_config("<algorithm>")   an `lm-align rl` config per algorithm
                                (`rl.policy_checkpoint` and `train.seed` are filled in)
    get_rl_study(arg)           the fields of `DEFAULTS`

and the study, in WORKDIR:

    base/, control/                    the two `lm-align train` runs
    <algorithm>/seed_<s>/              one `lm-align rl` run per algorithm and seed
    eval/<name>.json                   each policy on the same held-out problems
    results.json, results.md, results.png

Every policy is evaluated on the same `eval_problems` distinct held-out
problems (`lm_align.align.experiment.held_out_prompts`): greedy accuracy (per
slice), pass@1 and pass@k from `eval_samples` samples, KL to the base. A
method's change over the base is the mean per-problem difference (seeds
averaged per problem first) with its 95% paired-bootstrap interval over
problems (`lm_align.align.evaluation.paired_bootstrap`); the per-seed values
are listed beside it, so the spread over seeds shows too. Every stage
resumes: a finished run or evaluation is read back.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lm_align.align.evaluation import paired_bootstrap
from lm_align.utils import log, write_atomic, write_json

DEFAULTS: dict[str, Any] = {
    "algorithms": ("grpo", "dr_grpo", "dapo"),
    "seeds": (0, 1),
    "control": True,  # also run get_config("control")
    "eval_problems": 512,  # distinct held-out problems
    "eval_samples": 8,  # samples per problem for pass@1 and pass@k
    "num_resamples": 2000,  # bootstrap resamples of the intervals
}
METRICS = (("greedy_correct", "greedy accuracy"), ("sample_accuracy", "pass@1"))


def run_rl_study(config_path: str, workdir: str, overrides=()) -> list[dict]:
    from lm_align.align.experiment import cached, held_out_prompts, open_experiment
    from lm_align.align.policy_eval import evaluate_policy
    from lm_align.align.rl import rl
    from lm_align.align.setup import load_model
    from lm_align.data.scorers import make_scorer
    from lm_align.train.loop import train

    exp = open_experiment(config_path, "get_rl_study", DEFAULTS, overrides,
                          "lm_align/align/rl_study.py")  # fmt: skip
    spec = exp.spec
    base_dir = os.path.join(workdir, "base")
    log(f"== base policy -> {base_dir}")
    train(exp.load("base"), base_dir)
    runs = {"base": [base_dir]}
    if spec["control"]:
        control_dir = os.path.join(workdir, "control")
        log(f"== control: continued SFT -> {control_dir}")
        train(exp.load("control", [f"train.init_from={base_dir}"]), control_dir)
        runs["control"] = [control_dir]
    for algorithm in spec["algorithms"]:
        runs[algorithm] = []
        for seed in spec["seeds"]:
            run_dir = os.path.join(workdir, algorithm, f"seed_{seed}")
            log(f"== {algorithm}, seed {seed} -> {run_dir}")
            cfg = exp.load(algorithm, [f"rl.policy_checkpoint={base_dir}", f"train.seed={seed}",
                                       "rl.eval_prompts=0"])  # the study evaluates every run
            result = rl(cfg, run_dir)
            if result.stopped_by:
                log(f"stopped by {result.stopped_by}; rerun the same command to continue")
                return []
            runs[algorithm].append(run_dir)

    model, base_params, cfg = load_model(base_dir)
    scorer = make_scorer(exp.load(spec["algorithms"][0]).rl.scorer)
    prompts, slices = held_out_prompts(cfg.data, spec["eval_problems"])
    tokenizer = _tokenizer(cfg)

    def evaluate(run_dir: str) -> dict:
        name = os.path.relpath(run_dir, workdir).replace(os.sep, "_")

        def compute():
            _, params, _ = load_model(run_dir)
            return evaluate_policy(
                model, params, tokenizer, prompts, scorer, num_samples=spec["eval_samples"],
                ks=sorted({1, spec["eval_samples"]}), reference_params=base_params,
                slices=slices, per_prompt=True, seed=0,
            )  # fmt: skip

        log(f"evaluating {name} on {len(prompts)} held-out problems")
        return cached(os.path.join(workdir, "eval", f"{name}.json"), compute)

    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    reports = {method: [evaluate(d) for d in dirs] for method, dirs in runs.items()}
    rows = summarize(reports, spec, prompts, slices)
    write_json(os.path.join(workdir, "results.json"), rows)
    table = format_table(rows, spec["eval_samples"])
    write_atomic(os.path.join(workdir, "results.md"), table + "\n")
    plot(rows, os.path.join(workdir, "results.png"))
    log(table)
    return rows


def _tokenizer(cfg):
    from lm_align import data as data_lib

    return data_lib.make_tokenizer(cfg.data.tokenizer)


def _per_prompt(reports: list[dict], key: str, index=None) -> np.ndarray:
    """A per-problem metric averaged over a method's seeds, [P] (or the `index` subset)."""
    values = np.mean([np.asarray(r["per_prompt"][key], np.float64) for r in reports], axis=0)
    return values if index is None else values[index]


def summarize(reports: dict[str, list[dict]], spec: dict, prompts, slices) -> list[dict]:
    """One row per method: means, per-seed values, intervals of the change over the base."""
    k = spec["eval_samples"]
    base = reports["base"]
    groups = {"all": None}
    if slices is not None:
        names = sorted({name for p in prompts for name in slices(p)})
        for name in names:
            idx = np.asarray([i for i, p in enumerate(prompts) if name in slices(p)])
            if 0 < len(idx) < len(prompts):
                groups[name] = idx
    rows = []
    for method, runs in reports.items():
        row: dict[str, Any] = {
            "method": method,
            "seeds": len(runs),
            f"pass@{k}": float(np.mean([r[f"pass@{k}"] for r in runs])),
            "kl": float(np.mean([r.get("kl", 0.0) for r in runs])),
        }
        for key, label in METRICS:
            row[label] = float(np.mean(_per_prompt(runs, key)))
            row[f"{label} per seed"] = [float(np.mean(r["per_prompt"][key])) for r in runs]
            if method == "base":
                continue
            for group, idx in groups.items():
                ci = paired_bootstrap(
                    _per_prompt(runs, key, idx), _per_prompt(base, key, idx),
                    num_resamples=spec["num_resamples"],
                )
                suffix = "" if group == "all" else f" [{group}]"
                row[f"delta {label}{suffix}"] = ci._asdict()
        if method != "base":
            row["improves"] = all(
                row[f"delta {label}"]["lo"] > 0 for _, label in METRICS
            )
        rows.append(row)
    return rows


def _ci(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def format_table(rows: list[dict], k: int) -> str:
    lines = [
        "| method | seeds | greedy accuracy (per seed) | change [95% CI] | pass@1 | change "
        f"[95% CI] | pass@{k} | KL to base | improves both |",
        "|---|---:|---|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        seeds = ", ".join(f"{x:.3f}" for x in r["greedy accuracy per seed"])
        base = r["method"] == "base"
        lines.append(
            f"| {r['method']} | {r['seeds']} | {r['greedy accuracy']:.3f} ({seeds}) | "
            f"{'' if base else _ci(r['delta greedy accuracy'])} | {r['pass@1']:.3f} | "
            f"{'' if base else _ci(r['delta pass@1'])} | {r[f'pass@{k}']:.3f} | "
            f"{r['kl']:.3f} | {'' if base else ('yes' if r['improves'] else 'no')} |"
        )
    slice_keys = sorted({key for r in rows for key in r if key.startswith("delta greedy accuracy [")})
    if slice_keys:
        lines += ["", "| method | " + " | ".join(k[6:] for k in slice_keys) + " |",
                  "|---|" + "---|" * len(slice_keys)]  # fmt: skip
        for r in rows:
            if r["method"] != "base":
                lines.append(f"| {r['method']} | " + " | ".join(_ci(r[k]) for k in slice_keys) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Bars: each method's change in greedy accuracy and pass@1 over the base, 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r for r in rows if r["method"] != "base"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.5 * len(METRICS), 3.2), sharey=True)
    for ax, (_, label) in zip(np.atleast_1d(axes), METRICS, strict=True):
        cis = [r[f"delta {label}"] for r in methods]
        x = np.arange(len(methods))
        means = np.asarray([c["mean"] for c in cis])
        err = np.asarray([[c["mean"] - c["lo"] for c in cis], [c["hi"] - c["mean"] for c in cis]])
        colors = ["tab:gray" if r["method"] == "control" else "tab:blue" for r in methods]
        ax.bar(x, means, yerr=err, capsize=4, color=colors)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, [r["method"] for r in methods], rotation=20)
        ax.set_title(f"change in {label} over the base (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
