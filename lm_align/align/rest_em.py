"""ReST-EM self-training: `lm-align rest-em --config experiments/rest_em_arithmetic.py`.

Singh et al. 2024, "Beyond Human Data: Scaling Self-Training for Problem-Solving
with Language Models" (arXiv:2312.06585). For iterations i = 1..I:

  E-step  sample `num_samples` solutions per train problem from the current
          policy (base for i = 1, else iteration i-1's model) at `temperature`
          and `top_k`; keep those the binary verifier accepts, at most
          `max_per_problem` per problem.
  M-step  fine-tune FROM THE BASE checkpoint (not the previous iteration) on
          the kept samples, next-token loss on the completions only.
  eval    greedy accuracy, sampled accuracy and pass@k on the held-out split.

The experiment file provides `get_config("base")` (training of the base
policy, skipped when `base_checkpoint` is given), `get_config("mstep")` (the
fine-tuning run; its data source is set to the kept samples and
`train.init_from` to the base) and `get_rest_em(arg)` (the fields of
`DEFAULTS`). Layout of WORKDIR:

  base/                       the base policy (unless base_checkpoint)
  base_eval.json
  iter_<i>/samples.jsonl      every sample with its reward
  iter_<i>/kept.jsonl         {"prompt", "completion"} kept for the M-step
  iter_<i>/estep.json         E-step counts (kept, problems solved, ...)
  iter_<i>/train/             the M-step run (resumable like any train run)
  iter_<i>/eval.json
  results.json, results.md    one row per iteration

Each file is written once, complete (temporary name, then rename), so an
interrupted run restarted with the same command continues from the first
missing piece, inside an iteration too (the M-step resumes from its own
checkpoints).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from lm_align import config as config_lib
from lm_align.data.scorers import SCORERS, make_scorer, score_lists
from lm_align.sampling import sample_texts
from lm_align.utils import log, write_atomic, write_json, write_jsonl

DEFAULTS: dict[str, Any] = {
    "iterations": 3,
    "base_checkpoint": "",  # '' = train get_config("base") in WORKDIR/base
    "num_problems": 2048,  # train-split problems sampled in each E-step
    "num_samples": 8,  # solutions sampled per problem
    "temperature": 0.7,  # the paper's E-step sampling (sample_texts default: 1.0, no top-k)
    "top_k": 40,
    "max_new_tokens": 8,
    "max_per_problem": 10,  # kept correct samples per problem (cap)
    "scorer": "arithmetic_exact",  # binary verifier (lm_align.data.scorers.SCORERS)
    "eval_problems": 512,  # held-out problems
    "eval_samples": 8,  # samples per held-out problem for pass@k
    "seed": 0,
}


def check_spec(spec: dict) -> dict:
    spec = {**DEFAULTS, **spec}
    for name in ("iterations", "num_problems", "num_samples", "max_per_problem"):
        if spec[name] < 1:
            raise config_lib.ConfigError(f"rest_em {name}={spec[name]} must be >= 1")
    if spec["scorer"] not in SCORERS:
        raise config_lib.ConfigError(
            f"rest_em scorer={spec['scorer']!r}; use one of {sorted(SCORERS)}"
        )
    return spec


def e_step(model, params, tokenizer, prompts, scorer, spec, seed: int) -> tuple[list, list, dict]:
    """(all samples with rewards, kept {"prompt", "completion"} rows, counts).

    Samples `num_samples` responses per prompt (`sample_texts` at the spec's
    temperature and top-k, seed `seed`) and keeps, per prompt, the first
    `max_per_problem` non-blank ones that `scorer` accepts (score > 0.5).
    """
    responses_PN = sample_texts(
        model, params, tokenizer, prompts, num_samples=spec["num_samples"],
        max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"],
        top_k=spec["top_k"], seed=seed,
    ).responses  # fmt: skip
    samples, kept, solved = [], [], 0
    for prompt, responses, rewards in zip(
        prompts, responses_PN, score_lists(scorer, prompts, responses_PN), strict=True
    ):
        samples += [
            {"prompt": prompt, "response": r, "reward": float(x)}
            for r, x in zip(responses, rewards, strict=True)
        ]
        good = [r for r, x in zip(responses, rewards, strict=True) if x > 0.5 and r.strip()]
        solved += bool(good)
        kept += [{"prompt": prompt, "completion": r} for r in good[: spec["max_per_problem"]]]
    counts = {
        "problems": len(prompts),
        "samples": len(samples),
        "sample_accuracy": float(np.mean([x["reward"] > 0.5 for x in samples])),
        "problems_solved": solved,
        "kept": len(kept),
    }
    return samples, kept, counts


def run_rest_em(config_path: str, workdir: str, overrides=()) -> list[dict]:
    """Runs (or resumes) every iteration; returns the result rows."""
    from lm_align.align.experiment import evaluate_run, open_experiment, start_policy
    from lm_align.train.loop import train

    exp = open_experiment(
        config_path, "get_rest_em", DEFAULTS, overrides, "lm_align/align/rest_em.py"
    )
    spec = check_spec(exp.spec)
    os.makedirs(workdir, exist_ok=True)
    start = start_policy(exp, workdir, eval_problems=spec["eval_problems"], log=log)
    base_dir = start.directory
    scorer = make_scorer(spec["scorer"])
    ks = sorted({1, spec["eval_samples"] // 2 or 1, spec["eval_samples"]})

    def evaluate(run_dir, out_path, label):
        report = evaluate_run(
            run_dir, out_path, start, scorer, num_samples=spec["eval_samples"], ks=ks,
            max_new_tokens=spec["max_new_tokens"], seed=spec["seed"],
        )  # fmt: skip
        log(
            f"{label}: greedy accuracy {report['greedy_accuracy']:.3f}, sampled "
            f"{report['sample_accuracy']:.3f}, pass@{ks[-1]} {report[f'pass@{ks[-1]}']:.3f}"
        )
        return report

    rows = [{"iteration": 0, **evaluate(base_dir, os.path.join(workdir, "base_eval.json"), "base")}]
    policy_dir = base_dir
    for i in range(1, spec["iterations"] + 1):
        it_dir = os.path.join(workdir, f"iter_{i}")
        os.makedirs(it_dir, exist_ok=True)
        counts = _e_step_once(it_dir, i, policy_dir, start, scorer, spec)
        m_dir = os.path.join(it_dir, "train")
        kept_path = os.path.join(it_dir, "kept.jsonl")
        cfg = exp.load(
            "mstep",
            [
                f"data.source=jsonl:{kept_path}",
                "data.jsonl_prompt_field=prompt",
                "data.jsonl_completion_field=completion",
                "data.completion_only_loss=true",
                f"train.init_from={base_dir}",
                "train.answer_eval_examples=0",
            ],
        )
        log(f"== iteration {i}: M-step from the base -> {m_dir}")
        result = train(cfg, m_dir)
        if result.stopped_by:
            log(f"stopped by {result.stopped_by}; rerun the same command to continue")
            return rows
        report = evaluate(m_dir, os.path.join(it_dir, "eval.json"), f"iteration {i}")
        rows.append({"iteration": i, "kept": counts["kept"], **report})
        policy_dir = m_dir
    write_json(os.path.join(workdir, "results.json"), rows)
    table = format_table(rows, ks)
    write_atomic(os.path.join(workdir, "results.md"), table + "\n")
    log(table)
    return rows


def _e_step_once(it_dir: str, i: int, policy_dir: str, start, scorer, spec: dict) -> dict:
    """Iteration i's E-step from `policy_dir`, written once to `it_dir`
    (samples.jsonl, kept.jsonl, estep.json, in that order); its counts."""
    from lm_align.align.setup import load_model

    estep_path = os.path.join(it_dir, "estep.json")
    if not os.path.exists(estep_path):
        log(f"== iteration {i}: E-step, sampling from {policy_dir}")
        model, params, _ = load_model(policy_dir)
        # Problems differ between iterations: a fresh slice of the train split.
        first = (i - 1) * spec["num_problems"]
        prompts = [start.train_source[first + j]["prompt"] for j in range(spec["num_problems"])]
        samples, kept, counts = e_step(
            model, params, start.tokenizer, prompts, scorer, spec, seed=spec["seed"] + i
        )
        if not kept:
            raise RuntimeError(
                f"iteration {i}: no sample was correct ({counts}); start from a stronger "
                "base policy or sample more (num_samples)"
            )
        write_jsonl(os.path.join(it_dir, "samples.jsonl"), samples)
        write_jsonl(os.path.join(it_dir, "kept.jsonl"), kept)
        write_json(estep_path, counts)
    with open(estep_path) as f:
        counts = json.load(f)
    log(
        f"iteration {i}: kept {counts['kept']} of {counts['samples']} samples, "
        f"{counts['problems_solved']}/{counts['problems']} problems solved"
    )
    return counts


def format_table(rows: list[dict], ks) -> str:
    cols = ["greedy_accuracy", "sample_accuracy", *[f"pass@{k}" for k in ks]]
    lines = [
        "| iteration | kept samples | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
        "|---|---:|" + "---:|" * len(cols),
    ]
    for r in rows:
        name = "base" if r["iteration"] == 0 else str(r["iteration"])
        cells = [f"{r[c]:.3f}" for c in cols]
        lines.append(f"| {name} | {r.get('kept', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
