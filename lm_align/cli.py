"""`lm-align` command line.

    lm-align train [--config experiments/default.py[:arg]] [--workdir DIR] [--config.group.field=value ...]
    lm-align bench [--config experiments/bench.py] [--steps N] [--json] [--config.group.field=value ...]
    lm-align bench --data-only [--config ...] [--batches N] [--json]      # input pipeline alone
    lm-align tokenizer train [--config ...] --vocab-size N --output PREFIX [--max-documents M]
    lm-align coordcheck [--config ...] [--widths 64,128,256,512] [--steps N] [--out PNG] [--json]
    lm-align sweep --config experiments/x.py[:arg] --workdir DIR [--parallel N] [--max-runs N] [--dry-run] [--config.group.field=value ...]
    lm-align align --config experiments/x.py[:arg] [--workdir DIR] [--config.group.field=value ...]
    lm-align align-study --config experiments/align_arithmetic.py[:quick] [--workdir DIR]
    lm-align preferences --policy RUN --out FILE.jsonl [--num-prompts N] [--num-samples K] ...
    lm-align rest-em --config experiments/rest_em_arithmetic.py[:quick] [--workdir DIR]
    lm-align bon --config experiments/bon_arithmetic.py[:quick] [--workdir DIR]
    lm-align eval --policy RUN [--reference RUN] [--num-samples N] [--ks 1,4,8] [--json]
    lm-align sample --policy RUN --prompt TEXT [--prompt TEXT ...] [--prompts-file F] [--num-samples N] [--temperature T] [--top-k K] [--top-p P] [--greedy] [--max-new-tokens N] [--seed S] [--json]
    lm-align hf import HF_MODEL_DIR --workdir RUN [--dtype float32] [--scan-layers] [--adapter PEFT_DIR] [--force]
    lm-align hf export RUN --out DIR [--step N] [--max-shard-bytes B] [--peft] [--force]
    lm-align launch local --num-processes N [--devices-per-process K] -- <command> ...
    lm-align launch tpu [--dry-run] [--skip-fit-check] --name NAME --accelerator TYPE --zone ZONE [--num-slices N] -- <command> ...
    lm-align compile --topology v5e:4x4 [--num-slices N] --config experiments/x.py[:arg] [--mfu 0.4] [--json] [--config.group.field=value ...]
    lm-align plot --sweep DIR [--x optimizer.lr] [--group KEY] [--compare KEY] [--metric eval_loss] [--out DIR]

`train` and `align` run as one of several processes (one per host) when
given --coordinator/--num-processes/--process-id, the LM_ALIGN_* environment
variables `launch local` sets, or on a multi-host Cloud TPU VM
(`lm_align.distributed`).

`compile` compiles an experiment's step for a TPU topology on this host
(libtpu, the `tpu` extra): per-chip memory and whether it fits, FLOPs, a
roofline bound and the collectives (docs/tpu_compile.md). `launch tpu` and
`sweep --executor tpu` run the same compile before creating any TPU.

`sample` prints completions of any run's policy (trained here or imported);
`hf import` writes a Hugging Face checkpoint directory as a run that every
command taking a run accepts, and `hf export` writes a run's parameters back
as a Hugging Face checkpoint (docs/checkpoints.md).

Without --config, `train` runs experiments/default.py's config (a small model
on the built-in arithmetic task).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lm_align.align.commands import add_parsers as add_align_parsers
from lm_align.aot.commands import add_parser as add_compile_parser
from lm_align.aot.commands import fit_check
from lm_align.coordcheck import add_parser as add_coordcheck_parser
from lm_align.distributed import add_process_flags
from lm_align.launch.commands import add_parsers as add_launch_parsers
from lm_align.sweeps.commands import add_parsers as add_sweep_parsers
from lm_align.train.commands import add_parsers as add_train_parsers

DEFAULT_EXPERIMENT = "default"


def _load(args, overrides, default_name: str):
    """(config, spec) of `--config` (or experiments/<default_name>.py) with the overrides."""
    from lm_align import config as config_lib

    return config_lib.load_experiment(args.config, overrides, default=default_name)


def _default_workdir(config_arg: str) -> str:
    """runs/<experiment>[_<variant>] for `experiments/<experiment>.py[:<variant>]`."""
    path, _, variant = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}_{variant}" if variant else name)


def _cmd_train(args, overrides) -> int:
    from lm_align.train import NonFiniteLossError, train

    cfg, path = _load(args, overrides, DEFAULT_EXPERIMENT)
    workdir = args.workdir or _default_workdir(path)
    print(f"lm-align train: {os.path.relpath(path)} -> {workdir}", flush=True)
    try:
        result = train(cfg, workdir)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if result.stopped_by:
        return 0
    m = result.metrics
    lines = [f"finished {result.final_step} steps; workdir {workdir}"]
    if "eval_loss" in m:
        lines.append(
            f"final eval loss {m['eval_loss']:.4f} nats/token (unigram baseline "
            f"{m['unigram_baseline_loss']:.4f}), token accuracy {m['eval_accuracy']:.3f}"
        )
    if "answer_exact_match" in m:
        lines.append(
            f"held-out exact match (greedy answer after '=') "
            f"{m['answer_exact_match']:.3f} on {m['answer_examples']} problems"
        )
        lines += [f"  {s}" for s in m.get("samples", [])]
    print("\n".join(lines), flush=True)
    return 0


def _cmd_bench(args, overrides) -> int:
    from lm_align.bench import run_align_bench, run_bench, run_data_bench
    from lm_align.data import DataError

    if args.data_only and args.batches < 1:
        print(f"error: --batches={args.batches}; time at least 1 batch", file=sys.stderr)
        return 2
    cfg, _ = _load(args, overrides, "bench")
    try:
        if args.data_only:
            report = run_data_bench(cfg, batches=args.batches)
        elif "align" in cfg:  # a preference step (e.g. experiments/bench_dpo.py)
            report = run_align_bench(cfg, steps=args.steps, warmup=args.warmup)
        else:
            report = run_bench(cfg, steps=args.steps, warmup=args.warmup)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        width = max(map(len, report))
        for k, v in report.items():
            print(
                f"{k:<{width}}  {v:,.4g}" if isinstance(v, (int, float)) else f"{k:<{width}}  {v}"
            )
    return 0


def _tokenizer_training_texts(source, max_documents: int):
    """Texts of `max_documents` records spread evenly over `source` (prompt and
    completion count as two texts)."""
    n = min(len(source), max_documents)
    for i in range(n):
        record = source[i * len(source) // n]
        if "text" in record:
            yield record["text"]
        else:
            yield record["prompt"]
            yield record["completion"]


def _cmd_tokenizer_train(args, overrides) -> int:
    from lm_align import data as data_lib

    cfg, path = _load(args, overrides, DEFAULT_EXPERIMENT)
    try:
        data_lib.config.check(cfg.data)
        source = data_lib.make_source(cfg.data, "train")
        tok = data_lib.train_sentencepiece(
            _tokenizer_training_texts(source, args.max_documents),
            args.output,
            args.vocab_size,
            model_type=args.model_type,
            byte_fallback=args.byte_fallback,
        )
    except data_lib.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = os.path.abspath(tok.model_path)
    shown = os.path.relpath(path)
    shown = path if shown.startswith("..") else shown
    print(
        f"wrote {model} (vocab_size {tok.vocab_size}; pad/bos/eos/unk = "
        f"{tok.pad_id}/{tok.bos_id}/{tok.eos_id}/{tok.unk_id}) from "
        f"{min(len(source), args.max_documents)} documents of the train split of "
        f"{cfg.data.source!r}",
        flush=True,
    )
    print(
        "train with it:\n"
        f"  lm-align train --config {shown} "
        f"--config.data.tokenizer=sentencepiece:{model} --config.model.vocab_size={tok.vocab_size}",
        flush=True,
    )
    return 0


def start_processes(args) -> None:
    """Initialises jax.distributed when this process is one of several; watches for
    host maintenance on Cloud TPU."""
    from lm_align import distributed

    spec = distributed.resolve(
        getattr(args, "coordinator", None),
        getattr(args, "num_processes", None),
        getattr(args, "process_id", None),
    )
    distributed.initialize(spec)
    if distributed.should_watch_maintenance(spec):
        distributed.watch_maintenance()


def main(argv=None) -> int:
    from lm_align import config as config_lib
    from lm_align.distributed import DistributedError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        overrides, rest = config_lib.parse_override_args(argv)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="lm-align", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) an experiment")
    p.add_argument(
        "--config", help="experiment file, optionally with :arg (default experiments/default.py)"
    )
    p.add_argument("--workdir", help="run directory (default runs/<experiment name>)")
    add_process_flags(p)
    p.set_defaults(fn=_cmd_train)
    p = sub.add_parser("bench", help="measure step time, tokens/s, MFU, compile time, memory")
    p.add_argument("--config", help="experiment file (default experiments/bench.py)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--data-only",
        action="store_true",
        help="time the train-split input pipeline alone (examples/s, tokens/s)",
    )
    p.add_argument("--batches", type=int, default=50, help="--data-only: timed batches")
    p.set_defaults(fn=_cmd_bench)
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = p.add_subparsers(dest="tokenizer_command", required=True)
    p = tok_sub.add_parser(
        "train", help="train a SentencePiece model on the configured source's train split"
    )
    p.add_argument(
        "--config",
        help="experiment file whose data config is read (default experiments/default.py)",
    )
    p.add_argument(
        "--vocab-size", type=int, required=True, help="pieces in the model, specials included"
    )
    p.add_argument(
        "--output", required=True, help="model prefix: writes PREFIX.model and PREFIX.vocab"
    )
    p.add_argument(
        "--max-documents",
        type=int,
        default=100_000,
        help="documents read, spread evenly over the train split",
    )
    p.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "char", "word"))
    p.add_argument(
        "--byte-fallback",
        action="store_true",
        help="encode unseen characters as UTF-8 byte pieces instead of unk",
    )
    p.set_defaults(fn=_cmd_tokenizer_train)
    add_sweep_parsers(sub, fit_check=fit_check)
    add_coordcheck_parser(sub)
    add_train_parsers(sub)
    add_align_parsers(sub)
    add_compile_parser(sub)
    add_launch_parsers(sub, fit_check=fit_check)
    args = parser.parse_args(rest)
    try:
        if args.command not in ("launch", "compile"):
            start_processes(args)
        return args.fn(args, overrides)
    except (config_lib.ConfigError, DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
