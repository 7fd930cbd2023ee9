"""Hugging Face checkpoints: load them as a `PureModel`, save params as one.

    from lm_align.models import hf

    model, params = hf.load("path/to/llama")  # config.json + *.safetensors
    logits_BLV = model.apply(params, ids_BL)
    hf.save(model, params, "out/")  # transformers loads it back

    model, params = hf.load("path/to/llama", adapter="path/to/peft_adapter")  # LoRA merged
    lora, adapters = hf.load_adapter("path/to/peft_adapter", model)  # the adapters alone
    hf.save_adapter(model, lora, adapters, "out_adapter/")  # PEFT loads it back

Families: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2 and GPT-2 (the
`*ForCausalLM` / `GPT2LMHeadModel` of `transformers` 4.x and 5.x). Each maps
onto `TransformerConfig` fields; an architecture or option the model does not
implement is rejected by name instead of loading into wrong logits.

Tensors are read lazily from the memory-mapped safetensors files and placed
straight into their sharding (`jax.make_array_from_callback`): each device's
shard is cut from one tensor (one layer of it) at a time, so the host never
holds the whole model twice. docs/checkpoints.md has the name and layout table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from lm_align.models import lora as lora_lib
from lm_align.models.pure import PureModel
from lm_align.models.transformer import DTYPES, TransformerConfig

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "chat_template.jinja",
)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# Fields that say how to run the model rather than what it computes.
_RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "embed_init_std")


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint lm_align cannot load or write: the message says why."""


# --------------------------------------------------------------------------- config


def read_config(path: str) -> dict:
    """`path`/config.json as a dict (errors name the missing file)."""
    file = os.path.join(path, CONFIG)
    if not os.path.isdir(path):
        raise HFCheckpointError(f"{path!r} is not a directory; pass a Hugging Face model directory")
    if not os.path.exists(file):
        raise HFCheckpointError(
            f"{file} not found: a Hugging Face model directory holds config.json and "
            "model.safetensors (or model.safetensors.index.json with its shards)"
        )
    with open(file) as f:
        return json.load(f)


def _rope(hf: dict) -> dict:
    """RoPE fields from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
    params = {**scaling, **params}
    kind = params.get("rope_type", params.get("type", "default"))
    out = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_scaling_factor": float(params["factor"])}
    if kind == "llama3":
        return {
            **out,
            "rope_scaling": "llama3",
            "rope_scaling_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_len": int(params["original_max_position_embeddings"]),
        }
    raise HFCheckpointError(
        f"rope type {kind!r} is not supported (supported: default, linear, llama3)"
    )


def _layer_pattern(hf: dict, default: Sequence[str]) -> tuple[str, ...]:
    types = hf.get("layer_types")
    if not types:
        return tuple(default)
    names = {"full_attention": "global", "sliding_attention": "local"}
    unknown = sorted(set(types) - set(names))
    if unknown:
        raise HFCheckpointError(f"layer_types {unknown} are not supported (full or sliding only)")
    return tuple(names[t] for t in types)


def _require(hf: dict, checks: dict[str, Any]) -> None:
    """Each `field: allowed` (a value or a tuple of values) must hold where the field is set."""
    for name, allowed in checks.items():
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if name in hf and hf[name] not in allowed:
            raise HFCheckpointError(
                f"{hf.get('model_type')}: {name}={hf[name]!r} is not supported (supported: "
                f"{', '.join(map(repr, allowed))})"
            )


def _decoder_fields(hf: dict, act: str, tied_default: bool) -> dict:
    """Fields shared by the Llama-style families."""
    H = hf["num_attention_heads"]
    return {
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"],
        "n_heads": H,
        "n_kv_heads": hf.get("num_key_value_heads") or H,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // H,
        "d_ff": hf["intermediate_size"],
        "activation": act,
        "position": "rope",
        "max_len": hf.get("max_position_embeddings", 2048),
        "norm": "rmsnorm",
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": hf.get("tie_word_embeddings", tied_default),
        **_rope(hf),
    }


def config_from_hf(hf: dict, **overrides) -> TransformerConfig:
    """The `TransformerConfig` of a transformers `config.json` dict (plus `overrides`)."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise HFCheckpointError(
            f"model_type {kind!r} (architectures {hf.get('architectures')}) is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    if kind == "gpt2":
        fields = _gpt2_fields(hf)
    else:
        fields = _FAMILY_FIELDS[kind](hf)
    fields.update(overrides)
    return TransformerConfig(**fields)


def _llama_fields(hf: dict) -> dict:
    _require(hf, {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False})
    return _decoder_fields(hf, "swiglu", tied_default=False)


def _mistral_fields(hf: dict) -> dict:
    _require(hf, {"hidden_act": "silu"})
    fields = _decoder_fields(hf, "swiglu", tied_default=False)
    if hf.get("sliding_window"):
        fields.update(sliding_window=hf["sliding_window"], attention_pattern=("local",))
    return fields


def _qwen_fields(hf: dict, qk_norm: bool) -> dict:
    _require(hf, {"hidden_act": "silu", "attention_bias": False} if qk_norm else {"hidden_act": "silu"})
    fields = _decoder_fields(hf, "swiglu", tied_default=False)
    if hf.get("use_sliding_window"):
        raise HFCheckpointError(f"{hf['model_type']}: use_sliding_window=true is not supported")
    if qk_norm:
        fields.update(qk_layernorm=True, qk_norm="rmsnorm")
    else:
        fields.update(qkv_bias=True)
    return fields


def _gemma_fields(hf: dict, v2: bool) -> dict:
    # Gemma 1 configs say hidden_act "gelu" and transformers runs the tanh form.
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    tanh_forms = ("gelu_pytorch_tanh", "gelu_new") + (() if v2 else ("gelu",))
    if act not in tanh_forms:
        raise HFCheckpointError(
            f"{hf['model_type']}: hidden_activation={act!r} is not supported "
            "(the tanh GeLU, gelu_pytorch_tanh)"
        )
    _require(hf, {"attention_bias": False})
    fields = _decoder_fields(hf, "geglu", tied_default=True)
    fields.update(norm_unit_offset=True, scale_embeddings=True)
    if v2:
        fields.update(
            sandwich_norm=True,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
            attn_logit_softcap=hf.get("attn_logit_softcapping") or 0.0,
            final_logit_softcap=hf.get("final_logit_softcapping") or 0.0,
            sliding_window=hf.get("sliding_window") or 0,
        )
        # Gemma 2 without layer_types: even layers local.
        pattern = _layer_pattern(hf, ("local", "global"))
        if fields["sliding_window"] == 0:
            pattern = ("global",)
        fields["attention_pattern"] = pattern
    return fields


def _gpt2_fields(hf: dict) -> dict:
    _require(
        hf,
        {
            "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "add_cross_attention": False,
        },
    )
    D = hf["n_embd"]
    return {
        "vocab_size": hf["vocab_size"],
        "d_model": D,
        "n_layers": hf["n_layer"],
        "n_heads": hf["n_head"],
        "d_ff": hf.get("n_inner") or 4 * D,
        "activation": "gelu",
        "position": "learned",
        "max_len": hf["n_positions"],
        "norm": "layernorm",
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "use_bias": True,
        "tie_embeddings": hf.get("tie_word_embeddings", True),
    }


_FAMILY_FIELDS: dict[str, Callable[[dict], dict]] = {
    "llama": _llama_fields,
    "mistral": _mistral_fields,
    "qwen2": lambda hf: _qwen_fields(hf, qk_norm=False),
    "qwen3": lambda hf: _qwen_fields(hf, qk_norm=True),
    "gemma": lambda hf: _gemma_fields(hf, v2=False),
    "gemma2": lambda hf: _gemma_fields(hf, v2=True),
}


def family_of(cfg: TransformerConfig) -> str:
    """The Hugging Face model_type whose config expresses `cfg` (checked by `to_hf_config`)."""
    if cfg.position == "learned":
        return "gpt2"
    if cfg.sandwich_norm:
        return "gemma2"
    if cfg.norm_unit_offset:
        return "gemma"
    if cfg.qk_layernorm and cfg.qk_norm == "rmsnorm":
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    if "local" in cfg.attention_pattern:
        return "mistral"
    return "llama"


def to_hf_config(cfg: TransformerConfig, extras: dict | None = None) -> dict:
    """A transformers `config.json` dict for `cfg`; raises if no supported family expresses it.

    `extras` (e.g. bos/eos/pad token ids) are added as they are.
    """
    kind = family_of(cfg)
    H, K, D = cfg.n_heads, cfg.resolved_head_dim, cfg.d_model
    if kind == "gpt2":
        hf = {
            "n_embd": D, "n_layer": cfg.n_layers, "n_head": H, "n_inner": cfg.d_ff,
            "n_positions": cfg.max_len, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True,
        }  # fmt: skip
    else:
        hf = {
            "hidden_size": D, "num_hidden_layers": cfg.n_layers, "num_attention_heads": H,
            "num_key_value_heads": cfg.resolved_kv_heads, "head_dim": K,
            "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_len,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "hidden_act": "silu", "attention_bias": False,
        }  # fmt: skip
        if cfg.rope_scaling != "none":
            hf["rope_scaling"] = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
        if cfg.rope_scaling == "llama3":
            hf["rope_scaling"].update(
                low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len,
            )
        if kind.startswith("gemma"):
            del hf["hidden_act"]
            hf["hidden_activation"] = "gelu_pytorch_tanh"
        if kind == "gemma2":
            pattern = cfg.local_layers()
            hf.update(
                query_pre_attn_scalar=cfg.query_pre_attn_scalar or K,
                attn_logit_softcapping=cfg.attn_logit_softcap or None,
                final_logit_softcapping=cfg.final_logit_softcap or None,
                sliding_window=cfg.sliding_window or None,
                layer_types=["sliding_attention" if p else "full_attention" for p in pattern],
            )
        if kind == "mistral":
            hf["sliding_window"] = cfg.sliding_window
    hf.update(
        model_type=kind,
        architectures=[ARCHITECTURES[kind]],
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
        torch_dtype=cfg.param_dtype,
        **(extras or {}),
    )
    ours, back = _meaning(cfg), _meaning(config_from_hf(hf))
    differ = [f"model.{k}={getattr(cfg, k)!r}" for k in ours if ours[k] != back[k]]
    if differ:
        raise HFCheckpointError(
            f"this model has no Hugging Face equivalent: as a {ARCHITECTURES[kind]} "
            f"{', '.join(differ)} would change (supported families: {', '.join(ARCHITECTURES)})"
        )
    return hf


def _meaning(cfg: TransformerConfig) -> dict:
    """The fields that change what `cfg` computes, defaults resolved."""
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for name in _RUNTIME_FIELDS:
        del out[name]
    out.update(
        head_dim=cfg.resolved_head_dim,
        n_kv_heads=cfg.resolved_kv_heads,
        query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.resolved_head_dim,
        attention_pattern=cfg.local_layers(),
        sliding_window=cfg.sliding_window if any(cfg.local_layers()) else 0,
    )
    return out


# --------------------------------------------------------------------------- tensors


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One lm_align parameter (per layer) and the Hugging Face tensors it is made of.

    `to_ours(hf_arrays, shape)` builds ours; `to_hf(ours)` gives the HF arrays back.
    """

    hf_names: tuple[str, ...]
    to_ours: Callable[[list[np.ndarray], tuple], np.ndarray]
    to_hf: Callable[[np.ndarray], list[np.ndarray]]


def _same(name):
    return _Tensor((name,), lambda ws, shape: ws[0].reshape(shape), lambda x: [x])


def _transposed(name):
    """HF Linear [out, in] -> ours [in, out]."""
    return _Tensor((name,), lambda ws, shape: ws[0].T.reshape(shape), lambda x: [x.T])


def _reshaped(name, to_hf: Callable[[np.ndarray], np.ndarray]):
    """GPT-2 Conv1D ([in, out], already our order): only the split into heads differs."""
    return _Tensor((name,), lambda ws, shape: ws[0].reshape(shape), lambda x: [to_hf(x)])


_ROWS = lambda x: x.reshape(x.shape[0], -1)  # [D, 3, H, K] -> [D, 3 * H * K]
_FLAT = lambda x: x.reshape(-1)  # biases
_OUT = lambda x: x.reshape(-1, x.shape[-1])  # [H, K, D] -> [H * K, D]


def _stacked_linears(names):
    """Linears [n_heads * K, D] (or [F, D]) stacked as ours [D, n, ...]."""

    def to_ours(ws, shape):
        return np.stack([w.T.reshape(shape[0], *shape[2:]) for w in ws], axis=1)

    def to_hf(x):
        return [x[:, j].reshape(x.shape[0], -1).T for j in range(x.shape[1])]

    return _Tensor(tuple(names), to_ours, to_hf)


def _stacked_biases(names):
    """Biases [n_heads * K] stacked as ours [n, heads, K]."""

    def to_ours(ws, shape):
        return np.stack([w.reshape(shape[1:]) for w in ws])

    return _Tensor(tuple(names), to_ours, lambda x: [x[j].reshape(-1) for j in range(len(x))])


def _out_projection(name):
    """o_proj [D, H * K] -> ours [H, K, D]."""
    return _Tensor(
        (name,),
        lambda ws, shape: ws[0].T.reshape(shape),
        lambda x: [x.reshape(-1, x.shape[-1]).T],
    )


def _decoder_layer_map(cfg: TransformerConfig) -> dict[str, _Tensor]:
    """Our in-block path -> tensor, for the Llama-style families ({i}: layer index)."""
    p = "model.layers.{i}."
    a = p + "self_attn."
    m = {
        "attn_norm/scale": _same(p + "input_layernorm.weight"),
        "attn/out": _out_projection(a + "o_proj.weight"),
        "mlp/w_in": _stacked_linears([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
        "mlp/w_out": _transposed(p + "mlp.down_proj.weight"),
    }
    qkv = [a + f"{x}_proj.weight" for x in "qkv"]
    bias = [a + f"{x}_proj.bias" for x in "qkv"]
    if cfg.resolved_kv_heads == cfg.n_heads:
        m["attn/qkv"] = _stacked_linears(qkv)
        if cfg.qkv_bias:
            m["attn/qkv_bias"] = _stacked_biases(bias)
    else:
        m["attn/q"] = _stacked_linears(qkv[:1])
        m["attn/kv"] = _stacked_linears(qkv[1:])
        if cfg.qkv_bias:
            m["attn/q_bias"] = _stacked_biases(bias[:1])
            m["attn/kv_bias"] = _stacked_biases(bias[1:])
    if cfg.qk_layernorm:
        m["attn/q_norm/scale"] = _same(a + "q_norm.weight")
        m["attn/k_norm/scale"] = _same(a + "k_norm.weight")
    if cfg.sandwich_norm:
        m["attn_out_norm/scale"] = _same(p + "post_attention_layernorm.weight")
        m["mlp_norm/scale"] = _same(p + "pre_feedforward_layernorm.weight")
        m["mlp_out_norm/scale"] = _same(p + "post_feedforward_layernorm.weight")
    else:
        m["mlp_norm/scale"] = _same(p + "post_attention_layernorm.weight")
    return m


def _gpt2_layer_map() -> dict[str, _Tensor]:
    p = "transformer.h.{i}."
    return {
        "attn_norm/scale": _same(p + "ln_1.weight"),
        "attn_norm/bias": _same(p + "ln_1.bias"),
        "attn/qkv": _reshaped(p + "attn.c_attn.weight", _ROWS),
        "attn/qkv_bias": _reshaped(p + "attn.c_attn.bias", _FLAT),
        "attn/out": _reshaped(p + "attn.c_proj.weight", _OUT),
        "attn/out_bias": _same(p + "attn.c_proj.bias"),
        "mlp_norm/scale": _same(p + "ln_2.weight"),
        "mlp_norm/bias": _same(p + "ln_2.bias"),
        "mlp/w_in": _reshaped(p + "mlp.c_fc.weight", _ROWS),
        "mlp/b_in": _reshaped(p + "mlp.c_fc.bias", _FLAT),
        "mlp/w_out": _same(p + "mlp.c_proj.weight"),
        "mlp/b_out": _same(p + "mlp.c_proj.bias"),
    }


def tensor_map(cfg: TransformerConfig) -> tuple[dict[str, _Tensor], dict[str, _Tensor]]:
    """(top-level map, per-layer map): our parameter path ('/'-joined) -> HF tensors."""
    if family_of(cfg) == "gpt2":
        top = {
            "embed": _same("transformer.wte.weight"),
            "pos_embed": _same("transformer.wpe.weight"),
            "final_norm/scale": _same("transformer.ln_f.weight"),
            "final_norm/bias": _same("transformer.ln_f.bias"),
        }
        layer = _gpt2_layer_map()
    else:
        top = {"embed": _same("model.embed_tokens.weight"), "final_norm/scale": _same("model.norm.weight")}
        layer = _decoder_layer_map(cfg)
    if not cfg.tie_embeddings:
        top["readout"] = _transposed("lm_head.weight")
    return top, layer


def _leaves(model: PureModel):
    """(path string, block-relative path or None, abstract leaf) for every parameter."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.abstract_params)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[0] != "blocks":
            out.append(("/".join(keys), None, None, leaf))
        elif model.cfg.scan_layers:
            out.append(("/".join(keys), "/".join(keys[1:]), None, leaf))
        else:
            out.append(("/".join(keys), "/".join(keys[2:]), int(keys[1]), leaf))
    return out


# --------------------------------------------------------------------------- files


class _Files:
    """Name -> tensor over one or several memory-mapped safetensors files."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(path, SINGLE_FILE)):
            weight_map = None
        else:
            raise HFCheckpointError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {path}; only safetensors checkpoints "
                "are read (convert a pytorch_model.bin with transformers' save_pretrained)"
            )
        names = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self._handles = {n: safe_open(os.path.join(path, n), framework="numpy") for n in names}
        self.file_of = weight_map or {k: SINGLE_FILE for k in self._handles[SINGLE_FILE].keys()}
        self.path = path

    def get(self, name: str) -> np.ndarray:
        if name not in self.file_of:
            raise HFCheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
        return self._handles[self.file_of[name]].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())


def _gpt2_prefix(files: _Files) -> dict[str, str]:
    """GPT-2 checkpoints are saved with or without the 'transformer.' prefix."""
    if any(k.startswith("transformer.") for k in files.file_of):
        return {}
    return {f"transformer.{k}": k for k in files.file_of}


def load(
    path: str,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    shardings: Callable[[PureModel], Any] | None = None,
    scan_layers: bool = False,
    adapter: str | None = None,
) -> tuple[PureModel, dict]:
    """(model, params) of the Hugging Face checkpoint in directory `path`.

    `dtype` is the compute dtype and, unless `param_dtype` is given, the
    parameter dtype. `shardings(model)` gives the tree of shardings to place
    the parameters on, e.g. ``lambda m: parallel.logical_to_sharding(
    m.logical_axes, m.abstract_params, mesh)``; None: the default device.
    `adapter`: a PEFT LoRA adapter directory (`load_adapter`) for this
    checkpoint, merged into the parameters (W + s A B), so that
    ``model.apply(params, ids)`` gives the adapted model's logits.
    """
    hf = read_config(path)
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype or dtype)):
        if value not in DTYPES:
            raise HFCheckpointError(f"{name}={value!r} is not one of {tuple(DTYPES)}")
    cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype or dtype, scan_layers=scan_layers)
    model = PureModel(cfg)
    files = _Files(path)
    rename = _gpt2_prefix(files) if family_of(cfg) == "gpt2" else {}
    top, layer = tensor_map(cfg)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        placement = [device] * len(jax.tree.leaves(model.abstract_params))
    else:
        placement = jax.tree.leaves(shardings(model))
    arrays = []
    for (full, in_block, index, leaf), sharding in zip(_leaves(model), placement, strict=True):
        spec = top[full] if in_block is None else layer.get(in_block)
        if spec is None:
            raise HFCheckpointError(f"no Hugging Face tensor maps to parameter {full!r}")
        read = _Reader(files, spec, rename, leaf, scanned=in_block is not None and index is None)
        arrays.append(
            jax.make_array_from_callback(
                leaf.shape, sharding, lambda idx, r=read, i=index: r(idx, i)
            )
        )
    _check_unused(files, rename, top, layer, cfg)
    params = jax.tree.unflatten(jax.tree.structure(model.abstract_params), arrays)
    if adapter is not None:
        lora, adapters = load_adapter(adapter, model, base_files=files)
        params = merge_adapter(lora, params, adapters, placement)
    return model, params


class _Reader:
    """Callback for `make_array_from_callback`: a shard of one of our parameters.

    Keeps the last converted layer, so the devices holding pieces of the same
    layer convert it once.
    """

    def __init__(self, files, spec: _Tensor, rename, leaf, scanned: bool):
        self.files, self.spec, self.rename, self.leaf, self.scanned = files, spec, rename, leaf, scanned
        self._last: tuple = ((), None)  # (layer index, converted array)

    def layer(self, i: int | None) -> np.ndarray:
        if self._last[0] == i:
            return self._last[1]
        names = [n.format(i=i) for n in self.spec.hf_names]
        ws = [self.files.get(self.rename.get(n, n)) for n in names]
        shape = self.leaf.shape[1:] if self.scanned else self.leaf.shape
        expected = math.prod(shape)
        got = sum(w.size for w in ws)
        if got != expected:
            raise HFCheckpointError(
                f"{' + '.join(f'{n} {tuple(w.shape)}' for n, w in zip(names, ws))}: "
                f"{got} entries, but the config implies {expected} (shape {tuple(shape)}); "
                "config.json and the weights disagree"
            )
        out = self.spec.to_ours(ws, tuple(shape)).astype(self.leaf.dtype)
        self._last = (i, out)
        return out

    def __call__(self, idx, layer_index):
        if not self.scanned:
            return self.layer(layer_index)[idx]
        layers = range(self.leaf.shape[0])[idx[0]]
        return np.stack([self.layer(i)[idx[1:]] for i in layers])


def _check_unused(files: _Files, rename, top, layer, cfg: TransformerConfig) -> None:
    """Tensors the model would ignore mean a feature it lacks: refuse them by name."""
    used = {n for spec in top.values() for n in spec.hf_names}
    used |= {n.format(i=i) for spec in layer.values() for n in spec.hf_names for i in range(cfg.n_layers)}
    used = {rename.get(n, n) for n in used}
    ignorable = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
    if cfg.tie_embeddings:
        ignorable += ("lm_head.weight",)
    unused = sorted(n for n in files.file_of if n not in used and not n.endswith(ignorable))
    if unused:
        raise HFCheckpointError(
            f"the checkpoint has tensors this model would not use: {unused[:6]}"
            f"{' ...' if len(unused) > 6 else ''}; its config.json and weights disagree or it "
            "uses an option lm_align does not implement"
        )


# --------------------------------------------------------------------------- save


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save(
    model: PureModel,
    params,
    out_dir: str,
    *,
    max_shard_bytes: int = 2 * 2**30,
    config_extras: dict | None = None,
) -> list[str]:
    """Write `params` as a Hugging Face checkpoint in `out_dir`; returns the file names.

    config.json (the family `family_of(model.cfg)`, plus `config_extras` such as
    token ids) and model.safetensors, or model-0000k-of-0000n.safetensors
    shards of at most `max_shard_bytes` with model.safetensors.index.json.
    Forward multipliers of the parameterization (muP etc.) are folded into the
    weights. Every process must call it (gathers sharded arrays); process 0 writes.
    """
    cfg = model.cfg
    hf_config = to_hf_config(cfg, config_extras)
    top, layer = tensor_map(cfg)
    mult = (
        jax.tree.leaves(model.param.multipliers(model.abstract_params, model.logical_axes))
        if model.param is not None
        else None
    )
    leaves = jax.tree.leaves(params)
    writer = _ShardWriter(out_dir, max_shard_bytes) if jax.process_index() == 0 else None
    for k, (full, in_block, index, _) in enumerate(_leaves(model)):
        x = _host(leaves[k])
        if mult is not None and mult[k] != 1.0:
            x = (x.astype(np.float32) * mult[k]).astype(x.dtype)
        spec = top[full] if in_block is None else layer[in_block]
        per_layer = [(index, x)] if index is not None or in_block is None else list(enumerate(x))
        for i, xi in per_layer:
            for name, w in zip(spec.hf_names, spec.to_hf(xi)):
                if writer is not None:
                    writer.add(name.format(i=i), w)
    if writer is None:
        return []
    files = writer.close()
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    return [CONFIG, *files]


class _ShardWriter:
    """Writes tensors into safetensors files of at most `max_bytes` as they fill
    (one shard in memory at a time), named and indexed as transformers does."""

    def __init__(self, out_dir: str, max_bytes: int):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.shard: dict[str, np.ndarray] = {}
        self.bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
        self.total = 0

    def add(self, name: str, w: np.ndarray) -> None:
        if self.shard and self.bytes + w.nbytes > self.max_bytes:
            self._flush()
        self.shard[name] = np.ascontiguousarray(w)
        self.bytes += w.nbytes
        self.total += w.nbytes

    def _flush(self) -> None:
        from safetensors.numpy import save_file

        tmp = os.path.join(self.out_dir, f".shard-{len(self.written)}.tmp")
        save_file(self.shard, tmp, metadata={"format": "pt"})
        self.written.append((tmp, list(self.shard)))
        self.shard, self.bytes = {}, 0

    def close(self) -> list[str]:
        self._flush()
        n = len(self.written)
        if n == 1:
            os.replace(self.written[0][0], os.path.join(self.out_dir, SINGLE_FILE))
            return [SINGLE_FILE]
        names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        weight_map = {}
        for name, (tmp, tensors) in zip(names, self.written):
            os.replace(tmp, os.path.join(self.out_dir, name))
            weight_map.update({t: name for t in tensors})
        with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            json.dump(index, f, indent=2)
        return [*names, INDEX_FILE]


# --------------------------------------------------------------------------- LoRA adapters (PEFT)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# PEFT options that change what an adapter computes and have no lm_align equivalent: value
# allowed (None: unset or empty).
_PEFT_UNSUPPORTED = {
    "use_dora": False, "bias": "none", "lora_bias": False, "modules_to_save": None,
    "rank_pattern": None, "alpha_pattern": None, "layers_to_transform": None,
    "target_parameters": None, "trainable_token_indices": None, "layer_replication": None,
    "use_qalora": False, "use_bdlora": None, "alora_invocation_tokens": None,
}  # fmt: skip


def _lora_modules(model: PureModel, targets) -> dict[str, str]:
    """Target name -> the Hugging Face module it adapts ('{i}' for the layer), e.g.
    'q' -> 'model.layers.{i}.self_attn.q_proj'. Raises HFCheckpointError for a
    target that is not one module there (q alone of GPT-2's fused c_attn; the
    fused qkv target of a model with separate q/k/v projections)."""
    top, layer = tensor_map(model.cfg)
    lead = 1 if model.cfg.scan_layers else 0
    out = {}
    for t in targets:
        names = (layer if t.per_layer else top)["/".join(t.path)].hf_names
        if t.slot is None and len(names) > 1:
            raise HFCheckpointError(
                f"lora target {t.name!r} adapts {', '.join(names)} together, which Hugging "
                "Face keeps as separate modules: target them one by one (q, k, v)"
            )
        if t.slot is not None and len(names) == 1:
            w_path = ("blocks", *([] if lead else [0]), *t.path)
            stacked = _get_path(model.abstract_params, w_path).shape[lead + t.contract]
            if stacked != 1:
                raise HFCheckpointError(
                    f"lora target {t.name!r} is one slice of {names[0]}, which holds "
                    f"{stacked} projections in one module: a PEFT adapter adapts it whole; "
                    "target 'qkv' instead"
                )
        out[t.name] = names[t.slot or 0].removesuffix(".weight")
    return out


def _peft_modules(model: PureModel) -> dict[str, str]:
    """`_lora_modules` of every target that is one Hugging Face module in this model."""
    out = {}
    for name in lora_lib.TARGETS:
        try:
            out.update(_lora_modules(model, lora_lib.resolve_targets(model.cfg, [name])))
        except ValueError:  # not in this model, or not one module (HFCheckpointError)
            pass
    return out


def _get_path(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _peft_key(module: str, i: int | None, which: str) -> str:
    return f"{_PEFT_PREFIX}{module.format(i=i)}.lora_{which}.weight"


def _multiplier_of(model: PureModel, lora: lora_lib.Lora) -> Callable:
    """(target, layer) -> the forward multiplier of the weight it adapts (1 unless muP etc.)."""
    if model.param is None:
        return lambda t, i: 1.0
    mult = model.param.multipliers(model.abstract_params, model.logical_axes)
    scanned = model.cfg.scan_layers
    return lambda t, i: float(_get_path(mult, lora.weight_path(t, None if scanned else i)))


def _read_adapter_config(path: str) -> dict:
    file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(file):
        raise HFCheckpointError(
            f"{file} not found: a PEFT LoRA adapter directory holds {ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS} (PEFT's save_pretrained writes them)"
        )
    with open(file) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise HFCheckpointError(f"{file}: peft_type={config.get('peft_type')!r}; only LORA is supported")
    for name, allowed in _PEFT_UNSUPPORTED.items():
        value = config.get(name)
        if value not in (allowed, None, {}, []) and not (allowed is None and not value):
            raise HFCheckpointError(
                f"{file}: {name}={value!r} is not supported (a plain LoRA adapter has "
                f"{name}={allowed!r}); lm_align would compute something else"
            )
    if not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
        raise HFCheckpointError(
            f"no {ADAPTER_WEIGHTS} in {path}; save the adapter with safe_serialization=True"
        )
    return config


def load_adapter(path: str, model: PureModel, *, base_files=None):
    """(Lora, adapters) of the PEFT LoRA adapter in directory `path`, for `model`.

    Reads ``adapter_config.json`` (r, lora_alpha, use_rslora) and
    ``adapter_model.safetensors``: ``lora_A.weight`` [r, in] and ``lora_B.weight``
    [out, r] per adapted module become A [inputs..., r] = lora_A^T and B
    [r, outputs...] = lora_B^T (docs/lora.md has the module names). The
    targets are the modules the file adapts; every layer must have them.
    `base_files` (the base checkpoint's tensors) lets a copy of a base weight
    stored in the adapter (``base_layer.weight``) be checked against it.
    Options that change what the adapter computes (DoRA, biases, per-module
    ranks, ...) are refused by name. Lora dropout is ignored (inference).
    """
    from safetensors import safe_open

    config = _read_adapter_config(path)
    weights = safe_open(os.path.join(path, ADAPTER_WEIGHTS), framework="numpy")
    keys = set(weights.keys())
    modules = _peft_modules(model)
    found, used = _adapter_targets(model, modules, keys)
    _check_base_copies(keys - used, weights, base_files, path)
    lora = lora_lib.Lora(model, lora_lib.LoraConfig(
        rank=int(config["r"]), alpha=float(config["lora_alpha"]),
        rslora=bool(config.get("use_rslora", False)), targets=tuple(found),
    ))  # fmt: skip
    r, multiplier = lora.cfg.rank, _multiplier_of(model, lora)

    def pair(t, i, shape, axes):
        _, ins, outs = lora.split(t, shape)
        stacked = model.cfg.scan_layers and t.per_layer
        a_list, b_list = [], []
        for j in range(model.cfg.n_layers) if stacked else [i]:
            a = _adapter_tensor(weights, _peft_key(modules[t.name], j, "A"), (r, math.prod(ins)))
            b = _adapter_tensor(weights, _peft_key(modules[t.name], j, "B"), (math.prod(outs), r))
            a_list.append(a.T.reshape(*ins, r).astype(np.float32))
            b_list.append((b.T.reshape(r, *outs) / multiplier(t, j)).astype(np.float32))
        if not stacked:
            return {"A": a_list[0], "B": b_list[0]}
        return {"A": np.stack(a_list), "B": np.stack(b_list)}

    return lora, lora.tree(pair)


def _adapter_targets(model: PureModel, modules: dict, keys: set) -> tuple[list[str], set]:
    """(targets the adapter file holds, in canonical order; the keys they account for)."""
    n = model.cfg.n_layers
    where = {}
    for name, module in modules.items():
        per_layer = "{i}" in module
        for i in range(n) if per_layer else [None]:
            for which in "AB":
                where[_peft_key(module, i, which)] = name
    lora_keys = {k for k in keys if ".lora_" in k}
    unknown = sorted(k for k in lora_keys if k not in where)
    if unknown:
        raise HFCheckpointError(
            f"the adapter adapts modules lm_align cannot map onto this {family_of(model.cfg)} "
            f"model: {unknown[:4]}{' ...' if len(unknown) > 4 else ''} (supported modules: "
            f"{sorted({m.format(i='N') for m in modules.values()})})"
        )
    found = [name for name in modules if any(where[k] == name for k in lora_keys)]
    if not found:
        raise HFCheckpointError("the adapter holds no lora_A/lora_B tensors")
    missing = sorted(k for k, name in where.items() if name in found and k not in keys)
    if missing:
        raise HFCheckpointError(
            f"the adapter lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}: lm_align "
            "adapts every layer of each target module"
        )
    return found, lora_keys


def _adapter_tensor(weights, key: str, shape: tuple) -> np.ndarray:
    x = weights.get_tensor(key)
    if tuple(x.shape) != tuple(shape):
        raise HFCheckpointError(
            f"{key} has shape {tuple(x.shape)}, but r and the model imply {tuple(shape)}; "
            "is this the adapter of another model?"
        )
    return x


def _check_base_copies(extra: set, weights, base_files, path: str) -> None:
    """PEFT stores a copy of an adapted lm_head / embedding (`...base_layer.weight`);
    it must equal the base model's tensor. Any other tensor is refused."""
    unknown = sorted(k for k in extra if not k.endswith(".base_layer.weight"))
    if unknown:
        raise HFCheckpointError(f"{path}: tensors lm_align does not know: {unknown[:4]}")
    for key in sorted(extra - set(unknown)):
        name = key.removeprefix(_PEFT_PREFIX).replace(".base_layer.weight", ".weight")
        if base_files is None or name not in base_files.file_of:
            continue
        if not np.array_equal(weights.get_tensor(key), base_files.get(name)):
            raise HFCheckpointError(
                f"{path}: the adapter stores its own {name}, which differs from the base "
                "checkpoint's; load the adapter onto the model it was trained on"
            )


def merge_adapter(lora: lora_lib.Lora, params, adapters, placement: Sequence) -> dict:
    """`lora.merge(params, adapters)` on the devices of `placement` (params' shardings, in
    leaf order); the merged parameters replace `params` (donated)."""
    first = placement[0]
    mesh = getattr(first, "mesh", None)
    rep = (
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        if mesh is not None
        else jax.sharding.SingleDeviceSharding(next(iter(first.device_set)))
    )
    adapters = jax.device_put(adapters, rep)
    out_sh = jax.tree.unflatten(jax.tree.structure(params), list(placement))
    return jax.jit(lora.merge, out_shardings=out_sh, donate_argnums=(0,))(params, adapters)


def save_adapter(
    model: PureModel, lora: lora_lib.Lora, adapters, out_dir: str, *, base_model: str = ""
) -> list[str]:
    """Write `adapters` as a PEFT LoRA adapter in `out_dir`; returns the file names.

    ``adapter_config.json`` (r, lora_alpha, use_rslora, target_modules as module
    names, `base_model` as base_model_name_or_path) and
    ``adapter_model.safetensors`` (lora_A = A^T [r, in], lora_B = B^T [out, r]).
    A forward multiplier of the base weight (muP etc.) is folded into lora_B,
    as `save` folds it into the weight. Every process must call it; process 0
    writes. `peft.PeftModel.from_pretrained(base, out_dir)` loads it onto the
    base checkpoint `save` writes for `model`.
    """
    modules = _lora_modules(model, lora.targets)
    r, scanned, multiplier = lora.cfg.rank, model.cfg.scan_layers, _multiplier_of(model, lora)
    tensors = {}
    for t, i in lora.places():
        pair = _get_path(adapters, lora.adapter_path(t, i))
        a, b = _host(pair["A"]), _host(pair["B"])
        layers = list(enumerate(zip(a, b))) if (scanned and t.per_layer) else [(i, (a, b))]
        for j, (aj, bj) in layers:
            m = np.float32(multiplier(t, j))
            tensors[_peft_key(modules[t.name], j, "A")] = np.ascontiguousarray(aj.reshape(-1, r).T)
            tensors[_peft_key(modules[t.name], j, "B")] = np.ascontiguousarray((bj.reshape(r, -1) * m).T)
    if jax.process_index() != 0:
        return []
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    suffix = lambda m: m.split(".{i}.", 1)[-1]  # 'self_attn.q_proj', 'lm_head'
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": lora.cfg.alpha,
        "use_rslora": lora.cfg.rslora, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(suffix(m) for m in modules.values()),
        "fan_in_fan_out": family_of(model.cfg) == "gpt2", "init_lora_weights": True,
        "base_model_name_or_path": base_model, "inference_mode": True, "use_dora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }  # fmt: skip
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
