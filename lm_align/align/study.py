"""`lm-align align-study` and `lm-align rl-study`: methods x seeds from one start policy.

    lm-align align-study --config experiments/align_arithmetic.py --workdir runs/align_study
    lm-align rl-study --config experiments/rl_arithmetic.py --workdir runs/rl_study

The experiment file provides

    get_config("base")        the start policy (`lm-align train`), unless base_checkpoint
    get_config("<method>")    one config per method: an `lm-align rl` config (an `rl`
                              group), an `lm-align align` config (an `align` group) or
                              an `lm-align train` config (continued SFT); the study
                              fills in the start policy, the seed and the data file
    get_study(arg)            (align-study) or get_rl_study(arg) (rl-study): the
                              fields of `DEFAULTS`

and the study, in WORKDIR:

    base/                              the start policy (unless base_checkpoint)
    data/                              the data stage (when `data` is set): samples
                                       of the start policy on train prompts, and
                                       the files made from them (`DATA_FILES`)
    <method>/seed_<s>/                 one run per method and seed
    eval/<name>.json                   each policy on the same held-out problems
    results.json, results.md, results.png

Every policy is evaluated on the same `eval_problems` distinct held-out
problems (`lm_align.align.experiment.held_out_prompts`): greedy accuracy (per
slice), pass@1 and pass@n from `eval_samples` samples, bon@n with the model's
own likelihood as the selector and, with `reward_model` (a stage trained once,
like a method, whose run is a reward model), bon@n with that reward model as
the selector; KL to the start policy. With a binary verifier, bon@n with the
verifier as the selector equals pass@n. A method's
change over the start is the mean per-problem difference (seeds averaged per
problem first) with its 95% paired-bootstrap interval over problems
(`lm_align.align.evaluation.paired_bootstrap`); the per-seed values are listed
beside it. A method "improves" when the interval of its target metric
(`targets`, default greedy accuracy) lies above zero; the table sets that
beside the paper's claim (`claims`); `comparisons` adds the paired change of
a method over another (e.g. RSO over sample-and-rank) on the method's target
metric. Every stage resumes: a finished run,
data file or evaluation is read back.

The data stage samples `num_candidates` responses to each of `num_prompts`
train prompts (distinct problems on arithmetic) from the
start policy (temperature `temperature`, top-k `top_k`), scores them with the
binary verifier `scorer` and the graded `label_scorer`, and writes:

    samples.jsonl     the first `num_samples` responses of each prompt with their
                      verifier rewards ("samples" format: BoN-aware losses, REINFORCE)
    pairs.jsonl       sample-and-rank pairs of the same responses: the verifier
                      picks the winner (`pairing`, `lm_align.align.datagen.build_pairwise`),
                      the graded scores set soft labels (`soft_label_temperature`)
    rso_pairs.jsonl   RSO: `num_samples` of the `num_candidates` accepted by
                      statistical rejection sampling at `rso_beta` (verifier reward),
                      then paired the same way (`lm_align.align.rso.rso_pairs`)
    lists.jsonl       lists of the same responses with their graded scores (LiPO)
    kept.jsonl        up to `max_per_problem` verified responses per prompt
                      (ReST-EM's E-step; its M-step is a train method on this file)
    chosen.jsonl      the chosen response of every pair (SFT on the chosen answers)
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from lm_align import config as config_lib
from lm_align.align.evaluation import paired_bootstrap
from lm_align.utils import log, write_atomic, write_json, write_jsonl

DEFAULTS: dict[str, Any] = {
    "methods": (),  # get_config stages, in table order
    "seeds": (0, 1),
    "one_seed": (),  # methods run with seeds[0] only (e.g. a deterministic control)
    "base_checkpoint": "",  # '' = train get_config("base") in WORKDIR/base
    "data": None,  # the data stage's fields (DATA_DEFAULTS), or None for no data stage
    "method_data": {},  # method -> the DATA_FILES file it trains on (default by its loss)
    "targets": {},  # method -> the metric it should improve (METRICS label; greedy accuracy)
    "claims": {},  # method -> its paper's qualitative claim, for the table
    "comparisons": {},  # method -> another method it is compared with on its target metric
    "reward_model": "",  # a get_config stage training a reward model: bon@k's selector
    "eval_problems": 512,  # distinct held-out problems
    "eval_samples": 8,  # samples per problem for pass@1 and pass@n
    "num_resamples": 2000,  # bootstrap resamples of the intervals
}
DATA_DEFAULTS: dict[str, Any] = {
    "num_prompts": 1024,  # train-split prompts (distinct problems on arithmetic)
    "num_candidates": 16,  # responses sampled per prompt (RSO's N_c)
    "num_samples": 8,  # of them, the first n make samples/pairs/lists/kept (the N of BoN)
    "temperature": 1.0,
    "top_k": 0,
    "max_new_tokens": 8,
    "seed": 0,
    "scorer": "arithmetic_exact",  # the binary verifier
    "label_scorer": "arithmetic_graded",  # soft pair labels, list labels
    "pairing": "best_worst",  # lm_align.align.datagen.PAIRING_METHODS
    "soft_label_temperature": None,  # soft pair labels sigmoid(dg / T) (geometric DPO)
    "rso_beta": 0.5,  # RSO's rejection-sampling temperature
    "max_per_problem": 4,  # kept.jsonl: verified responses per prompt
}
DATA_FILES = ("samples", "pairs", "rso_pairs", "lists", "kept", "chosen")
GREEDY, PASS1 = "greedy accuracy", "pass@1"


def run_study(config_path: str, workdir: str, overrides=(), getter: str = "get_study") -> list[dict]:
    """Runs (or resumes) every stage; returns the result rows (also written to WORKDIR)."""
    from lm_align.align.experiment import (
        cached,
        open_experiment,
        reward_model_selector,
        start_policy,
    )
    from lm_align.align.policy_eval import evaluate_policy
    from lm_align.align.setup import load_model
    from lm_align.data.scorers import make_scorer

    exp = open_experiment(config_path, getter, DEFAULTS, overrides, "lm_align/align/study.py")
    spec = _check_spec(exp.spec)
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    start = start_policy(exp, workdir, eval_problems=spec["eval_problems"], log=log)
    files = _data_stage(workdir, start, spec["data"]) if spec["data"] else {}
    runs = {"base": [start.directory]}
    rm_dir = ""
    if spec["reward_model"]:
        rm_dir = os.path.join(workdir, spec["reward_model"], f"seed_{spec['seeds'][0]}")
        log(f"== reward model {spec['reward_model']} -> {rm_dir}")
        result = _run_method(exp, spec["reward_model"], spec["seeds"][0], start.directory,
                             files, spec, rm_dir)  # fmt: skip
        if result.stopped_by:
            log(f"stopped by {result.stopped_by}; rerun the same command to continue")
            return []
    for method in spec["methods"]:
        runs[method] = []
        for seed in spec["seeds"][:1] if method in spec["one_seed"] else spec["seeds"]:
            run_dir = os.path.join(workdir, method, f"seed_{seed}")
            log(f"== {method}, seed {seed} -> {run_dir}")
            result = _run_method(exp, method, seed, start.directory, files, spec, run_dir)
            if result.stopped_by:
                log(f"stopped by {result.stopped_by}; rerun the same command to continue")
                return []
            runs[method].append(run_dir)

    model, base_params, _ = load_model(start.directory)
    scorer = make_scorer((spec["data"] or {}).get("scorer") or _scorer_name(exp, spec))
    selector = reward_model_selector(rm_dir, start.tokenizer, start.eval_prompts) if rm_dir else None

    def evaluate(run_dir: str) -> dict:
        name = os.path.relpath(run_dir, workdir).replace(os.sep, "_")

        def compute():
            _, params, _ = load_model(run_dir)
            return evaluate_policy(
                model, params, start.tokenizer, start.eval_prompts, scorer,
                num_samples=spec["eval_samples"], ks=sorted({1, spec["eval_samples"]}),
                reference_params=base_params, slices=start.slices, per_prompt=True, seed=0,
                selector=selector,
            )  # fmt: skip

        log(f"evaluating {name} on {len(start.eval_prompts)} held-out problems")
        return cached(_eval_path(workdir, name, "custom" if rm_dir else "verifier"), compute)

    reports = {method: [evaluate(d) for d in dirs] for method, dirs in runs.items()}
    rows = summarize(reports, spec, start.eval_prompts, start.slices)
    write_json(os.path.join(workdir, "results.json"), rows)
    table = format_table(rows, spec["eval_samples"])
    write_atomic(os.path.join(workdir, "results.md"), table + "\n")
    plot(rows, spec["eval_samples"], os.path.join(workdir, "results.png"))
    log(table)
    return rows


def _eval_path(workdir: str, name: str, selector: str) -> str:
    """WORKDIR/eval/<name>.json; an evaluation made with another bon@k selector (the
    reward model added or removed since) is removed, to be made again."""
    path = os.path.join(workdir, "eval", f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f).get("bon_selector") != selector:
                os.remove(path)
    return path


def _check_spec(spec: dict) -> dict:
    if not spec["methods"]:
        raise config_lib.ConfigError("the study has no methods; list get_config stages in methods")
    if not spec["seeds"]:
        raise config_lib.ConfigError("the study has no seeds; give seeds, e.g. (0, 1)")
    for field in ("one_seed", "method_data", "targets", "claims", "comparisons"):
        unknown = sorted(set(spec[field]) - set(spec["methods"]))
        if unknown:
            raise config_lib.ConfigError(f"{field} names {unknown}, which are not methods")
    if spec["reward_model"] in spec["methods"]:
        raise config_lib.ConfigError(
            f"reward_model={spec['reward_model']!r} is also a method; a reward model is not a "
            "policy, list it only as reward_model"
        )
    unknown = sorted(set(spec["comparisons"].values()) - set(spec["methods"]))
    if unknown:
        raise config_lib.ConfigError(f"comparisons name {unknown}, which are not methods")
    bad = {m: f for m, f in spec["method_data"].items() if f not in DATA_FILES}
    if bad:
        raise config_lib.ConfigError(f"method_data {bad}: use one of {DATA_FILES}")
    if spec["method_data"] and not spec["data"]:
        raise config_lib.ConfigError("method_data needs the data stage: set data={...}")
    if spec["data"] is not None:
        unknown = sorted(set(spec["data"]) - set(DATA_DEFAULTS))
        if unknown:
            raise config_lib.ConfigError(f"data fields {unknown}; valid: {sorted(DATA_DEFAULTS)}")
        spec["data"] = {**DATA_DEFAULTS, **spec["data"]}
        d = spec["data"]
        if not 2 <= d["num_samples"] <= d["num_candidates"]:
            raise config_lib.ConfigError(
                f"data num_samples={d['num_samples']} must lie in [2, num_candidates="
                f"{d['num_candidates']}]: pairs need two responses, RSO accepts from the candidates"
            )
    labels = {GREEDY, PASS1, f"pass@{spec['eval_samples']}"}
    bad = {m: t for m, t in spec["targets"].items() if t not in labels}
    if bad:
        raise config_lib.ConfigError(f"targets {bad}: use one of {sorted(labels)}")
    return spec


def _scorer_name(exp, spec) -> str:
    """The verifier of the first rl method (rl-study without a data stage)."""
    for method in spec["methods"]:
        cfg = exp.load(method)
        if "rl" in cfg:
            return cfg.rl.scorer
    return DATA_DEFAULTS["scorer"]


def _run_method(exp, method: str, seed: int, base_dir: str, files: dict, spec: dict, run_dir):
    """One method's run from the start policy: `rl`, `align` or `train` by its config."""
    from lm_align.align.config import POLICY_GRADIENT_LOSSES, resolved_format

    extra = [f"train.seed={seed}"]
    cfg = exp.load(method)
    data = spec["method_data"].get(method)
    if "rl" in cfg:
        from lm_align.align.rl import rl as runner

        extra += [f"rl.policy_checkpoint={base_dir}", "rl.eval_prompts=0"]
    elif "align" in cfg:
        from lm_align.align.trainer import align as runner

        fmt = resolved_format(cfg.align)
        data = data or {"pairwise": "pairs", "listwise": "lists", "samples": "samples"}[fmt]
        extra += [f"align.policy_checkpoint={base_dir}", f"align.train_file={files[data]}",
                  "align.eval_prompts=0", "align.eval_at_start=false"]  # fmt: skip
        if cfg.align.loss in POLICY_GRADIENT_LOSSES:
            extra.append("align.format=samples")
    else:
        from lm_align.train.loop import train as runner

        extra += [f"train.init_from={base_dir}"]
        if data:  # supervised on a file of the data stage; else the experiment's own data
            extra += [f"data.source=jsonl:{files[data]}", "data.jsonl_prompt_field=prompt",
                      "data.jsonl_completion_field=completion", "data.completion_only_loss=true",
                      "train.answer_eval_examples=0"]  # fmt: skip
    if data and data not in files:
        raise config_lib.ConfigError(f"method {method!r} needs the data stage's {data} file")
    return runner(exp.load(method, extra), run_dir)


def _data_stage(workdir: str, start, d: dict) -> dict[str, str]:
    """WORKDIR/data/<name>.jsonl for each of DATA_FILES (made once); their paths."""
    from lm_align.align import datagen
    from lm_align.align.experiment import task_prompts
    from lm_align.align.rso import rso_pairs
    from lm_align.align.setup import load_model
    from lm_align.data.preference import write_records
    from lm_align.data.scorers import make_scorer, score_lists
    from lm_align.sampling import sample_texts

    out = os.path.join(workdir, "data")
    paths = {name: os.path.join(out, f"{name}.jsonl") for name in DATA_FILES}
    stats_path = os.path.join(out, "stats.json")
    if os.path.exists(stats_path):  # written last
        log(f"data: {out} exists, reused")
        return paths
    model, params, cfg = load_model(start.directory)
    prompts, _ = task_prompts(cfg.data, "train", d["num_prompts"])
    n = len(prompts)
    log(f"data: {d['num_candidates']} samples of each of {n} train prompts")
    candidates = sample_texts(
        model, params, start.tokenizer, prompts, num_samples=d["num_candidates"],
        max_new_tokens=d["max_new_tokens"], temperature=d["temperature"], top_k=d["top_k"],
        seed=d["seed"],
    ).responses  # fmt: skip
    rewards = score_lists(make_scorer(d["scorer"]), prompts, candidates)
    grades = score_lists(make_scorer(d["label_scorer"]), prompts, candidates)
    first = [c[: d["num_samples"]] for c in candidates]
    first_rewards = [r[: d["num_samples"]] for r in rewards]
    first_grades = [g[: d["num_samples"]] for g in grades]
    soft_t, pairing = d["soft_label_temperature"], d["pairing"]
    pairs, pair_stats = datagen.build_pairwise(
        prompts, first, first_rewards, method=pairing, soft_label_temperature=soft_t,
        seed=d["seed"], label_scores=first_grades,
    )  # fmt: skip
    rso, rso_stats = rso_pairs(
        prompts, candidates, rewards, num_accept=d["num_samples"], beta=d["rso_beta"],
        pairing=pairing, seed=d["seed"], soft_label_temperature=soft_t, label_scores=grades,
    )  # fmt: skip
    lists, list_stats = datagen.build_listwise(prompts, first, first_grades, seed=d["seed"])
    samples, kept = [], []
    for prompt, responses, r in zip(prompts, first, first_rewards, strict=True):
        samples.append({"prompt": prompt, "responses": list(responses), "rewards": r.tolist()})
        good = [x for x, ok in zip(responses, r > 0.5, strict=True) if ok and x.strip()]
        kept += [{"prompt": prompt, "completion": x} for x in good[: d["max_per_problem"]]]
    chosen = list({(p.prompt, p.chosen): None for p in pairs})
    os.makedirs(out, exist_ok=True)
    write_jsonl(paths["samples"], samples)
    write_records(pairs, paths["pairs"])
    write_records(rso, paths["rso_pairs"])
    write_records(lists, paths["lists"])
    write_jsonl(paths["kept"], kept)
    write_jsonl(paths["chosen"], [{"prompt": p, "completion": c} for p, c in chosen])
    stats = {
        "prompts": n, "sample_accuracy": float(np.mean(np.concatenate(first_rewards) > 0.5)),
        "pairs": pair_stats.as_dict(), "rso_pairs": rso_stats.as_dict(),
        "lists": list_stats.as_dict(), "kept": len(kept), "chosen": len(chosen),
    }  # fmt: skip
    write_json(stats_path, stats)
    log(
        f"data: sampled accuracy {stats['sample_accuracy']:.3f}; {len(pairs)} pairs, "
        f"{len(rso)} RSO pairs, {len(lists)} lists, {len(kept)} verified, {len(chosen)} chosen"
    )
    return paths


def metrics(k: int) -> tuple[str, ...]:
    """The per-problem metrics of the table: greedy accuracy, pass@1, pass@k."""
    return (GREEDY, PASS1, f"pass@{k}")


def _per_prompt(reports: list[dict], label: str, index=None) -> np.ndarray:
    """A per-problem metric averaged over a method's seeds, [P] (or the `index` subset)."""
    key = {GREEDY: "greedy_correct", PASS1: "sample_accuracy"}.get(label, label)
    values = np.mean([np.asarray(r["per_prompt"][key], np.float64) for r in reports], axis=0)
    return values if index is None else values[index]


def summarize(reports: dict[str, list[dict]], spec: dict, prompts, slices) -> list[dict]:
    """One row per method: means, per-seed values, intervals of the change over the base."""
    k = spec["eval_samples"]
    base = reports["base"]
    groups = {"all": None}
    if slices is not None:
        for name in sorted({name for p in prompts for name in slices(p)}):
            idx = np.asarray([i for i, p in enumerate(prompts) if name in slices(p)])
            if 0 < len(idx) < len(prompts):
                groups[name] = idx
    rows = []
    for method, runs in reports.items():
        row: dict[str, Any] = {
            "method": method,
            "seeds": len(runs),
            f"bon_likelihood@{k}": float(np.mean([r[f"bon_likelihood@{k}"] for r in runs])),
            f"bon_rm@{k}": (float(np.mean([r[f"bon@{k}"] for r in runs]))
                            if spec["reward_model"] else None),
            "kl": float(np.mean([r.get("kl", 0.0) for r in runs])),
        }
        for label in metrics(k):
            row[label] = float(np.mean(_per_prompt(runs, label)))
            row[f"{label} per seed"] = [float(np.mean(_per_prompt([r], label))) for r in runs]
            if method == "base":
                continue
            for group, idx in groups.items():
                if group != "all" and label != GREEDY:
                    continue
                ci = paired_bootstrap(
                    _per_prompt(runs, label, idx), _per_prompt(base, label, idx),
                    num_resamples=spec["num_resamples"],
                )  # fmt: skip
                suffix = "" if group == "all" else f" [{group}]"
                row[f"delta {label}{suffix}"] = ci._asdict()
        if method != "base":
            row["target"] = spec["targets"].get(method, GREEDY)
            row["improves"] = row[f"delta {row['target']}"]["lo"] > 0
            row["claim"] = spec["claims"].get(method, "")
        rows.append(row)
    for row in rows:  # the paired change of a method over another on its target metric
        other = spec["comparisons"].get(row["method"])
        if other:
            label = row["target"]
            ci = paired_bootstrap(_per_prompt(reports[row["method"]], label),
                                  _per_prompt(reports[other], label),
                                  num_resamples=spec["num_resamples"])  # fmt: skip
            row["comparison"] = {"over": other, "metric": label, **ci._asdict()}
    return rows


def _opt(x) -> str:
    return "" if x is None else f"{x:.3f}"


def _ci(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def format_table(rows: list[dict], k: int) -> str:
    """Markdown: each metric with its change over the base, KL, target, claim; slices."""
    labels = metrics(k)
    head = " | ".join(f"{m} | change [95% CI]" for m in labels)
    lines = [
        f"| method | seeds | {head} | bon@{k} likelihood | bon@{k} reward model | KL to base | "
        "target improves | paper's claim |",
        "|---|---:|" + "---:|---|" * len(labels) + "---:|---:|---:|---|---|",
    ]
    for r in rows:
        base = r["method"] == "base"
        cells = []
        for m in labels:
            value = f"{r[m]:.3f}"
            if m == GREEDY and r["seeds"] > 1:
                value += " (" + ", ".join(f"{x:.3f}" for x in r[f"{m} per seed"]) + ")"
            cells += [value, "" if base else _ci(r[f"delta {m}"])]
        verdict = "" if base else f"{'yes' if r['improves'] else 'no'} ({r['target']})"
        lines.append(
            f"| {r['method']} | {r['seeds']} | " + " | ".join(cells)
            + f" | {r[f'bon_likelihood@{k}']:.3f} | {_opt(r.get(f'bon_rm@{k}'))} | "
            + f"{r['kl']:.3f} | {verdict} | "
            + f"{r.get('claim', '')} |"
        )
    compared = [r for r in rows if "comparison" in r]
    if compared:
        lines += ["", "| method | over | metric | change [95% CI] |", "|---|---|---|---|"]
        for r in compared:
            c = r["comparison"]
            lines.append(f"| {r['method']} | {c['over']} | {c['metric']} | {_ci(c)} |")
    slice_keys = sorted({key for r in rows for key in r if key.startswith(f"delta {GREEDY} [")})
    if slice_keys:
        lines += ["", "| method | " + " | ".join(s[6:] for s in slice_keys) + " |",
                  "|---|" + "---|" * len(slice_keys)]  # fmt: skip
        for r in rows:
            if r["method"] != "base":
                lines.append(f"| {r['method']} | " + " | ".join(_ci(r[s]) for s in slice_keys) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], k: int, path: str) -> None:
    """Bars: each method's change in every metric over the base, with 95% intervals;
    methods whose target improves in blue, the others gray."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r for r in rows if r["method"] != "base"]
    labels = metrics(k)
    width = max(4.5, 0.45 * len(methods) + 1.5)
    fig, axes = plt.subplots(len(labels), 1, figsize=(width, 2.6 * len(labels)), sharex=True)
    x = np.arange(len(methods))
    for ax, label in zip(np.atleast_1d(axes), labels, strict=True):
        cis = [r[f"delta {label}"] for r in methods]
        means = np.asarray([c["mean"] for c in cis])
        err = np.asarray([[c["mean"] - c["lo"] for c in cis], [c["hi"] - c["mean"] for c in cis]])
        colors = ["tab:blue" if c["lo"] > 0 else "tab:gray" for c in cis]
        ax.bar(x, means, yerr=err, capsize=3, color=colors)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel(f"change in\n{label}")
    ax.set_xticks(x, [r["method"] for r in methods], rotation=35, ha="right")
    fig.suptitle("change over the start policy (95% paired-bootstrap intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
