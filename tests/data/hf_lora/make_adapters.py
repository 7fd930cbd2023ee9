"""Regenerate the PEFT LoRA adapters in this directory, with their reference logits.

Each ``tests/data/hf_lora/<name>/`` holds a LoRA adapter written by the real
``peft`` (the oracle) for one of the tiny Hugging Face checkpoints
(``shared/fixtures/hf`` or ``tests/data/hf``), in other ranks, scales and
target modules than the shared ``llama_lora`` fixture:

- ``adapter_config.json`` and ``adapter_model.safetensors`` as
  ``PeftModel.save_pretrained`` writes them (``base_model_name_or_path`` is the
  base fixture's name);
- ``reference.npz``: ``input_ids`` [2, 24] (the base fixture's) and ``logits``
  [2, 24, V] float32, the adapted model's forward pass computed by PEFT with
  the adapters unmerged (x W + s (x A) B, float32, eager attention).

lora_A and lora_B are drawn at random (B is zero at PEFT's init, which would
make the adapter a no-op); the script prints how far each adapter moves the
logits from the base model's, so a loader that drops an adapter fails the
tests' 1e-4 tolerance by orders of magnitude.

This script needs ``torch``, ``transformers`` and ``peft``, which the project
and its tests never import. They live in a separate virtual environment::

    /work/hfref/bin/pip install peft
    /work/hfref/bin/python tests/data/hf_lora/make_adapters.py [NAME ...]

The committed files were produced with peft 0.21.2, transformers 5.25.0 and
torch 2.14.1 (CPU). Output is deterministic for those versions (fixed seed per
adapter).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
BASES = {
    "shared": os.path.join(os.path.dirname(REPO), "shared", "fixtures", "hf"),
    "data": os.path.join(REPO, "tests", "data", "hf"),
}

# name: (base fixture, r, lora_alpha, use_rslora, target_modules, seed, std of lora_B)
SPECS = {
    "qwen3_all_linear": ("qwen3", 8, 16, False, ["q_proj", "k_proj", "v_proj", "o_proj",
                         "gate_proj", "up_proj", "down_proj"], 1, 0.05),
    "gemma2_rslora_mlp_o": ("gemma2", 2, 4, True, ["o_proj", "up_proj", "down_proj"], 2, 0.3),
    "gpt2_fused_qkv": ("gpt2", 3, 6, False, ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], 3,
                       0.1),
    "gpt2_odd_qkv_down": ("gpt2_odd", 4, 8, True, ["c_attn", "mlp.c_proj"], 4, 0.1),
    "llama_mqa_tied_k_gate": ("llama_mqa_tied", 5, 10, False, ["k_proj", "gate_proj"], 5, 0.1),
    "llama_linear_rope_fused_qv_down": ("llama_linear_rope", 6, 3, False,
                                        ["q_proj", "v_proj", "down_proj"], 6, 0.2),
    "mistral_window_q_lm_head": ("mistral_window", 2, 2, False, ["q_proj", "lm_head"], 7, 0.2),
    "qwen2_bias_qkv": ("qwen2_bias", 1, 2, False, ["q_proj", "k_proj", "v_proj"], 8, 0.3),
}  # fmt: skip


def base_dir(name: str) -> str:
    for root in BASES.values():
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    raise FileNotFoundError(name)


def make(name: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, r, alpha, rslora, targets, seed, b_std = SPECS[name]
    path = base_dir(base)
    ref = np.load(os.path.join(path, "reference.npz"))
    ids = torch.as_tensor(ref["input_ids"], dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits.numpy()
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                        lora_dropout=0.0, task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in sorted(peft_model.named_parameters()):
            if "lora_A" in key:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))
            elif "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)
        logits = peft_model(input_ids=ids).logits.numpy()
    out = os.path.join(HERE, name)
    os.makedirs(out, exist_ok=True)
    peft_model.peft_config["default"].base_model_name_or_path = base
    peft_model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))
    np.savez_compressed(os.path.join(out, "reference.npz"), input_ids=ref["input_ids"],
                        logits=logits.astype(np.float32))  # fmt: skip
    moved = np.abs(logits - base_logits).max() / np.abs(logits).max()
    with open(os.path.join(out, "adapter_config.json")) as f:
        written = json.load(f)
    written["target_modules"] = sorted(written["target_modules"])  # PEFT writes a set's order
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(written, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"{name}: base {base}, r={r}, alpha={alpha}, rslora={rslora}, targets "
          f"{written['target_modules']}; the adapter moves the logits by {moved:.3g} "
          "(relative to max |logit|)")  # fmt: skip


def main(argv):
    import peft
    import torch
    import transformers

    print(
        f"peft {peft.__version__}, transformers {transformers.__version__}, torch {torch.__version__}"
    )
    for name in argv or list(SPECS):
        make(name)
    total = sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(HERE) for f in files
    )
    print(f"{HERE}: {total:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
