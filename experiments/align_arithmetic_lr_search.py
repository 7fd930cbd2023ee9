"""The learning-rate search behind `LEARNING_RATES` of experiments/align_arithmetic.py.

    python experiments/align_arithmetic_lr_search.py --study runs/align_study \
        --methods dpo,ipo --lrs 1e-5,3e-5,1e-4 --out runs/lr_search

For each method and learning rate: one run (seed 0) from the study's start
policy on the study's data (`--study`: a workdir of `lm-align align-study
--config experiments/align_arithmetic.py`, its base and data stages finished),
evaluated on validation problems: distinct train-split problems after the
ones the data stage sampled, so neither the data nor the held-out problems of
the study's table. Prints each run's change over the start policy in greedy
accuracy, pass@1 and pass@8 with 95% paired-bootstrap intervals, and, per
method, the learning rate with the largest change in its target metric. A
finished run or evaluation is read back.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from lm_align import data as data_lib
from lm_align.align import study
from lm_align.align.evaluation import paired_bootstrap
from lm_align.align.experiment import cached, open_experiment, task_prompts
from lm_align.align.policy_eval import evaluate_policy
from lm_align.align.setup import load_model
from lm_align.data.scorers import make_scorer

EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "align_arithmetic.py")
KEYS = (("greedy_correct", "greedy accuracy"), ("sample_accuracy", "pass@1"), ("pass@8", "pass@8"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, help="align-study workdir (base and data done)")
    p.add_argument("--methods", required=True, help="comma-separated methods of the study")
    p.add_argument("--lrs", default="1e-5,3e-5,1e-4", help="comma-separated learning rates")
    p.add_argument("--validation-problems", type=int, default=512)
    p.add_argument("--out", required=True, help="directory for the runs and evaluations")
    args = p.parse_args(argv)

    exp = open_experiment(EXPERIMENT, "get_study", study.DEFAULTS, [], EXPERIMENT)
    spec = study._check_spec(exp.spec)
    files = {name: os.path.join(args.study, "data", f"{name}.jsonl") for name in study.DATA_FILES}
    base_dir = os.path.join(args.study, "base")
    model, base_params, cfg = load_model(base_dir)
    tokenizer = data_lib.make_tokenizer(cfg.data.tokenizer)
    first = spec["data"]["num_prompts"]
    prompts = task_prompts(cfg.data, "train", first + args.validation_problems)[0][first:]
    scorer = make_scorer(spec["data"]["scorer"])
    os.makedirs(args.out, exist_ok=True)

    def evaluate(params, path):
        return cached(path, lambda: evaluate_policy(
            model, params, tokenizer, prompts, scorer, num_samples=8, ks=[1, 8],
            reference_params=base_params, per_prompt=True, seed=0,
        ))  # fmt: skip

    base = evaluate(base_params, os.path.join(args.out, "base_validation.json"))["per_prompt"]
    for method in args.methods.split(","):
        target = {"greedy accuracy": "greedy_correct", "pass@1": "sample_accuracy"}.get(
            spec["targets"].get(method, "greedy accuracy"), "pass@8"
        )
        best = None
        for lr in [float(x) for x in args.lrs.split(",")]:
            run_dir = os.path.join(args.out, f"{method}_lr{lr:g}")
            lr_exp = open_experiment(
                EXPERIMENT, "get_study", study.DEFAULTS,
                ["train.progress=false", f"optimizer.lr={lr}", "optimizer.end_lr=0"], EXPERIMENT,
            )  # fmt: skip
            study._run_method(lr_exp, method, 0, base_dir, files, spec, run_dir)
            report = evaluate(load_model(run_dir)[1], run_dir + "_validation.json")
            cells = []
            for key, label in KEYS:
                ci = paired_bootstrap(np.asarray(report["per_prompt"][key], np.float64),
                                      np.asarray(base[key], np.float64))  # fmt: skip
                cells.append(f"{label} {ci.mean:+.3f} [{ci.lo:+.3f}, {ci.hi:+.3f}]")
                if key == target and (best is None or ci.mean > best[1]):
                    best = (lr, ci.mean)
            print(f"{method} lr {lr:g}: " + ", ".join(cells) + f", KL {report['kl']:.2f}",
                  flush=True)  # fmt: skip
        print(f"{method}: best lr {best[0]:g} ({target} {best[1]:+.3f})", flush=True)


if __name__ == "__main__":
    main()
