"""Decoder-only Transformer in Flax NNX.

Pre-LN blocks: x + Attn(Norm(x)), then x + MLP(Norm(x)); a final norm and a
readout to the vocabulary. Options: RoPE (with Llama-3 or linear frequency
scaling) or learned positions, LayerNorm or RMSNorm (scale w or 1 + w), GeLU,
SwiGLU or GeGLU MLP, qk-norm (LayerNorm, Wortsman et al. 2023, or RMSNorm as
in Qwen3), grouped-query attention, q/k/v biases, attention and final logit
soft-capping, sliding-window attention on a per-layer pattern, norms after
attention and MLP too ("sandwich", Gemma 2), embeddings scaled by sqrt(D),
tied or untied embeddings, scan over layers, remat. These cover the Llama,
Mistral, Qwen2/3, Gemma 1/2 and GPT-2 families (`lm_align.models.hf`).

Shape-suffix legend:
  B batch, L query length, M key length, D model dim, H query heads,
  G key/value heads (R = H / G queries share one), K head dim, F MLP hidden
  dim, V vocab, N layers.

Every parameter carries logical axis names (`embed`, `vocab`, `heads`,
`head_dim`, `mlp`, `layers`) in its `out_sharding` metadata; `lm_align.parallel`
maps them to mesh axes. Packed sequences: `segment_ids` restrict attention to
tokens of the same document and `positions` restart per document.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from lm_align.models import attention as kernels
from lm_align.parameterization import Parameterization, fan_in, role_of

# Variables are created abstractly and sharded by `lm_align.parallel`, never eagerly.
flax.config.update("flax_always_shard_variable", False)

ACTIVATIONS = ("gelu", "swiglu", "geglu")  # gelu is the tanh approximation (GPT-2's gelu_new)
POSITIONS = ("rope", "learned")
NORMS = ("layernorm", "rmsnorm")
ROPE_SCALINGS = ("none", "linear", "llama3")
ATTENTION_KINDS = ("global", "local")
ATTENTION_IMPLEMENTATIONS = ("reference", "dot_product", "splash")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of the decoder (the `model` config group)."""

    vocab_size: int = 259  # >= tokenizer vocab (259 for the byte tokenizer)
    d_model: int = 128  # residual width
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None: n_heads
    head_dim: int | None = None  # default d_model // n_heads
    d_ff: int = 512  # MLP hidden width
    activation: str = "gelu"  # gelu (tanh approximation) | swiglu | geglu
    position: str = "rope"  # rope | learned
    max_len: int = 2048  # table size for learned positions
    rope_theta: float = 10_000.0
    rope_scaling: str = "none"  # none | linear | llama3 (frequency scaling of long-context models)
    rope_scaling_factor: float = 1.0  # linear: positions / factor; llama3: low frequencies / factor
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_len / this are scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_len / this are kept
    rope_original_max_len: int = 8192  # llama3: the context length the model was trained at
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-6
    norm_unit_offset: bool = False  # norms scale by (1 + w), w initialised at 0 (Gemma)
    sandwich_norm: bool = False  # also normalise the attention and MLP outputs (Gemma 2)
    scale_embeddings: bool = False  # token embeddings x sqrt(d_model) (Gemma)
    qk_layernorm: bool = False  # per-head norm on q and k (scale only)
    qk_norm: str = "layernorm"  # the kind of that norm: layernorm | rmsnorm (Qwen3)
    query_pre_attn_scalar: float | None = None  # queries x its^(-1/2); None: head_dim
    attn_logit_softcap: float = 0.0  # attention logits -> cap * tanh(logits / cap); 0: off
    final_logit_softcap: float = 0.0  # the same on the output logits (Gemma 2); 0: off
    attention: str = "reference"  # reference | dot_product (cuDNN on GPU) | splash (Pallas, TPU)
    sliding_window: int = 0  # a local layer's query sees the last `sliding_window` keys (itself included)
    attention_pattern: tuple = ("global",)  # global | local per layer, repeated over the layers
    use_bias: bool = False  # biases in dense layers and norms
    qkv_bias: bool = False  # biases on the q, k, v projections only (Qwen2)
    tie_embeddings: bool = False  # readout = embedding^T
    embed_init_std: float | None = None  # None: 1.0 untied, 1/sqrt(D) tied
    dtype: str = "float32"  # compute dtype (bfloat16 on GPU/TPU)
    param_dtype: str = "float32"
    scan_layers: bool = False  # lax.scan over stacked layers (fast compiles)
    remat: str = "none"  # none | full | dots | dots_no_batch

    def __post_init__(self):
        errors = self.validation_errors()
        if errors:
            raise ValueError("invalid model config:\n  " + "\n  ".join(errors))

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim else self.d_model // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def query_scale(self) -> float:
        """The factor on queries before q . k: 1 / sqrt(query_pre_attn_scalar or head_dim)."""
        return 1.0 / math.sqrt(self.query_pre_attn_scalar or self.resolved_head_dim)

    def local_layers(self) -> tuple[bool, ...]:
        """Per layer: does it use sliding-window (local) attention?"""
        pattern = tuple(self.attention_pattern)
        return tuple(pattern[i % len(pattern)] == "local" for i in range(self.n_layers))

    def validation_errors(self) -> list[str]:
        """Every problem with this config, each with the fix."""
        errs = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(self, name) <= 0:
                errs.append(f"model.{name}={getattr(self, name)} must be positive")
        if self.head_dim is None and self.n_heads > 0 and self.d_model % self.n_heads:
            errs.append(
                f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; "
                "choose n_heads dividing d_model or set model.head_dim explicitly"
            )
        G = self.resolved_kv_heads
        if G <= 0 or (self.n_heads > 0 and self.n_heads % G):
            errs.append(
                f"model.n_kv_heads={self.n_kv_heads} must be positive and divide "
                f"model.n_heads={self.n_heads} (each key/value head serves n_heads / n_kv_heads queries)"
            )
        pattern = tuple(self.attention_pattern)
        if not pattern or any(k not in ATTENTION_KINDS for k in pattern):
            errs.append(
                f"model.attention_pattern={pattern!r} must be a non-empty sequence of {ATTENTION_KINDS}"
            )
        elif "local" in pattern and self.sliding_window <= 0:
            errs.append(
                f"model.attention_pattern={pattern!r} has local layers but model.sliding_window="
                f"{self.sliding_window}; set the window size (tokens a query sees, itself included)"
            )
        if self.attention == "dot_product" and self.attn_logit_softcap:
            errs.append(
                f"model.attention='dot_product' cannot soft-cap attention logits "
                f"(model.attn_logit_softcap={self.attn_logit_softcap}); use 'splash' or 'reference'"
            )
        for name in ("attn_logit_softcap", "final_logit_softcap", "sliding_window"):
            if getattr(self, name) < 0:
                errs.append(f"model.{name}={getattr(self, name)} must be >= 0 (0: off)")
        if self.rope_scaling != "none" and self.rope_scaling_factor <= 0:
            errs.append(f"model.rope_scaling_factor={self.rope_scaling_factor} must be positive")
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            errs.append(
                f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                f"model.rope_low_freq_factor={self.rope_low_freq_factor}"
            )
        choices = [
            ("activation", ACTIVATIONS),
            ("attention", ATTENTION_IMPLEMENTATIONS),
            ("rope_scaling", ROPE_SCALINGS),
            ("qk_norm", NORMS),
            ("position", POSITIONS),
            ("norm", NORMS),
            ("remat", tuple(REMAT_POLICIES)),
            ("dtype", tuple(DTYPES)),
            ("param_dtype", tuple(DTYPES)),
        ]
        for name, valid in choices:
            if getattr(self, name) not in valid:
                errs.append(f"model.{name}={getattr(self, name)!r} is not one of {valid}")
        return errs

    def num_params(self, *, matmul_only: bool = False, non_embedding: bool = False) -> int:
        """Parameter count; `matmul_only` counts weights used in matmuls (the 6N of FLOPs);
        `non_embedding` counts the blocks' matmul weights only, without embeddings, readout,
        norms and biases (the N of Kaplan et al. 2020: 12 d^2 per layer for a GeLU MLP of
        width 4d)."""
        D, F, V, N = self.d_model, self.d_ff, self.vocab_size, self.n_layers
        HK = self.n_heads * self.resolved_head_dim
        qkv = HK + 2 * self.resolved_kv_heads * self.resolved_head_dim  # q, k, v outputs
        n_in = 1 if self.activation == "gelu" else 2
        per_layer = D * qkv + HK * D + n_in * D * F + F * D
        readout = V * D
        if non_embedding:
            return N * per_layer
        if matmul_only:
            return N * per_layer + readout
        vec = D * (2 if self.use_bias else 1)
        per_layer += (4 if self.sandwich_norm else 2) * vec
        per_layer += 2 * self.resolved_head_dim if self.qk_layernorm else 0
        if self.use_bias or self.qkv_bias:
            per_layer += qkv
        if self.use_bias:
            per_layer += D + n_in * F + D
        embed = V * D + (self.max_len * D if self.position == "learned" else 0)
        return N * per_layer + embed + (0 if self.tie_embeddings else readout) + vec

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N_matmul + 12 * n_layers * H*K * seq_len.

        The first term is forward + backward of every weight matmul (readout
        included, embedding lookup excluded); the second is the attention
        score and value matmuls (PaLM appendix B convention, no causal discount).
        """
        HK = self.n_heads * self.resolved_head_dim
        return 6.0 * self.num_params(matmul_only=True) + 12.0 * self.n_layers * HK * seq_len


def _dense(x_BLI, w, contract: int = 1, out_dtype=None):
    """[B, L, I] x w -> [B, L, O]: the first `contract` axes of w (product I) are
    contracted, the rest (product O) are outputs; one 2-D matmul over B*L tokens,
    its result in `out_dtype` (default: the inputs').

    (XLA:CPU emits much faster dots, with no transposes in the backward pass,
    for [tokens, I] x [I, O] than for the equivalent 3-D einsum.)
    """
    B, L, _ = x_BLI.shape
    w_IO = w.reshape(math.prod(w.shape[:contract]), -1)
    y = jnp.matmul(x_BLI.reshape(B * L, -1), w_IO, preferred_element_type=out_dtype)
    return y.reshape(B, L, w_IO.shape[1])


class _Params:
    """Creates parameters with the init std and forward multiplier of their role.

    The role (embedding, hidden, readout) and fan-in come from the logical axis
    names (:func:`lm_align.parameterization.role_of`), the numbers from the
    :class:`~lm_align.parameterization.Parameterization`: the model holds no
    copy of them. The multiplier is stored in the parameter's metadata and
    applied by :func:`_weight` in the forward pass.
    """

    def __init__(self, cfg: TransformerConfig, param: Parameterization):
        self.dtype = DTYPES[cfg.param_dtype]
        self.param = param

    def _role(self, shape, names):
        role = role_of(names, names)
        return role, (None if role == "embedding" else fan_in(names, shape, names))

    def normal(self, rngs: nnx.Rngs, shape, names, *, base_std: float = 1.0, truncated=False):
        """Gaussian (or truncated) init with std ``base_std * init_std(role)``."""
        role, f_in = self._role(shape, names)
        std = base_std * self.param.init_std(role, f_in)
        init = nnx.initializers.truncated_normal(std) if truncated else nnx.initializers.normal(std)
        return nnx.Param(
            init(rngs.params(), shape, self.dtype),
            out_sharding=names,
            eager_sharding=False,
            multiplier=self.param.multiplier(role, f_in),
        )

    def const(self, shape, names, value: float):
        """Constant init (norm scales 1, biases 0) times the role's init factor."""
        role, f_in = self._role(shape, names)
        value = value * self.param.init_std(role, f_in) if value else 0.0
        return nnx.Param(
            jnp.full(shape, value, self.dtype),
            out_sharding=names,
            eager_sharding=False,
            multiplier=self.param.multiplier(role, f_in),
        )


def _scaled(p: nnx.Param, x, dtype):
    """`x` (the parameter's value or rows of it) in `dtype`, times its forward multiplier."""
    m = p.get_metadata().get("multiplier", 1.0)
    x = x.astype(dtype)
    return x if m == 1.0 else x * jnp.asarray(m, dtype)


def _weight(p: nnx.Param, dtype):
    """The forward weight ``multiplier * w`` in ``dtype``."""
    return _scaled(p, p.get_value(), dtype)


def _lookup(p: nnx.Param, ids, dtype):
    """Rows ``ids`` of the embedding-type table ``p``, times its multiplier."""
    return _scaled(p, jnp.take(p.get_value(), ids, axis=0), dtype)


class Norm(nnx.Module):
    """LayerNorm or RMSNorm over the last axis, with a learnable scale (and bias).

    The scale multiplies as w, or as (1 + w) with `cfg.norm_unit_offset` (w then
    starts at 0).
    """

    def __init__(
        self,
        size: int,
        cfg: TransformerConfig,
        mk: _Params,
        names=("embed",),
        *,
        kind: str | None = None,
        use_bias: bool | None = None,
    ):
        self.kind = kind or cfg.norm
        self.eps = cfg.norm_eps
        self.unit_offset = cfg.norm_unit_offset
        self.scale = mk.const((size,), names, 0.0 if cfg.norm_unit_offset else 1.0)
        self.bias = (
            mk.const((size,), names, 0.0)
            if (cfg.use_bias if use_bias is None else use_bias)
            else None
        )

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = _weight(self.scale, jnp.float32)
        y = y * (1.0 + scale if self.unit_offset else scale)
        if self.bias is not None:
            y = y + _weight(self.bias, jnp.float32)
        return y.astype(x.dtype)


def rope_frequencies(cfg: TransformerConfig):
    """[K/2] float32 rotary frequencies theta^(-2i/K), rescaled by `cfg.rope_scaling`.

    linear: every frequency / factor (positions interpolated). llama3 (Llama 3.1,
    arXiv:2407.21783): wavelengths longer than original_max_len / low_freq_factor
    are divided by factor, those shorter than original_max_len / high_freq_factor
    kept, and the band between interpolated smoothly.
    """
    K = cfg.resolved_head_dim
    inv_freq_k = cfg.rope_theta ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)
    factor = cfg.rope_scaling_factor
    if cfg.rope_scaling == "linear":
        return inv_freq_k / factor
    if cfg.rope_scaling == "llama3":
        lo, hi, orig = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len
        wavelen_k = 2 * math.pi / inv_freq_k
        smooth_k = (orig / wavelen_k - lo) / (hi - lo)
        band_k = (1 - smooth_k) * inv_freq_k / factor + smooth_k * inv_freq_k
        return jnp.where(
            wavelen_k < orig / hi,
            inv_freq_k,
            jnp.where(wavelen_k > orig / lo, inv_freq_k / factor, band_k),
        )
    return inv_freq_k


def rope_tables(positions_BL, inv_freq_k):
    """(sin, cos), each [B, L, 1, K/2]: rotary angles positions * `inv_freq_k`."""
    angle_BLk = positions_BL[..., None].astype(jnp.float32) * inv_freq_k
    return jnp.sin(angle_BLk)[:, :, None, :], jnp.cos(angle_BLk)[:, :, None, :]


def apply_rope(x_BLHK, sin_BL1k, cos_BL1k):
    """Rotates (x1, x2) halves of the head dim: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BL1k - x2 * sin_BL1k, x2 * cos_BL1k + x1 * sin_BL1k], axis=-1)
    return out.astype(x_BLHK.dtype)


def rope(x_BLHK, positions_BL, theta: float):
    """Rotary embedding (rotate-half convention) at integer `positions`, frequencies theta^(-2i/K)."""
    K = x_BLHK.shape[-1]
    inv_freq_k = theta ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)
    return apply_rope(x_BLHK, *rope_tables(positions_BL, inv_freq_k))


class Attention(nnx.Module):
    """Causal self-attention: multi-head, or grouped-query with `n_kv_heads` < `n_heads`.

    Projections: one fused [D, 3, H, K] q/k/v matrix when every query head has
    its own key/value head; otherwise q [D, 1, H, K] and k/v [D, 2, G, K].
    """

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs, mk: _Params):
        D, H, G, K = cfg.d_model, cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        self.cfg = cfg
        bias = cfg.use_bias or cfg.qkv_bias
        if G == H:
            self.qkv = mk.normal(
                rngs, (D, 3, H, K), ("embed", None, "heads", "head_dim"), truncated=True
            )
            self.qkv_bias = mk.const((3, H, K), (None, "heads", "head_dim"), 0.0) if bias else None
        else:
            self.q = mk.normal(rngs, (D, 1, H, K), ("embed", None, "heads", "head_dim"), truncated=True)
            self.kv = mk.normal(
                rngs, (D, 2, G, K), ("embed", None, "kv_heads", "head_dim"), truncated=True
            )
            self.q_bias = mk.const((1, H, K), (None, "heads", "head_dim"), 0.0) if bias else None
            self.kv_bias = mk.const((2, G, K), (None, "kv_heads", "head_dim"), 0.0) if bias else None
        self.out = mk.normal(rngs, (H, K, D), ("heads", "head_dim", "embed"), truncated=True)
        self.out_bias = mk.const((D,), ("embed",), 0.0) if cfg.use_bias else None
        if cfg.qk_layernorm:
            # One scale of size K shared by all heads, no bias (Wortsman et al. 2023, arXiv:2309.14322; docs/scaling.md).
            self.q_norm = Norm(K, cfg, mk, ("head_dim",), kind=cfg.qk_norm, use_bias=False)
            self.k_norm = Norm(K, cfg, mk, ("head_dim",), kind=cfg.qk_norm, use_bias=False)

    def _projections(self, x_BLD, w, b):
        """x @ w (+ b) as [B, L, n, heads, K] for w [D, n, heads, K]."""
        B, L, _ = x_BLD.shape
        dt = DTYPES[self.cfg.dtype]
        y = _dense(x_BLD, _weight(w, dt)).reshape(B, L, *w.shape[1:])
        return y if b is None else y + _weight(b, dt)

    def project(self, x_BLD, rope_sincos):
        """(q scaled by `cfg.query_scale`, k, v): q [B, L, H, K], k and v [B, L, G, K];
        qk-norm and RoPE applied."""
        cfg = self.cfg
        if cfg.resolved_kv_heads == cfg.n_heads:
            qkv_BL3HK = self._projections(x_BLD, self.qkv, self.qkv_bias)
            q_BLHK, k_BLGK, v_BLGK = (qkv_BL3HK[:, :, i] for i in range(3))
        else:
            q_BLHK = self._projections(x_BLD, self.q, self.q_bias)[:, :, 0]
            kv_BL2GK = self._projections(x_BLD, self.kv, self.kv_bias)
            k_BLGK, v_BLGK = kv_BL2GK[:, :, 0], kv_BL2GK[:, :, 1]
        if cfg.qk_layernorm:
            q_BLHK, k_BLGK = self.q_norm(q_BLHK), self.k_norm(k_BLGK)
        if rope_sincos is not None:
            q_BLHK = apply_rope(q_BLHK, *rope_sincos)
            k_BLGK = apply_rope(k_BLGK, *rope_sincos)
        return q_BLHK * cfg.query_scale, k_BLGK, v_BLGK

    def attend(self, q_BLHK, k_BMGK, v_BMGK, mask_B1LM):
        """(output [B, L, D], max unmasked logit) of scaled queries over keys/values.

        Query head h reads key/value head h // (H / G)."""
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        B, L, H, K = q_BLHK.shape
        M, G = k_BMGK.shape[1], k_BMGK.shape[2]
        f32 = jnp.float32  # scores accumulate and come out in float32
        if G == H:
            logits_BHLM = jnp.einsum("BLHK,BMHK->BHLM", q_BLHK, k_BMGK, preferred_element_type=f32)
        else:
            q_BLGRK = q_BLHK.reshape(B, L, G, H // G, K)
            logits_BHLM = jnp.einsum(
                "BLGRK,BMGK->BGRLM", q_BLGRK, k_BMGK, preferred_element_type=f32
            ).reshape(B, H, L, M)
        if cfg.attn_logit_softcap:
            cap = cfg.attn_logit_softcap
            logits_BHLM = cap * jnp.tanh(logits_BHLM / cap)
        logits_BHLM = jnp.where(mask_B1LM, logits_BHLM, jnp.finfo(jnp.float32).min)
        # Softmax by hand so its row max also gives the max-logit diagnostic (one
        # pass over the logits instead of two). Masked entries hold finfo.min and
        # every row has an unmasked diagonal, so they are never a row's max.
        row_max_BHL1 = jax.lax.stop_gradient(jnp.max(logits_BHLM, axis=-1, keepdims=True))
        exp_BHLM = jnp.exp(logits_BHLM - row_max_BHL1)
        probs_BHLM = (exp_BHLM / jnp.sum(exp_BHLM, axis=-1, keepdims=True)).astype(dt)
        max_logit = jnp.max(row_max_BHL1)
        if G == H:
            ctx_BLHK = jnp.einsum("BHLM,BMHK->BLHK", probs_BHLM, v_BMGK)
        else:
            probs_BGRLM = probs_BHLM.reshape(B, G, H // G, L, M)
            ctx_BLHK = jnp.einsum("BGRLM,BMGK->BLGRK", probs_BGRLM, v_BMGK).reshape(B, L, H, K)
        return self.output(ctx_BLHK), max_logit

    def output(self, ctx_BLHK):
        """The output projection [B, L, H, K] -> [B, L, D]."""
        dt = DTYPES[self.cfg.dtype]
        B, L, H, K = ctx_BLHK.shape
        out_BLD = _dense(ctx_BLHK.reshape(B, L, H * K), _weight(self.out, dt), contract=2)
        if self.out_bias is not None:
            out_BLD = out_BLD + _weight(self.out_bias, dt)
        return out_BLD

    def __call__(self, x_BLD, rope_sincos, mask_B1LM, segment_ids_BL=None, window=None):
        """(output [B, L, D], max attention logit, or its bound for the fused kernels).

        `rope_sincos`: `rope_tables(...)` for RoPE models, else None. `mask_B1LM`
        (causal, same segment, within `window`) drives the reference and
        dot_product paths; splash builds its mask from `segment_ids_BL` and
        `window` (a local layer's window, else None).
        """
        cfg = self.cfg
        q_BLHK, k_BLGK, v_BLGK = self.project(x_BLD, rope_sincos)
        if cfg.attention == "reference":
            return self.attend(q_BLHK, k_BLGK, v_BLGK, mask_B1LM)
        bound = kernels.max_logit_bound(q_BLHK, k_BLGK, cfg.attn_logit_softcap)
        if cfg.attention == "dot_product":
            return self.output(kernels.dot_product(q_BLHK, k_BLGK, v_BLGK, mask_B1LM)), bound

        def splash(w):
            return kernels.splash(
                q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, w, cfg.attn_logit_softcap
            )

        if window is None or isinstance(window, int):
            ctx_BLHK = splash(window)
        else:  # traced (scan over a mixed local/global pattern, or remat)
            is_local = window < 2**30
            ctx_BLHK = jax.lax.cond(is_local, lambda: splash(cfg.sliding_window), lambda: splash(None))
        return self.output(ctx_BLHK), bound

    def cached(self, x_BSD, rope_sincos, cache, index, key_valid_BT, window=None):
        """Attention of S new tokens written into cache slots [index, index + S).

        `cache` = (k, v), each [B, T, G, K]. Slot j is visible to new token s if
        j <= index + s and `key_valid_BT[:, j]` (e.g. not left padding), and,
        with a `window` (sliding-window layer), index + s - j < window; a token
        always sees its own slot. Returns (output [B, S, D], new cache).
        """
        q, k, v = self.project(x_BSD, rope_sincos)
        k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, 1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, 1)
        S, T = x_BSD.shape[1], k_cache.shape[1]
        slot_S1 = index + jnp.arange(S)[:, None]
        causal_ST = jnp.arange(T)[None, :] <= slot_S1
        if window is not None:
            causal_ST = causal_ST & (slot_S1 - jnp.arange(T)[None, :] < window)
        mask_BST = (causal_ST[None] & key_valid_BT[:, None, :]) | (
            jnp.arange(T)[None, None, :] == slot_S1[None]
        )
        out, _ = self.attend(q, k_cache, v_cache, mask_BST[:, None])
        return out, (k_cache, v_cache)


class MLP(nnx.Module):
    """GeLU MLP, or gated: SwiGLU (silu(x W_gate) * x W_up) W_out, GeGLU with gelu."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs, mk: _Params):
        D, F = cfg.d_model, cfg.d_ff
        self.cfg = cfg
        n_in = 1 if cfg.activation == "gelu" else 2
        self.w_in = mk.normal(rngs, (D, n_in, F), ("embed", None, "mlp"), truncated=True)
        self.w_out = mk.normal(rngs, (F, D), ("mlp", "embed"), truncated=True)
        self.b_in = mk.const((n_in, F), (None, "mlp"), 0.0) if cfg.use_bias else None
        self.b_out = mk.const((D,), ("embed",), 0.0) if cfg.use_bias else None

    def __call__(self, x_BLD):
        dt = DTYPES[self.cfg.dtype]
        B, L, _ = x_BLD.shape
        _, n, F = self.w_in.shape
        h_BLnF = _dense(x_BLD, _weight(self.w_in, dt)).reshape(B, L, n, F)
        if self.b_in is not None:
            h_BLnF = h_BLnF + _weight(self.b_in, dt)
        if self.cfg.activation == "swiglu":
            h_BLF = jax.nn.silu(h_BLnF[:, :, 0]) * h_BLnF[:, :, 1]
        elif self.cfg.activation == "geglu":
            h_BLF = jax.nn.gelu(h_BLnF[:, :, 0]) * h_BLnF[:, :, 1]
        else:
            h_BLF = jax.nn.gelu(h_BLnF[:, :, 0])
        out_BLD = _dense(h_BLF, _weight(self.w_out, dt))
        if self.b_out is not None:
            out_BLD = out_BLD + _weight(self.b_out, dt)
        return out_BLD


class Block(nnx.Module):
    """Pre-LN Transformer block; with `sandwich_norm` the branch outputs are normed too."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs, mk: _Params):
        self.attn_norm = Norm(cfg.d_model, cfg, mk)
        self.attn = Attention(cfg, rngs, mk)
        self.mlp_norm = Norm(cfg.d_model, cfg, mk)
        self.mlp = MLP(cfg, rngs, mk)
        if cfg.sandwich_norm:
            self.attn_out_norm = Norm(cfg.d_model, cfg, mk)
            self.mlp_out_norm = Norm(cfg.d_model, cfg, mk)
        self.sandwich = cfg.sandwich_norm

    def _mlp(self, x_BLD):
        out_BLD = self.mlp(self.mlp_norm(x_BLD))
        return self.mlp_out_norm(out_BLD) if self.sandwich else out_BLD

    def __call__(
        self, x_BLD, rope_sincos, mask_B1LM, window=None, segment_ids_BL=None,
        *, return_activations=False,
    ):  # fmt: skip
        """(x, max attention logit[, {"attn": attn out, "mlp": MLP out}]).

        `window`: a sliding-window layer's window (keys i - j < window), else None;
        `segment_ids_BL`: the packing segments (for attention='splash')."""
        if window is not None:
            L = x_BLD.shape[1]
            band_LM = jnp.arange(L)[:, None] - jnp.arange(L)[None, :] < window
            mask_B1LM = mask_B1LM & band_LM
        attn_BLD, max_logit = self.attn(
            self.attn_norm(x_BLD), rope_sincos, mask_B1LM, segment_ids_BL, window
        )
        if self.sandwich:
            attn_BLD = self.attn_out_norm(attn_BLD)
        x_BLD = x_BLD + attn_BLD
        mlp_BLD = self._mlp(x_BLD)
        x_BLD = x_BLD + mlp_BLD
        if return_activations:
            return x_BLD, max_logit, {"attn": attn_BLD, "mlp": mlp_BLD}
        return x_BLD, max_logit

    def cached(self, x_BSD, rope_sincos, cache, index, key_valid_BT, window=None):
        """The block on S new tokens with a KV cache (see `Attention.cached`)."""
        attn_BSD, cache = self.attn.cached(
            self.attn_norm(x_BSD), rope_sincos, cache, index, key_valid_BT, window
        )
        if self.sandwich:
            attn_BSD = self.attn_out_norm(attn_BSD)
        x_BSD = x_BSD + attn_BSD
        return x_BSD + self._mlp(x_BSD), cache


def readout_logits(hidden_BLD, readout_DV, softcap: float = 0.0):
    """Logits [B, L, V] in float32: hidden @ readout, then cap * tanh(. / cap) if `softcap`."""
    logits_BLV = _dense(hidden_BLD, readout_DV, out_dtype=jnp.float32)
    return softcap * jnp.tanh(logits_BLV / softcap) if softcap else logits_BLV


def attention_mask(segment_ids_BL):
    """[B, 1, L, M] bool: causal, and only within the same segment (packed documents)."""
    L = segment_ids_BL.shape[1]
    causal_LM = jnp.tril(jnp.ones((L, L), dtype=bool))
    same_BLM = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    return (causal_LM[None] & same_BLM)[:, None]


class Transformer(nnx.Module):
    """Decoder-only LM: tokens [B, L] -> logits [B, L, V] (float32)."""

    def __init__(
        self, cfg: TransformerConfig, rngs: nnx.Rngs, param: Parameterization | None = None
    ):
        """`param` sets every parameter's init std and forward multiplier
        (:mod:`lm_align.parameterization`); None is standard parameterization at
        its base width (embedding std 1, matrices 1/sqrt(fan_in), multipliers 1)."""
        D, V = cfg.d_model, cfg.vocab_size
        self.cfg = cfg
        param = param or Parameterization(width=D, base_width=D)
        if param.width != D:
            raise ValueError(f"parameterization width {param.width} != model.d_model {D}")
        if cfg.tie_embeddings:
            param.check_tied_embeddings()
        mk = _Params(cfg, param)
        embed_std = cfg.embed_init_std or (1 / math.sqrt(D) if cfg.tie_embeddings else 1.0)
        # Rows sharded (vocab over tensor and fsdp), the model dim whole: a lookup is
        # then a masked gather + sum, and the activations can stay batch-sharded.
        self.embed = mk.normal(rngs, (V, D), ("vocab", None), base_std=embed_std)
        if cfg.position == "learned":
            self.pos_embed = mk.normal(rngs, (cfg.max_len, D), (None, "embed"), base_std=embed_std)
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs):
                return Block(cfg, rngs, mk)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs, mk) for _ in range(cfg.n_layers)])
        self.final_norm = Norm(D, cfg, mk)
        if not cfg.tie_embeddings:
            self.readout = mk.normal(rngs, (D, V), ("embed", "vocab"), truncated=True)

    def embed_inputs(self, tokens_BL, positions_BL):
        """(embedded tokens [B, L, D] in the compute dtype, RoPE tables or None).

        The RoPE tables are computed once and shared by every layer."""
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        rope_sincos = (
            rope_tables(positions_BL, rope_frequencies(cfg)) if cfg.position == "rope" else None
        )
        x_BLD = _lookup(self.embed, tokens_BL, dt)
        if cfg.scale_embeddings:
            x_BLD = x_BLD * jnp.asarray(math.sqrt(cfg.d_model), dt)
        if cfg.position == "learned":
            x_BLD = x_BLD + _lookup(self.pos_embed, positions_BL, dt)
        return x_BLD, rope_sincos

    def cached(self, tokens_BS, positions_BS, cache, index, key_valid_BT):
        """Logits [B, S, V] (float32) of S new tokens and the updated KV cache.

        The tokens occupy cache slots [index, index + S) and attend to every
        earlier slot whose `key_valid_BT` is True (left padding is not), and to
        themselves causally. `positions_BS` are their RoPE / learned positions.
        `cache` is `init_cache(...)`'s (k, v), each [N, B, T, H, K]. Prefill a
        left-padded prompt with index 0, then decode one token at a time.
        """
        cfg = self.cfg
        x_BSD, rope_sincos = self.embed_inputs(tokens_BS, positions_BS)

        def layer(x_BSD, block_state_cache_window):
            graph_state, k, v, window = block_state_cache_window
            block = nnx.merge(graph, graph_state)
            x_BSD, (k, v) = block.cached(x_BSD, rope_sincos, (k, v), index, key_valid_BT, window)
            return x_BSD, (k, v)

        windows = self.layer_windows()
        if cfg.scan_layers:
            graph, stacked = nnx.split(self.blocks)
            xs = (stacked, cache[0], cache[1], windows)
            x_BSD, (k_N, v_N) = jax.lax.scan(layer, x_BSD, xs)
        else:
            ks, vs = [], []
            for i, block in enumerate(self.blocks):
                graph, state = nnx.split(block)
                x_BSD, (k, v) = layer(x_BSD, (state, cache[0][i], cache[1][i], windows[i]))
                ks.append(k)
                vs.append(v)
            k_N, v_N = jnp.stack(ks), jnp.stack(vs)
        return self.logits(self.final_norm(x_BSD)), (k_N, v_N)

    def layer_windows(self):
        """Each layer's sliding window (None: global attention). Under scan, an
        [N] int32 array (global layers: 2^30) or None when no layer is local."""
        cfg = self.cfg
        local_N = cfg.local_layers()
        if not cfg.scan_layers:
            return [cfg.sliding_window if local else None for local in local_N]
        if not any(local_N):
            return None
        return jnp.asarray([cfg.sliding_window if local else 2**30 for local in local_N], jnp.int32)

    def readout_matrix(self):
        """[D, V] in the compute dtype: logits = final hidden states @ this
        (then soft-capped when `cfg.final_logit_softcap`)."""
        dt = DTYPES[self.cfg.dtype]
        return _weight(self.embed, dt).T if self.cfg.tie_embeddings else _weight(self.readout, dt)

    def logits(self, hidden_BLD):
        """Logits [B, L, V] (float32, accumulated in float32) of final-normed hidden states."""
        return readout_logits(hidden_BLD, self.readout_matrix(), self.cfg.final_logit_softcap)

    def __call__(
        self,
        tokens_BL,
        *,
        positions_BL=None,
        segment_ids_BL=None,
        return_diagnostics=False,
        return_hidden=False,
        return_activations=False,
        constrain_BLD=None,
    ):
        """Logits [B, L, V] in float32; with `return_diagnostics`, also a dict with
        `max_attn_logit` [N]: max pre-softmax attention logit per layer (masked
        entries excluded). With `return_hidden`, the final-normed hidden states
        [B, L, D] replace the logits (for a fused readout + loss). With
        `return_activations`, the diagnostics also hold every layer's output:
        `embedding` [B, L, D], `attn` and `mlp` [N, B, L, D] (each block's branch
        outputs before the residual add) and `logits` [B, L, V] (coordinate checks).
        `constrain_BLD` (e.g. a sharding constraint to batch sharding) is applied
        to the residual stream after the embedding and after every block."""
        constrain_BLD = constrain_BLD or (lambda x: x)
        cfg = self.cfg
        B, L = tokens_BL.shape
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones((B, L), dtype=jnp.int32)
        mask_B1LM = attention_mask(segment_ids_BL)
        x_BLD, rope_sincos = self.embed_inputs(tokens_BL, positions_BL)
        x_BLD = constrain_BLD(x_BLD)

        embedding_BLD = x_BLD

        def block_fn(block_graph, block_state, x_BLD, window):
            block = nnx.merge(block_graph, block_state)
            x_BLD, *rest = block(
                x_BLD, rope_sincos, mask_B1LM, window, segment_ids_BL,
                return_activations=return_activations,
            )  # fmt: skip
            return constrain_BLD(x_BLD), tuple(rest)

        policy = REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            block_fn = jax.checkpoint(block_fn, policy=policy, static_argnums=(0,))

        windows = self.layer_windows()
        if cfg.scan_layers:
            graph, stacked = nnx.split(self.blocks)
            x_BLD, per_layer = jax.lax.scan(
                lambda x, sw: block_fn(graph, sw[0], x, sw[1]), x_BLD, (stacked, windows)
            )
        else:
            outs = []
            for block, window in zip(self.blocks, windows):
                graph, state = nnx.split(block)
                x_BLD, rest = block_fn(graph, state, x_BLD, window)
                outs.append(rest)
            per_layer = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

        x_BLD = self.final_norm(x_BLD)
        if return_hidden and not return_activations:
            out = x_BLD
        else:
            logits_BLV = self.logits(x_BLD)
            out = x_BLD if return_hidden else logits_BLV
        if return_activations:
            diag = {"max_attn_logit": per_layer[0], "embedding": embedding_BLD, **per_layer[1]}
            return out, {**diag, "logits": logits_BLV}
        if return_diagnostics:
            return out, {"max_attn_logit": per_layer[0]}
        return out


def init_cache(cfg: TransformerConfig, batch: int, length: int, dtype=None):
    """Empty KV cache: (k, v), each [n_layers, batch, length, n_kv_heads, head_dim]."""
    shape = (cfg.n_layers, batch, length, cfg.resolved_kv_heads, cfg.resolved_head_dim)
    dtype = dtype or DTYPES[cfg.dtype]
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def config_from_dict(model_cfg: Any) -> TransformerConfig:
    """TransformerConfig from a mapping (e.g. the `model` ConfigDict group)."""
    d = dict(model_cfg)
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown model config fields {unknown}; valid fields: {sorted(known)}")
    return TransformerConfig(**d)


def model_defaults() -> dict:
    """Default `model` config group (TransformerConfig's fields and defaults)."""
    return {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
