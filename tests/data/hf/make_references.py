"""Regenerate the tiny Hugging Face reference checkpoints in this directory.

Each ``tests/data/hf/<name>/`` holds a random-weight causal LM written by the
real ``transformers`` (the oracle) -- ``config.json``, ``generation_config.json``
and ``model.safetensors`` (float32) -- plus ``reference.npz`` with

- ``input_ids`` [2, 24] int32 and ``logits`` [2, 24, V] float32: one full
  forward pass (float32, eager attention, no padding, no attention mask);
- ``prompt_ids`` [2, 8] int32 and ``gen_ids`` [2, 16] int32: greedy decoding of
  8 new tokens (prompt included, EOS disabled so every row has 8 new tokens).

Weights are drawn with a larger std (0.15-0.6, see ``SPECS``) than the usual
0.02 so that logit differences are meaningful, and every 1-D parameter (norm
scales, biases) is its initial value + 0.15 * N(0, 1) (plus a constant shift for
some Gemma-2 norms), so a loader that skips one changes the logits.  Before writing, the script checks that the saved directory reloads with
no missing/unexpected keys and gives the same logits, that ``generate`` agrees
with a cache-free argmax loop, and it prints how much each config feature and
each kind of 1-D parameter moves the logits (ablations), so a fixture that
would not notice a dropped feature shows up here.

Two configs (``llama_mqa_tied`` and ``qwen2_bias``) are rewritten after saving
into the transformers 4.x layout (top-level ``rope_theta`` + ``rope_scaling``)
instead of 5.x's ``rope_parameters``; the script reloads them with transformers
and checks the logits are unchanged.

This script needs ``transformers`` and ``torch``, which the project and its
tests never import.  They live in a separate virtual environment::

    python3 -m venv /work/hfref
    /work/hfref/bin/pip install torch transformers safetensors numpy
    /work/hfref/bin/python tests/data/hf/make_references.py [NAME ...]

The committed files were produced with transformers 5.25.0, torch 2.14.1
(the PyPI +cu130 wheel, run on CPU), safetensors 0.8.0, numpy 2.4.6, Python 3.11.  Output is deterministic for a given
torch version (fixed seed per model).
"""

from __future__ import annotations

import copy
import json
import os
import sys

import numpy as np

# torch and transformers are imported by _import_oracle() (from main), not at
# module level: pytest runs with --doctest-modules over tests/, so it imports
# this file in the project's venv, which has neither.
torch = transformers = AutoModelForCausalLM = None

HERE = os.path.dirname(os.path.abspath(__file__))
SEQ_LEN = 24
PROMPT_LEN = 8
NEW_TOKENS = 8

# Each spec: transformers class name, seed, config kwargs, weight std for
# matrices (with per-name-substring overrides), an optional constant shift for
# 1-D params (per name substring), whether to write the 4.x rope layout, and
# config ablations whose effect on the logits is printed.  Seeds were picked so
# that greedy decoding is varied and never emits a bos/eos/pad id.
SPECS = {
    "llama_mqa_tied": dict(
        cls="LlamaForCausalLM",
        seed=201,
        config=dict(
            vocab_size=301,
            hidden_size=32,
            intermediate_size=80,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=12,
            tie_word_embeddings=True,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            # head_dim 12, theta 5e5: unscaled wavelengths 2*pi*5e5**(i/6) =
            # 6.3, 56, 500, 4.5e3, 4e4, 3.5e5.  original_max 64 -> high-freq
            # cutoff 64/4 = 16, low-freq cutoff 64/1 = 64, so the three llama3
            # branches are all hit: 6.3 kept, 56 smoothed, the rest divided by 8.
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        std=0.25,
        std_overrides={"embed_tokens": 0.15},
        legacy_rope=True,
        ablations={
            "rope_type default (no llama3 scaling)": dict(
                rope_parameters=dict(rope_type="default", rope_theta=500000.0)
            ),
            "llama3 original_max 16": dict(
                rope_parameters=dict(
                    rope_type="llama3",
                    rope_theta=500000.0,
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=16,
                )
            ),
            "llama3 all frequencies / factor (linear 8)": dict(
                rope_parameters=dict(rope_type="linear", rope_theta=500000.0, factor=8.0)
            ),
            "rope_theta 10000": dict(
                rope_parameters=dict(
                    rope_type="llama3",
                    rope_theta=10000.0,
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=64,
                )
            ),
        },
    ),
    "llama_linear_rope": dict(
        cls="LlamaForCausalLM",
        seed=402,
        config=dict(
            vocab_size=263,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=False,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
        ),
        std=0.15,
        ablations={
            "rope_type default (no linear scaling)": dict(
                rope_parameters=dict(rope_type="default", rope_theta=10000.0)
            ),
            "rms_norm_eps 1e-6": dict(rms_norm_eps=1e-6),
        },
    ),
    "qwen2_bias": dict(
        cls="Qwen2ForCausalLM",
        seed=303,
        config=dict(
            vocab_size=289,
            hidden_size=48,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            use_sliding_window=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        std=0.15,
        legacy_rope=True,
        ablations={
            "rope_theta 10000": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        },
    ),
    "qwen3_wide_head": dict(
        cls="Qwen3ForCausalLM",
        seed=104,
        config=dict(
            vocab_size=257,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=24,
            tie_word_embeddings=True,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        std=0.25,
        std_overrides={"embed_tokens": 0.15},
        ablations={
            "rope_theta 10000": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        },
    ),
    "gemma2_small_window": dict(
        cls="Gemma2ForCausalLM",
        seed=205,
        config=dict(
            vocab_size=311,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=32,
            attn_logit_softcapping=20.0,
            final_logit_softcapping=10.0,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"] * 2,
            tie_word_embeddings=True,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        # Large q/k so the attention soft-cap bites; final norm and the post-norms
        # shifted to (1 + w) ~ 2 so the final soft-cap bites and the layers (not
        # the tied embedding) drive the greedy continuation.
        std=0.2,
        std_overrides={"q_proj": 0.6, "k_proj": 0.6, "embed_tokens": 0.2},
        shift={"model.norm": 1.0, "post_": 1.0},
        ablations={
            "sliding_window 4": dict(sliding_window=4),
            "sliding_window 6": dict(sliding_window=6),
            "no sliding window (all full)": dict(layer_types=["full_attention"] * 4),
            "sliding on odd layers instead": dict(
                layer_types=["full_attention", "sliding_attention"] * 2
            ),
            "no attn softcap": dict(attn_logit_softcapping=None),
            "no final softcap": dict(final_logit_softcapping=None),
            "query_pre_attn_scalar = head_dim": dict(query_pre_attn_scalar=8),
            "gelu exact instead of tanh": dict(hidden_activation="gelu"),
        },
    ),
    "gemma_v1": dict(
        cls="GemmaForCausalLM",
        seed=206,
        config=dict(
            vocab_size=280,
            hidden_size=40,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=10,
            tie_word_embeddings=True,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            hidden_act="gelu_pytorch_tanh",
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        std=0.3,
        std_overrides={"embed_tokens": 0.15},
        # Gemma's config silently maps hidden_act "gelu" to the tanh form, so
        # the exact-erf ablation is spelled "gelu_python".
        ablations={
            "gelu exact instead of tanh": dict(hidden_act="gelu_python"),
            "rms_norm_eps 1e-5": dict(rms_norm_eps=1e-5),
        },
    ),
    "mistral_window": dict(
        cls="MistralForCausalLM",
        seed=407,
        config=dict(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=6,
            tie_word_embeddings=False,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        std=0.15,
        ablations={
            "sliding_window 5": dict(sliding_window=5),
            "sliding_window 7": dict(sliding_window=7),
            "no sliding window": dict(sliding_window=None),
        },
    ),
    "gpt2_odd": dict(
        cls="GPT2LMHeadModel",
        seed=408,
        config=dict(
            vocab_size=275,
            n_embd=48,
            n_layer=3,
            n_head=6,
            n_inner=100,
            n_positions=64,
            layer_norm_epsilon=1e-5,
            activation_function="gelu_new",
            tie_word_embeddings=True,
            bos_token_id=274,
            eos_token_id=274,
        ),
        std=0.25,
        std_overrides={"wte": 0.15, "wpe": 0.15},
        ablations={
            "activation gelu (exact)": dict(activation_function="gelu"),
            "layer_norm_epsilon 1e-3": dict(layer_norm_epsilon=1e-3),
            "scale_attn_weights False": dict(scale_attn_weights=False),
        },
    ),
}


def _import_oracle():
    global torch, transformers, AutoModelForCausalLM
    import torch
    import transformers
    from transformers import AutoModelForCausalLM


def rel_diff(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def build_config(spec, **overrides):
    cls = getattr(transformers, spec["cls"])
    config_cls = cls.config_class
    kwargs = copy.deepcopy(spec["config"])
    kwargs.update(copy.deepcopy(overrides))
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    config.dtype = torch.float32
    return cls, config


def randomise(model, spec):
    """Matrices ~ N(0, std); 1-D params = their init + 0.15 * N(0, 1) (+ optional shift)."""
    gen = torch.Generator().manual_seed(spec["seed"] + 10_000)
    overrides = spec.get("std_overrides", {})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                std = spec["std"]
                for key, value in overrides.items():
                    if key in name:
                        std = value
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.add_(0.15 * torch.randn(p.shape, generator=gen))
                for key, value in spec.get("shift", {}).items():
                    if key in name:
                        p.add_(value)


def forward_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def greedy(model, prompt):
    prompt = torch.as_tensor(prompt, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out.numpy()


def greedy_nocache(model, prompt):
    ids = torch.as_tensor(prompt, dtype=torch.long)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids.numpy()


def to_legacy_rope(path):
    """Rewrite config.json from 5.x `rope_parameters` to 4.x `rope_theta` + `rope_scaling`."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    rope = dict(cfg.pop("rope_parameters"))
    new = {}
    for key, value in cfg.items():
        new[key] = value
    new["rope_theta"] = rope.pop("rope_theta")
    new["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    new = dict(sorted(new.items()))
    with open(cfg_path, "w") as f:
        json.dump(new, f, indent=2, sort_keys=True)
        f.write("\n")


def make(name):
    spec = SPECS[name]
    out_dir = os.path.join(HERE, name)
    torch.manual_seed(spec["seed"])
    cls, config = build_config(spec)
    model = cls(config).eval()
    randomise(model, spec)
    vocab = config.vocab_size
    rng = np.random.default_rng(spec["seed"])
    input_ids = rng.integers(0, vocab, size=(2, SEQ_LEN)).astype(np.int32)
    prompt_ids = rng.integers(0, vocab, size=(2, PROMPT_LEN)).astype(np.int32)

    logits = forward_logits(model, input_ids)
    gen_ids = greedy(model, prompt_ids).astype(np.int32)
    assert gen_ids.shape == (2, PROMPT_LEN + NEW_TOKENS), gen_ids.shape
    assert (gen_ids[:, :PROMPT_LEN] == prompt_ids).all()
    special = {config.bos_token_id, config.eos_token_id, config.pad_token_id} - {None}
    assert not special & set(gen_ids[:, PROMPT_LEN:].ravel().tolist()), (
        name,
        "special id generated",
    )
    nocache = greedy_nocache(model, prompt_ids)
    assert (nocache == gen_ids).all(), (name, nocache, gen_ids)

    os.makedirs(out_dir, exist_ok=True)
    for stale in ("config.json", "generation_config.json", "model.safetensors", "reference.npz"):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    model.save_pretrained(out_dir)
    if spec.get("legacy_rope"):
        to_legacy_rope(out_dir)

    # Reload exactly as a user would and check nothing was lost.
    loaded, info = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    loaded.eval()
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), (name, key, info[key])
    assert type(loaded).__name__ == spec["cls"]
    loaded_logits = forward_logits(loaded, input_ids)
    reload_diff = rel_diff(loaded_logits, logits)
    assert reload_diff == 0.0, (name, reload_diff)
    assert (greedy(loaded, prompt_ids) == gen_ids).all()

    np.savez(
        os.path.join(out_dir, "reference.npz"),
        input_ids=input_ids,
        logits=logits.astype(np.float32),
        prompt_ids=prompt_ids,
        gen_ids=gen_ids,
    )

    # Report how much each feature moves the logits.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    print(
        f"== {name}: {spec['cls']}  V={vocab}  max|logit|={np.abs(logits).max():.3f}"
        f"  std={logits.std():.3f}  gen={gen_ids[:, PROMPT_LEN:].tolist()}"
    )
    for label, overrides in spec["ablations"].items():
        acls, aconfig = build_config(spec, **overrides)
        amodel = acls(aconfig).eval()
        amodel.load_state_dict(state, strict=False)
        print(
            f"   ablation {label:45s} rel diff {rel_diff(forward_logits(amodel, input_ids), logits):.3e}"
        )
    fresh = cls(config).eval()
    init_state = fresh.state_dict()
    kinds = {}
    for key, value in state.items():
        if value.ndim == 1 and key in init_state and not key.endswith("embed_scale"):
            kind = ".".join(p for p in key.split(".") if not p.isdigit())
            kinds.setdefault(kind, []).append(key)
    for kind, keys in sorted(kinds.items()):
        ablated = dict(state)
        for key in keys:
            ablated[key] = init_state[key]
        model.load_state_dict(ablated, strict=False)
        print(
            f"   reset 1-D {kind:44s} rel diff {rel_diff(forward_logits(model, input_ids), logits):.3e}"
        )
    model.load_state_dict(state, strict=False)
    return out_dir


def main(argv):
    _import_oracle()
    names = argv or list(SPECS)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for name in names:
        make(name)
    for name in names:
        d = os.path.join(HERE, name)
        sizes = {f: os.path.getsize(os.path.join(d, f)) for f in sorted(os.listdir(d))}
        print(name, sizes)


if __name__ == "__main__":
    main(sys.argv[1:])
