"""`lm-align align` (preference training) and `lm-align preferences` (data from samples).

    lm-align align --config experiments/align_arithmetic.py:dpo --workdir runs/dpo
    lm-align align-study --config experiments/align_arithmetic.py --workdir runs/align_arithmetic
    lm-align preferences --policy runs/sft --out runs/prefs/train.jsonl \\
        --num-prompts 512 --num-samples 8 --format pairs --pairing first_round
"""

from __future__ import annotations

import json
import os
import sys

from lm_align.distributed import add_process_flags
from lm_align.utils import write_json

PAIRINGS = ("first_round", "tournament", "best_worst", "all")


def _add_stages_parser(subparsers, name: str, getter: str, fn, help: str) -> None:
    p = subparsers.add_parser(name, help=help)
    p.add_argument("--config", required=True, help=f"experiment file with {getter}(), [:arg]")
    p.add_argument("--workdir", help="directory (default runs/<experiment>[_<arg>])")
    p.set_defaults(fn=fn)


def add_parsers(subparsers) -> None:
    """Registers `align` and `preferences` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "align", help="preference training (DPO, IPO, SLiC-HF, RSO, LiPO, ...) or a reward model"
    )
    p.add_argument("--config", required=True, help="experiment file with an `align` group, [:arg]")
    p.add_argument("--workdir", help="run directory (default runs/<experiment>[_<arg>])")
    add_process_flags(p)
    p.set_defaults(fn=cmd_align)

    p = subparsers.add_parser(
        "rl", help="online RL with verifiable rewards (GRPO, Dr. GRPO, DAPO, RLOO)"
    )
    p.add_argument("--config", required=True, help="experiment file with an `rl` group, [:arg]")
    p.add_argument("--workdir", help="run directory (default runs/<experiment>[_<arg>])")
    p.set_defaults(fn=cmd_rl)

    _add_stages_parser(
        subparsers, "rl-study", "get_rl_study", cmd_rl_study,
        "online RL algorithms x seeds vs continued SFT from one policy, paired 95% intervals",
    )  # fmt: skip

    _add_stages_parser(
        subparsers, "align-study", "get_study", cmd_align_study,
        "preference, self-training and BoN-aware methods x seeds from one policy, paired 95% "
        "intervals",
    )  # fmt: skip

    _add_stages_parser(
        subparsers, "rest-em", "get_rest_em", cmd_rest_em,
        "ReST-EM self-training: sample, keep verified, fine-tune from the base",
    )  # fmt: skip

    _add_stages_parser(
        subparsers, "bon", "get_bon", cmd_bon,
        "BoN-aware RL vs REINFORCE vs SFT on best-of-N, from one policy",
    )  # fmt: skip

    _add_eval_parser(subparsers)
    _add_preferences_parser(subparsers)


def _add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="greedy accuracy, pass@k, bon@k (verifier) and bon_likelihood@k, ECE, "
        "length, KL of a policy; per-slice accuracy on arithmetic",
    )
    p.add_argument("--policy", required=True, help="workdir/checkpoint of the policy")
    p.add_argument("--reference", help="workdir/checkpoint of a reference (adds the KL)")
    p.add_argument("--split", default="eval", help="split of the policy's data source")
    p.add_argument(
        "--prompts-from",
        help="take prompts from this run's data source instead (e.g. the base policy's task "
        "when the policy was fine-tuned on a file of its own samples)",
    )
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument(
        "--distinct",
        action="store_true",
        help="arithmetic: --num-prompts distinct problems of the split (each once, uniform "
        "over problems) instead of its first records, which repeat short problems",
    )
    p.add_argument("--num-samples", type=int, default=8, help="samples per prompt (pass@k)")
    p.add_argument("--ks", default="1,4,8", help="comma-separated k for pass@k and bon@k")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument(
        "--scorer",
        default="arithmetic_exact",
        help="verifier: arithmetic_exact, arithmetic_graded, or 'reference' (exact match with "
        "the data source's own completion, e.g. kg_facts answers)",
    )
    p.add_argument(
        "--selector",
        help="reward-model workdir that picks the best of k for bon@k (default: the verifier, "
        "--scorer; bon_likelihood@k always uses the policy's own mean token log-prob)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="also write the JSON report here")
    p.set_defaults(fn=cmd_eval)


def _add_preferences_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "preferences",
        help="sample K responses per prompt from a policy, score, write pairs or lists",
    )
    p.add_argument("--policy", required=True, help="workdir/checkpoint of the sampling policy")
    p.add_argument("--out", required=True, help="output JSON Lines file")
    p.add_argument("--split", default="train", help="split of the policy's data source")
    p.add_argument("--num-prompts", type=int, default=256, help="prompts read from the split")
    p.add_argument("--offset", type=int, default=0, help="first prompt index in the split")
    p.add_argument("--num-samples", type=int, default=8, help="responses sampled per prompt")
    p.add_argument("--max-new-tokens", type=int, default=8, help="generation budget")
    p.add_argument("--format", default="pairs", choices=("pairs", "lists"))
    p.add_argument("--pairing", default="first_round", choices=PAIRINGS)
    p.add_argument(
        "--scorer",
        default="arithmetic_exact",
        help="verifier name (arithmetic_exact, arithmetic_graded) or a reward-model workdir",
    )
    p.add_argument(
        "--label-scorer", help="scorer for soft labels / list labels (default: --scorer)"
    )
    p.add_argument(
        "--soft-label-temperature",
        type=float,
        help="pairs: p = sigmoid((s_w - s_l) / T); omit for hard labels",
    )
    p.add_argument("--max-pairs-per-prompt", type=int)
    p.add_argument(
        "--rso-accept",
        type=int,
        help="RSO: accept this many of each prompt's --num-samples candidates by statistical "
        "rejection sampling, then pair the accepted ones (pairs format)",
    )
    p.add_argument("--rso-beta", type=float, default=0.5, help="RSO sampling beta")
    p.add_argument(
        "--direct",
        action="store_true",
        help="direct pairs: the source's reference completion as chosen, one wrong sample "
        "(scorer <= 0.5) as rejected (pairs format; needs prompt/completion records)",
    )
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_preferences)


def _default_workdir(config_arg: str) -> str:
    path, _, variant = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}_{variant}" if variant else name)


def _run_trainer(command: str, trainer, args, overrides) -> int:
    """Runs `trainer(cfg, workdir)` on the command line's config: exit 2 on bad data or a
    missing file, 3 on a non-finite loss (a bad config: `lm_align.cli`, exit 2)."""
    from lm_align import config as config_lib
    from lm_align.data import DataError
    from lm_align.train import NonFiniteLossError

    cfg = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
    workdir = args.workdir or _default_workdir(args.config)
    print(f"lm-align {command}: {args.config} -> {workdir}", flush=True)
    try:
        result = trainer(cfg, workdir)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not result.stopped_by:
        print(f"finished {result.final_step} steps; workdir {workdir}", flush=True)
    return 0


def cmd_align(args, overrides) -> int:
    from lm_align.align.trainer import align

    return _run_trainer("align", align, args, overrides)


def cmd_rl(args, overrides) -> int:
    from lm_align.align.rl import rl

    return _run_trainer("rl", rl, args, overrides)


def _run_stages(command: str, run, args, overrides) -> int:
    """Runs a multi-stage command `run(config, workdir, overrides)`; clear errors, exit 2."""
    from lm_align.data import DataError

    workdir = args.workdir or _default_workdir(args.config)
    print(f"lm-align {command}: {args.config} -> {workdir}", flush=True)
    try:
        run(args.config, workdir, overrides)
    except (DataError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_align_study(args, overrides) -> int:
    from lm_align.align.study import run_study

    return _run_stages("align-study", run_study, args, overrides)


def cmd_rest_em(args, overrides) -> int:
    from lm_align.align.rest_em import run_rest_em

    return _run_stages("rest-em", run_rest_em, args, overrides)


def cmd_rl_study(args, overrides) -> int:
    from lm_align.align.study import run_study

    def run(config, workdir, overrides):
        return run_study(config, workdir, overrides, getter="get_rl_study")

    return _run_stages("rl-study", run, args, overrides)


def cmd_bon(args, overrides) -> int:
    from lm_align.align.bon import run_bon

    return _run_stages("bon", run_bon, args, overrides)


def cmd_eval(args, overrides) -> int:
    from lm_align import data as data_lib
    from lm_align.align.experiment import reward_model_selector
    from lm_align.align.policy_eval import evaluate_policy
    from lm_align.align.setup import load_model
    from lm_align.data.arithmetic import ArithmeticTask, problem_slices
    from lm_align.data.scorers import SCORERS, make_scorer, reference_scorer

    try:
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        print(f"error: --ks={args.ks!r}; give integers like 1,4,8", file=sys.stderr)
        return 2
    if args.scorer not in (*SCORERS, "reference"):
        print(
            f"error: --scorer={args.scorer!r}; use one of {sorted(SCORERS)} or 'reference'",
            file=sys.stderr,
        )
        return 2
    try:
        model, params, cfg = load_model(args.policy)
        ref = load_model(args.reference)[1] if args.reference else None
        tokenizer = data_lib.make_tokenizer(cfg.data.tokenizer)
        if args.prompts_from:
            from lm_align.train.checkpoint import resolve, saved_config

            cfg = saved_config(resolve(args.prompts_from))
        source = data_lib.make_source(cfg.data, args.split)
        task = getattr(source, "task", None)
        if args.distinct and not isinstance(task, ArithmeticTask):
            raise ValueError(f"--distinct needs an arithmetic source, not {cfg.data.source!r}")
        if args.distinct:
            records = task.distinct_problems(args.split, args.num_prompts)
        else:
            records = [source[i] for i in range(min(args.num_prompts, len(source)))]
        prompts = [r["prompt"] for r in records]
        scorer = reference_scorer(records) if args.scorer == "reference" else make_scorer(args.scorer)
        selector = (
            reward_model_selector(args.selector, tokenizer, prompts) if args.selector else None
        )
        report = evaluate_policy(
            model, params, tokenizer, prompts, scorer,
            num_samples=args.num_samples, ks=ks, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, seed=args.seed, reference_params=ref,
            selector=selector or "verifier",
            slices=problem_slices if isinstance(task, ArithmeticTask) else None,
        )  # fmt: skip
        if args.selector:
            report["bon_selector"] = "reward_model"
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.data.source == "kg_facts":  # every eval question is about a fact seen in training
        report["hallucination_rate"] = 1.0 - report["greedy_accuracy"]
    report = {"policy": args.policy, "source": cfg.data.source, "split": args.split, **report}
    if args.out:
        write_json(args.out, report)
    if args.json:
        print(json.dumps(report))
    else:
        width = max(map(len, report))
        for k, v in report.items():
            print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return 0


def _scorer(spec: str, tokenizer, max_len: int):
    from lm_align.data.scorers import SCORERS, make_scorer

    if spec in SCORERS:
        return make_scorer(spec)
    if os.path.isdir(spec):
        from lm_align.align.reward import RewardModel, reward_model_scorer
        from lm_align.align.setup import load_model

        model, params, _ = load_model(spec)
        if not isinstance(model, RewardModel):
            raise ValueError(f"--scorer {spec} is a policy checkpoint, not a reward model")
        return reward_model_scorer(model, params, tokenizer, max_len=max_len)
    raise ValueError(
        f"--scorer {spec!r} is neither a verifier ({sorted(SCORERS)}) nor a reward-model workdir"
    )


def _check_preference_args(args) -> str | None:
    """The first problem with `lm-align preferences`' numeric flags, or None."""
    for name in ("num_prompts", "num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')}={getattr(args, name)}; use 1 or more"
    if args.format == "pairs" and args.num_samples < 2:
        return "--num-samples must be >= 2 to form pairs"
    if args.rso_accept and (args.format != "pairs" or not 2 <= args.rso_accept <= args.num_samples):
        return (
            f"--rso-accept={args.rso_accept} needs --format pairs and 2 <= it <= "
            f"--num-samples={args.num_samples}"
        )
    return None


def _make_records(args, model, params, tokenizer, records, prompts, scorer, label_scorer):
    """(records, stats) by the method the flags choose: direct, RSO or sample-and-rank."""
    from lm_align.align import datagen

    sampling_args = {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
    }  # fmt: skip
    if args.direct:
        from lm_align.align.direct import direct_preferences

        golds = [records[args.offset + i]["completion"] for i in range(len(prompts))]
        return direct_preferences(
            model, params, tokenizer, prompts, golds, scorer=scorer,
            num_samples=args.num_samples, **sampling_args,
        )  # fmt: skip
    if args.rso_accept:
        from lm_align.align.rso import rso_preferences

        return rso_preferences(
            model, params, tokenizer, prompts, scorer=scorer, num_candidates=args.num_samples,
            num_accept=args.rso_accept, beta=args.rso_beta, pairing=args.pairing,
            soft_label_temperature=args.soft_label_temperature, **sampling_args,
        )  # fmt: skip
    return datagen.make_preferences(
        model, params, tokenizer, prompts, scorer=scorer, label_scorer=label_scorer,
        num_samples=args.num_samples, format=args.format, pairing=args.pairing,
        soft_label_temperature=args.soft_label_temperature,
        max_pairs_per_prompt=args.max_pairs_per_prompt, **sampling_args,
    )  # fmt: skip


def cmd_preferences(args, overrides) -> int:
    from lm_align import data as data_lib
    from lm_align.align.setup import load_model
    from lm_align.data.preference import write_records

    problem = _check_preference_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        model, params, cfg = load_model(args.policy)
        tokenizer = data_lib.make_tokenizer(cfg.data.tokenizer)
        records = data_lib.make_source(cfg.data, args.split)
        n = min(args.num_prompts, len(records) - args.offset)
        prompts = [records[args.offset + i]["prompt"] for i in range(n)]
        max_len = max(cfg.data.seq_len, 64)
        scorer = _scorer(args.scorer, tokenizer, max_len)
        label_scorer = _scorer(args.label_scorer, tokenizer, max_len) if args.label_scorer else None
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out, stats = _make_records(
        args, model, params, tokenizer, records, prompts, scorer, label_scorer
    )
    if not out:
        print(
            f"error: no preference records: every prompt's {args.num_samples} samples scored "
            "the same; sample more (--num-samples) or use a policy whose accuracy is between "
            "0 and 1",
            file=sys.stderr,
        )
        return 1
    write_records(out, args.out)
    summary = {"policy": args.policy, "out": args.out, **stats.as_dict()}
    write_json(os.path.splitext(args.out)[0] + ".stats.json", summary)
    print(
        f"wrote {len(out)} {args.format} from {len(prompts)} prompts x {args.num_samples} samples "
        f"to {args.out}; mean sample score {stats.mean_score:.3f}, prompts with a record "
        f"{stats.fraction_with_records:.2f}",
        flush=True,
    )
    return 0
