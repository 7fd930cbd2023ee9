"""`lm-align sample` (completions from any run) and `lm-align hf import|export`.

    lm-align sample --policy runs/sft --prompt "12+7=" --num-samples 4 --temperature 0.7
    lm-align sample --policy runs/llama --prompts-file prompts.jsonl --max-new-tokens 32 --json
    lm-align hf import path/to/hf-model --workdir runs/llama [--dtype bfloat16] [--scan-layers] [--adapter PEFT_DIR]
    lm-align hf export runs/dpo --out dpo-hf [--step 600]
    lm-align hf export runs/lora_dpo --out dpo-peft --peft        # a LoRA run's adapters, for PEFT

`sample` feeds each prompt as ``[bos] + encode(prompt)`` to the one sampler
(`lm_align.sampling.sample_texts`) and prints each completion with its
log-probability under the policy. A prompts file holds one prompt per line,
or, named ``*.jsonl``, one JSON object per line with a ``"prompt"`` field.
"""

from __future__ import annotations

import json
import os
import sys

from lm_align.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P

DEFAULT_MAX_NEW_TOKENS = 64
DTYPES = ("float32", "bfloat16", "float16")  # of the imported parameters


def add_parsers(subparsers) -> None:
    """Registers `sample` and `hf` (import, export) on an argparse subparsers object."""
    _add_sample_parser(subparsers)
    p = subparsers.add_parser("hf", help="Hugging Face checkpoints: import as a run, export a run")
    hf_sub = p.add_subparsers(dest="hf_command", required=True)
    p = hf_sub.add_parser("import", help="write a Hugging Face checkpoint directory as a run")
    p.add_argument("path", help="model directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--workdir", required=True, help="the run directory to write")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter and compute dtype")
    p.add_argument(
        "--scan-layers", action="store_true", help="stack the layers (model.scan_layers=true)"
    )
    p.add_argument(
        "--adapter", help="a PEFT LoRA adapter directory for the model, merged into its weights"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --workdir")
    p.set_defaults(fn=cmd_hf_import)
    p = hf_sub.add_parser("export", help="write a run's parameters as a Hugging Face checkpoint")
    p.add_argument("run", help="workdir, its checkpoints/ directory or one step directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest intact one)")
    p.add_argument(
        "--max-shard-bytes", type=int, help="split the weights into files of at most this size"
    )
    p.add_argument(
        "--peft",
        action="store_true",
        help="a LoRA run: write its adapters as a PEFT adapter instead of the merged model",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.set_defaults(fn=cmd_hf_export)


def _add_sample_parser(subparsers) -> None:
    p = subparsers.add_parser("sample", help="print completions of prompts from a run's policy")
    p.add_argument("--policy", required=True, help="workdir/checkpoint of the policy")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument(
        "--prompts-file", help="one prompt per line, or *.jsonl with a 'prompt' field per line"
    )
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="0: every token")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="1: no nucleus cut")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores the above)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_sample)


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """`prompts` followed by those of `prompts_file` (blank lines skipped).

    Raises ValueError when the file is missing or malformed, or no prompt is given.
    """
    out = list(prompts)
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise ValueError(f"--prompts-file {prompts_file} does not exist")
        jsonl = prompts_file.endswith(".jsonl")
        with open(prompts_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                out.append(_jsonl_prompt(line, f"{prompts_file}:{n}") if jsonl else line)
    if not out:
        raise ValueError(
            "no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE"
            + (f" ({prompts_file} holds none)" if prompts_file else "")
        )
    return out


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{where}: not JSON ({e}); a .jsonl prompts file holds one object per line"
        )
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f'{where}: expected an object with a string "prompt" field, got {line!r}')
    return record["prompt"]


def _check_sample_args(args) -> str | None:
    """The first problem with `lm-align sample`'s numeric flags, or None."""
    from lm_align.sampling import check_settings

    for name in ("max_new_tokens", "num_samples"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')}={getattr(args, name)}; use 1 or more"
    if not args.greedy:
        try:
            check_settings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        except ValueError as e:
            return f"{e} (flags --temperature, --top-k, --top-p; --greedy for argmax decoding)"
    return None


def _check_positions(model_cfg, tokenizer, prompts, max_new_tokens: int) -> None:
    """A model with a learned position table cannot decode past it."""
    from lm_align.sampling import prompt_ids

    if model_cfg.position != "learned":
        return
    longest = max(len(prompt_ids(tokenizer, p)) for p in prompts)
    if longest + max_new_tokens > model_cfg.max_len:
        raise ValueError(
            f"the longest prompt ({longest} tokens as fed, bos included if any) plus --max-new-tokens="
            f"{max_new_tokens} exceeds the model's {model_cfg.max_len} positions; shorten it "
            f"or lower --max-new-tokens to {max(model_cfg.max_len - longest, 0)}"
        )


def cmd_sample(args, overrides) -> int:
    from lm_align import data as data_lib
    from lm_align import parallel
    from lm_align.sampling import sample_texts
    from lm_align.train.checkpoint import resolve
    from lm_align.train.load import load_run

    try:
        problem = _check_sample_args(args)
        if problem:
            raise ValueError(problem)
        prompts = read_prompts(args.prompt, args.prompts_file)
        ref = resolve(args.policy)
        model, params, cfg = load_run(ref.path)
        tokenizer = data_lib.make_tokenizer(cfg.data.tokenizer)
        _check_positions(model.cfg, tokenizer, prompts, args.max_new_tokens)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = {
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "greedy": args.greedy, "max_new_tokens": args.max_new_tokens,
        "num_samples": args.num_samples, "seed": args.seed,
    }  # fmt: skip
    s = sample_texts(model, params, tokenizer, prompts, mesh=parallel.make_mesh(cfg.mesh),
                     **settings)  # fmt: skip
    results = [
        {"prompt": p, "completions": s.responses[i], "logps": s.logps[i].tolist(),
         "num_tokens": s.lengths[i].tolist()}
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    if args.json:
        report = {"policy": args.policy, "checkpoint": ref.path, "step": ref.step, **settings}
        print(json.dumps({**report, "results": results}, ensure_ascii=False))
        return 0
    how = "greedy" if args.greedy else (
        f"temperature {args.temperature}, top_k {args.top_k}, top_p {args.top_p}, seed {args.seed}"
    )  # fmt: skip
    print(f"{ref.path} (step {ref.step}); {how}; up to {args.max_new_tokens} new tokens")
    for i, r in enumerate(results, 1):
        print(f"prompt {i}: {json.dumps(r['prompt'], ensure_ascii=False)}")
        for j, (text, logp, n) in enumerate(zip(r["completions"], r["logps"], r["num_tokens"]), 1):
            print(f"  {j}: {json.dumps(text, ensure_ascii=False)}  (log p {logp:.3f}, {n} tokens)")
    return 0


def cmd_hf_import(args, overrides) -> int:
    import resource
    import time

    from lm_align.train.hf_runs import import_checkpoint

    start = time.perf_counter()
    try:
        r = import_checkpoint(
            args.path, args.workdir, dtype=args.dtype, scan_layers=args.scan_layers,
            force=args.force, adapter=args.adapter,
        )  # fmt: skip
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = r.model
    print(
        f"imported {args.path}{f' with the adapter {args.adapter} merged' if args.adapter else ''} "
        f"-> {r.workdir}: {r.num_params:,} params, {m['n_layers']} layers, "
        f"d_model {m['d_model']}, vocab {m['vocab_size']}, {m['param_dtype']}\n"
        f"checkpoint {r.checkpoint}\ndata.tokenizer {r.tokenizer}\n"
        f"took {time.perf_counter() - start:.1f} s; peak host memory (RSS, memory-mapped "
        f"checkpoint pages included) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB",
        flush=True,
    )
    if r.tokenizer_files:
        print(f"tokenizer files: {', '.join(r.tokenizer_files)}")
    else:
        print(
            f"note: {args.path} has no tokenizer.json; the run's data.tokenizer is "
            f"{r.tokenizer!r}: set --config.data.tokenizer where you use the run"
        )
    print(
        f"use it: lm-align sample --policy {r.workdir} --prompt TEXT; "
        f"--config.train.init_from={r.workdir}; --config.align.policy_checkpoint={r.workdir} "
        f"with --config.data.tokenizer={r.tokenizer}"
    )
    return 0


def cmd_hf_export(args, overrides) -> int:
    from lm_align.train.hf_runs import export_adapter, export_run

    if args.max_shard_bytes is not None and args.max_shard_bytes < 1:
        print(f"error: --max-shard-bytes={args.max_shard_bytes}; use 1 or more", file=sys.stderr)
        return 2
    try:
        if args.peft:
            r = export_adapter(args.run, args.out, step=args.step, force=args.force)
        else:
            r = export_run(args.run, args.out, step=args.step, force=args.force,
                           max_shard_bytes=args.max_shard_bytes)  # fmt: skip
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {r.checkpoint} -> {r.out_dir}")
    for name in (*r.model_files, *r.tokenizer_files):
        size = os.path.getsize(os.path.join(r.out_dir, name))
        print(f"  {name}  ({size:,} bytes)")
    if args.peft:
        print("load it with peft.PeftModel.from_pretrained(<the base, exported>, "
              f"{json.dumps(r.out_dir)})")  # fmt: skip
    elif not r.tokenizer_files:
        print(f"note: no tokenizer files written: the run's tokenizer is {r.tokenizer!r}, not "
              "a Hugging Face tokenizer.json (hf:DIR) with files to copy")  # fmt: skip
    return 0
