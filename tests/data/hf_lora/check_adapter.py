"""Check a PEFT adapter lm_align wrote against the merged model it stands for, using peft.

Usage (with the separate torch + transformers + peft venv; the project's tests never run this)::

    /work/hfref/bin/python tests/data/hf_lora/check_adapter.py BASE_DIR ADAPTER_DIR MERGED_DIR

BASE_DIR and MERGED_DIR are Hugging Face checkpoints (e.g. `lm-align hf export`
of a LoRA run's base and of the run itself), ADAPTER_DIR the run's
`lm-align hf export --peft`. Loads ``PeftModel.from_pretrained(base, adapter)``
(unmerged: x W + s (x A) B) and the merged checkpoint with transformers, runs
both on random token ids and prints the max |logit diff| relative to max
|logit|; exits 1 above ``--tol`` (default 1e-4), 2 if the adapter does not
load cleanly (keys missing or unexpected) or changes nothing.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base_dir")
    parser.add_argument("adapter_dir")
    parser.add_argument("merged_dir")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    # Imported here, not at module level: pytest (--doctest-modules) imports this
    # file in the project's venv, which has none of them.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def load(path):
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        ).eval()

    base, merged = load(args.base_dir), load(args.merged_dir)
    ids = torch.as_tensor(np.random.default_rng(0).integers(3, base.config.vocab_size, (2, 24)))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.numpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = PeftModel.from_pretrained(base, args.adapter_dir).eval()
    key_warnings = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    if key_warnings:
        print(f"FAIL: {args.adapter_dir} did not load cleanly: {key_warnings}")
        return 2
    with torch.no_grad():
        got = adapted(input_ids=ids).logits.numpy()
        want = merged(input_ids=ids).logits.numpy()
    scale = np.abs(want).max()
    rel = np.abs(got.astype(np.float64) - want).max() / scale
    moved = np.abs(base_logits - want).max() / scale
    print(f"{args.adapter_dir}: PEFT (unmerged) vs {args.merged_dir}: max |diff| / max |logit| = "
          f"{rel:.3g}; the adapter moves the logits by {moved:.3g}")  # fmt: skip
    if moved < 10 * args.tol:
        print("FAIL: the adapter does not change the model")
        return 2
    return 0 if rel <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
