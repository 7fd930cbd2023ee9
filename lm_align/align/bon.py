"""BoN-aware fine-tuning vs baselines: `lm-align bon --config experiments/bon_arithmetic.py`.

Chow et al. 2024, "Inference-Aware Fine-Tuning for Best-of-N Sampling in Large
Language Models" (arXiv:2412.15287), binary-reward RL and imitation variants.
From one start policy:

  samples  N responses per train problem from the start policy, each with its
           binary verifier reward -> WORKDIR/samples.jsonl ("samples" format)
  methods  one `lm-align align` run per loss on those samples
           (`lm_align.losses.policy_gradient`): `bon_rlb_p` (BoN-RLB(P):
           correct samples weighted by gbar+(P_fail)), `bon_rlb` (BoN-RLB:
           also a negative weight on incorrect samples), `bon_aware_sft`
           (the paper's BoN-SFT: likelihood of the best of N under the
           variational BoN policy), `bon_imitation` (the same under the exact
           binary-verifier BoN policy), `reinforce` (the same samples, weights
           r - mean r, no BoN weighting) and `bon_sft` (SFT on the verifier's
           best of N); further rounds resample from each method's own policy
  eval     on held-out problems (distinct problems on arithmetic), before and
           after: greedy accuracy (and per slice), pass@1, pass@N, bon@N with
           the verifier as the selector (the BoN policy the paper trains for)
           and bon_likelihood@N with the model's own mean token log-prob as
           the selector (no verifier at test time)

The experiment file provides `get_config("base")` (the start policy, unless
`base_checkpoint`), `get_config("<method>")` (an align config) and
`get_bon(arg)` (the fields of `DEFAULTS`). Every stage resumes.
"""

from __future__ import annotations

import os
from typing import Any

from lm_align.data.scorers import make_scorer, score_lists
from lm_align.sampling import sample_texts
from lm_align.utils import log, write_atomic, write_json, write_jsonl

DEFAULTS: dict[str, Any] = {
    "methods": ("bon_rlb_p", "bon_rlb", "bon_aware_sft", "bon_imitation", "reinforce", "bon_sft"),
    "rounds": 1,  # sample -> train rounds per method (round r samples from round r-1's policy)
    "base_checkpoint": "",
    "num_problems": 1024,
    "num_samples": 8,  # N: samples per problem, and the N of BoN
    "temperature": 1.0,  # on-policy samples (sample_texts' default distribution)
    "top_k": 0,
    "max_new_tokens": 8,
    "scorer": "arithmetic_exact",
    "eval_problems": 512,
    "seed": 0,
}


def write_samples(model, params, tokenizer, prompts, scorer, spec, path, seed) -> dict:
    """Samples N responses per prompt, scores them, writes a "samples" file.

    `sample_texts` at the spec's temperature and top-k with seed `seed`; one
    line `{"prompt", "responses" [N], "rewards" [N]}` per prompt. Returns the
    problem count and the sampled accuracy (reward > 0.5).
    """
    responses_PN = sample_texts(
        model, params, tokenizer, prompts, num_samples=spec["num_samples"],
        max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"],
        top_k=spec["top_k"], seed=seed,
    ).responses  # fmt: skip
    rows, correct = [], []
    rewards_PN = score_lists(scorer, prompts, responses_PN)
    for prompt, responses, rewards in zip(prompts, responses_PN, rewards_PN, strict=True):
        rows.append({"prompt": prompt, "responses": responses, "rewards": rewards.tolist()})
        correct += (rewards > 0.5).tolist()
    write_jsonl(path, rows)
    return {"problems": len(prompts), "sample_accuracy": sum(correct) / len(correct)}


def run_bon(config_path: str, workdir: str, overrides=()) -> list[dict]:
    from lm_align.align.experiment import evaluate_run, open_experiment, start_policy
    from lm_align.align.setup import load_model
    from lm_align.align.trainer import align

    exp = open_experiment(config_path, "get_bon", DEFAULTS, overrides, "lm_align/align/bon.py")
    spec = exp.spec
    os.makedirs(workdir, exist_ok=True)
    start = start_policy(exp, workdir, eval_problems=spec["eval_problems"], log=log)
    base_dir, tokenizer, train_src = start.directory, start.tokenizer, start.train_source
    scorer = make_scorer(spec["scorer"])
    N = spec["num_samples"]
    ks = sorted({1, N})

    def evaluate(run_dir, out_path, label):
        report = evaluate_run(
            run_dir, out_path, start, scorer, num_samples=N, ks=ks,
            max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"],
            top_k=spec["top_k"], seed=spec["seed"],
        )  # fmt: skip
        log(
            f"{label}: greedy {report['greedy_accuracy']:.3f}, pass@{N} "
            f"{report[f'pass@{N}']:.3f}, bon@{N} (verifier) {report[f'bon@{N}']:.3f}, "
            f"bon_likelihood@{N} {report[f'bon_likelihood@{N}']:.3f}"
        )
        return report

    start_eval = evaluate(base_dir, os.path.join(workdir, "start_eval.json"), "start")
    rows = [{"method": "start", **start_eval}]
    for method in spec["methods"]:
        policy_dir = base_dir
        for r in range(1, spec["rounds"] + 1):
            round_dir = os.path.join(workdir, method, f"round_{r}")
            os.makedirs(round_dir, exist_ok=True)
            samples_path = os.path.join(round_dir, "samples.jsonl")
            if not os.path.exists(samples_path):
                model, params, _ = load_model(policy_dir)
                first = (r - 1) * spec["num_problems"]
                prompts = [train_src[first + j]["prompt"] for j in range(spec["num_problems"])]
                stats = write_samples(
                    model, params, tokenizer, prompts, scorer, spec, samples_path,
                    seed=spec["seed"] + r,
                )  # fmt: skip
                write_json(os.path.join(round_dir, "samples_stats.json"), stats)
            run_dir = os.path.join(round_dir, "train")
            cfg = exp.load(
                method,
                [
                    f"align.loss={method}",
                    "align.format=samples",
                    f"align.train_file={samples_path}",
                    f"align.policy_checkpoint={policy_dir}",
                ],
            )
            log(f"== {method}, round {r} -> {run_dir}")
            result = align(cfg, run_dir)
            if result.stopped_by:
                log(f"stopped by {result.stopped_by}; rerun the same command to continue")
                return rows
            policy_dir = run_dir
        report = evaluate(policy_dir, os.path.join(workdir, method, "eval.json"), method)
        rows.append({"method": method, **report})
    write_json(os.path.join(workdir, "results.json"), rows)
    table = format_table(rows, N)
    write_atomic(os.path.join(workdir, "results.md"), table + "\n")
    log(table)
    return rows


def format_table(rows: list[dict], n: int) -> str:
    """Markdown: greedy accuracy, pass@1, pass@n, bon@n (verifier), bon_likelihood@n, ECE."""
    cols = ["greedy_accuracy", "pass@1", f"pass@{n}", f"bon@{n}", f"bon_likelihood@{n}", "ece"]
    labels = {f"bon@{n}": f"bon@{n} verifier", f"bon_likelihood@{n}": f"bon@{n} likelihood"}
    lines = [
        "| method | " + " | ".join(labels.get(c, c.replace("_", " ")) for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)
