"""Check a Hugging Face checkpoint directory against a reference.npz, using transformers.

Usage (with the separate transformers+torch venv; the project's tests never run this)::

    /work/hfref/bin/python tests/data/hf/check_export.py EXPORT_DIR REFERENCE_NPZ

EXPORT_DIR is loaded with ``transformers.AutoModelForCausalLM.from_pretrained``
(float32, eager attention).  The npz must hold ``input_ids`` and ``logits``
(a full forward pass) and may hold ``prompt_ids`` and ``gen_ids`` (greedy
decoding, prompt included, EOS ignored).  Prints the max |logit diff| relative
to max |reference logit| and whether greedy generation matches; exits 1 if the
relative diff exceeds ``--tol`` (default 1e-4) or generation differs, 2 if the
directory does not load cleanly (missing or unexpected weights).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir")
    parser.add_argument("reference_npz")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    # Imported here, not at module level: pytest (--doctest-modules) imports this
    # file in the project's venv, which has neither torch nor transformers.
    import torch
    from transformers import AutoModelForCausalLM

    ref = np.load(args.reference_npz)
    model, info = AutoModelForCausalLM.from_pretrained(
        args.export_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    model.eval()
    problems = {
        k: v
        for k, v in info.items()
        if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    if problems:
        print(f"FAIL: {args.export_dir} did not load cleanly: {problems}")
        return 2

    ok = True
    input_ids = torch.as_tensor(ref["input_ids"], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float().numpy()
    want = ref["logits"]
    if logits.shape != want.shape:
        print(f"FAIL: logits shape {logits.shape} != reference {want.shape}")
        return 1
    diff = np.abs(logits.astype(np.float64) - want).max()
    rel = diff / np.abs(want).max()
    argmax_agree = float((logits.argmax(-1) == want.argmax(-1)).mean())
    status = "ok" if rel <= args.tol else "FAIL"
    print(
        f"logits: max|diff| {diff:.3e}, relative {rel:.3e} (tol {args.tol:g}), "
        f"argmax agreement {argmax_agree:.3f}: {status}"
    )
    ok &= rel <= args.tol

    if "prompt_ids" in ref and "gen_ids" in ref:
        prompt = torch.as_tensor(ref["prompt_ids"], dtype=torch.long)
        want_gen = ref["gen_ids"]
        with torch.no_grad():
            got = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=want_gen.shape[1] - prompt.shape[1],
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            ).numpy()
        same = got.shape == want_gen.shape and bool((got == want_gen).all())
        print(f"greedy generation: {'ok' if same else 'FAIL'}")
        if not same:
            print(f"  got  {got.tolist()}\n  want {want_gen.tolist()}")
        ok &= same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
