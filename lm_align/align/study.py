"""`lm-align align-study`: SFT -> preference data from its own samples -> each method.

The experiment file provides

    get_config("sft")        the SFT (pretraining) config of the starting policy
    get_config("<method>")   an align config per method (policy_checkpoint and
                             train_file are filled in by the study)
    get_study(arg)           {"methods": [...], "preferences": {...}} (see below)

and the study, in WORKDIR:

    sft/                     `lm-align train` of get_config("sft")
    prefs/pairs.jsonl        pairs from the SFT policy's samples on train prompts
    prefs/lists.jsonl        lists from the same samples (for listwise losses)
    <method>/                `lm-align align` of each method from sft/
    results.json, results.md the table: held-out greedy accuracy, sample reward
                             and KL to the SFT policy, start vs each method

Every stage resumes (a finished stage is skipped), so an interrupted study
continues where it stopped. `preferences` holds the arguments of
`lm_align.align.datagen.make_preferences` plus `num_prompts` (train-split
prompts used) and `pairs_method` / `lists_max_responses`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from lm_align import config as config_lib
from lm_align import data as data_lib
from lm_align.data.preference import write_records
from lm_align.data.scorers import make_scorer, score_lists
from lm_align.sampling import sample_texts
from lm_align.utils import log, write_atomic, write_json

RESULT_KEYS = (
    ("eval_answer_exact_match", "greedy accuracy"),
    ("eval_sample_reward", "sample reward"),
    ("eval_kl", "KL to SFT"),
    ("eval_response_length", "length"),
)


def _make_preferences(workdir: str, sft_dir: str, spec: dict[str, Any]) -> dict[str, str]:
    """Writes prefs/pairs.jsonl and prefs/lists.jsonl (once); returns their paths."""
    from lm_align.align import datagen
    from lm_align.align.setup import load_model

    out_dir = os.path.join(workdir, "prefs")
    paths = {
        "pairs": os.path.join(out_dir, "pairs.jsonl"),
        "lists": os.path.join(out_dir, "lists.jsonl"),
    }
    stats_path = os.path.join(out_dir, "stats.json")
    if all(os.path.exists(p) for p in (*paths.values(), stats_path)):
        log(f"preferences: {out_dir} exists, reused")
        return paths
    model, params, cfg = load_model(sft_dir)
    tokenizer = data_lib.make_tokenizer(cfg.data.tokenizer)
    source = data_lib.make_source(cfg.data, "train")
    spec = dict(spec)
    n = min(spec.pop("num_prompts"), len(source))
    prompts = [source[i]["prompt"] for i in range(n)]
    pairs_method = spec.pop("pairs_method", "first_round")
    soft_t = spec.pop("soft_label_temperature", None)
    label_scorer = spec.pop("label_scorer", None)
    max_responses = spec.pop("lists_max_responses", None)
    scorer = make_scorer(spec.pop("scorer", "arithmetic_exact"))
    samples = sample_texts(model, params, tokenizer, prompts, **spec).responses
    scores = score_lists(scorer, prompts, samples)
    labels = score_lists(make_scorer(label_scorer), prompts, samples) if label_scorer else scores
    pairs, pair_stats = datagen.build_pairwise(
        prompts, samples, scores, method=pairs_method, soft_label_temperature=soft_t,
        label_scores=labels,
    )  # fmt: skip
    lists, list_stats = datagen.build_listwise(
        prompts, samples, labels, max_responses=max_responses
    )
    os.makedirs(out_dir, exist_ok=True)
    write_records(pairs, paths["pairs"])
    write_records(lists, paths["lists"])
    write_json(stats_path, {"pairs": pair_stats.as_dict(), "lists": list_stats.as_dict()})
    log(
        f"preferences: {len(pairs)} pairs and {len(lists)} lists from {n} prompts x "
        f"{spec['num_samples']} samples (sampled accuracy {pair_stats.mean_score:.3f}) -> {out_dir}"
    )
    return paths


def run_study(config_path: str, workdir: str, overrides: list[str] = ()) -> list[dict]:
    """Runs (or resumes) every stage; returns the result rows (also written to WORKDIR)."""
    from lm_align.align.config import LISTWISE_LOSSES
    from lm_align.align.experiment import open_experiment
    from lm_align.align.trainer import align
    from lm_align.train import train

    exp = open_experiment(config_path, "get_study", None, overrides, "lm_align/align/study.py")
    study = exp.spec
    os.makedirs(workdir, exist_ok=True)
    load = exp.load

    sft_dir = os.path.join(workdir, "sft")
    log(f"== sft -> {sft_dir}")
    train(load("sft"), sft_dir)
    files = _make_preferences(workdir, sft_dir, study["preferences"])

    rows = []
    for method in study["methods"]:
        run_dir = os.path.join(workdir, method)
        cfg = load(method)
        listwise = cfg.align.loss in LISTWISE_LOSSES
        cfg = config_lib.apply_overrides(
            cfg,
            [
                f"align.policy_checkpoint={sft_dir}",
                f"align.train_file={files['lists' if listwise else 'pairs']}",
            ],
        )
        log(f"== {method} ({cfg.align.loss}) -> {run_dir}")
        result = align(cfg, run_dir)
        if not rows:
            rows.append({"method": "SFT (start)", **_start_row(run_dir)})
        rows.append({"method": method, **{k: result.metrics.get(k) for k, _ in RESULT_KEYS}})
        if result.stopped_by:
            log(f"stopped by {result.stopped_by}; rerun the same command to continue")
            return rows
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "results.json"), rows)
        table = format_table(rows)
        write_atomic(os.path.join(workdir, "results.md"), table + "\n")
        log(table)
    return rows


def _start_row(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    return {k: first.get(k) for k, _ in RESULT_KEYS}


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the result rows."""
    head = "| method | " + " | ".join(label for _, label in RESULT_KEYS) + " |"
    lines = [head, "|---|" + "---:|" * len(RESULT_KEYS)]
    for r in rows:
        cells = ["" if r.get(k) is None else f"{r[k]:.3f}" for k, _ in RESULT_KEYS]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
