"""Decoder-only Transformer in Flax NNX.

Pre-LN blocks: x + Attn(Norm(x)), then x + MLP(Norm(x)); a final norm and a
readout to the vocabulary. Options: RoPE or learned positions, LayerNorm or
RMSNorm, GeLU or SwiGLU MLP, qk-layernorm (Wortsman et al. 2023), tied or
untied embeddings, scan over layers, remat.

Shape-suffix legend:
  B batch, L query length, M key length, D model dim, H heads, K head dim,
  F MLP hidden dim, V vocab, N layers.

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

from lm_align.parameterization import Parameterization, fan_in, role_of

# Variables are created abstractly and sharded by `lm_align.parallel`, never eagerly.
flax.config.update("flax_always_shard_variable", False)

ACTIVATIONS = ("gelu", "swiglu")
POSITIONS = ("rope", "learned")
NORMS = ("layernorm", "rmsnorm")
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
    head_dim: int | None = None  # default d_model // n_heads
    d_ff: int = 512  # MLP hidden width
    activation: str = "gelu"  # gelu | swiglu
    position: str = "rope"  # rope | learned
    max_len: int = 2048  # table size for learned positions
    rope_theta: float = 10_000.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-6
    qk_layernorm: bool = False  # per-head LayerNorm on q and k (scale only)
    use_bias: bool = False  # biases in dense layers and norms
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
        choices = [
            ("activation", ACTIVATIONS),
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

    def num_params(self, *, matmul_only: bool = False) -> int:
        """Parameter count; `matmul_only` counts weights used in matmuls (the 6N of FLOPs)."""
        D, F, V, N = self.d_model, self.d_ff, self.vocab_size, self.n_layers
        HK = self.n_heads * self.resolved_head_dim
        mlp_in = 2 * D * F if self.activation == "swiglu" else D * F
        per_layer = 3 * D * HK + HK * D + mlp_in + F * D
        readout = V * D
        if matmul_only:
            return N * per_layer + readout
        vec = D * (2 if self.use_bias else 1)
        per_layer += 2 * vec + (2 * self.resolved_head_dim if self.qk_layernorm else 0)
        if self.use_bias:
            per_layer += 3 * HK + D + (2 * F if self.activation == "swiglu" else F) + D
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


def _dense(x_BLI, w, contract: int = 1):
    """[B, L, I] x w -> [B, L, O]: the first `contract` axes of w (product I) are
    contracted, the rest (product O) are outputs; one 2-D matmul over B*L tokens.

    (XLA:CPU emits much faster dots, with no transposes in the backward pass,
    for [tokens, I] x [I, O] than for the equivalent 3-D einsum.)
    """
    B, L, _ = x_BLI.shape
    w_IO = w.reshape(math.prod(w.shape[:contract]), -1)
    return (x_BLI.reshape(B * L, -1) @ w_IO).reshape(B, L, w_IO.shape[1])


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
    """LayerNorm or RMSNorm over the last axis, with a learnable scale (and bias)."""

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
        self.scale = mk.const((size,), names, 1.0)
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
        y = y * _weight(self.scale, jnp.float32)
        if self.bias is not None:
            y = y + _weight(self.bias, jnp.float32)
        return y.astype(x.dtype)


def rope_tables(positions_BL, head_dim: int, theta: float):
    """(sin, cos), each [B, L, 1, K/2]: rotary angles positions * theta^(-2i/K)."""
    inv_freq_k = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle_BLk = positions_BL[..., None].astype(jnp.float32) * inv_freq_k
    return jnp.sin(angle_BLk)[:, :, None, :], jnp.cos(angle_BLk)[:, :, None, :]


def apply_rope(x_BLHK, sin_BL1k, cos_BL1k):
    """Rotates (x1, x2) halves of the head dim: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BL1k - x2 * sin_BL1k, x2 * cos_BL1k + x1 * sin_BL1k], axis=-1)
    return out.astype(x_BLHK.dtype)


def rope(x_BLHK, positions_BL, theta: float):
    """Rotary embedding (rotate-half convention) at integer `positions`."""
    return apply_rope(x_BLHK, *rope_tables(positions_BL, x_BLHK.shape[-1], theta))


class Attention(nnx.Module):
    """Multi-head causal self-attention with optional qk-layernorm."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs, mk: _Params):
        D, H, K = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
        self.cfg = cfg
        # Fused q/k/v projection: one [D, 3, H, K] matmul.
        self.qkv = mk.normal(
            rngs, (D, 3, H, K), ("embed", None, "heads", "head_dim"), truncated=True
        )
        self.out = mk.normal(rngs, (H, K, D), ("heads", "head_dim", "embed"), truncated=True)
        self.qkv_bias = (
            mk.const((3, H, K), (None, "heads", "head_dim"), 0.0) if cfg.use_bias else None
        )
        self.out_bias = mk.const((D,), ("embed",), 0.0) if cfg.use_bias else None
        if cfg.qk_layernorm:
            # One scale of size K shared by all heads, no bias (Wortsman et al. 2023, arXiv:2309.14322; docs/scaling.md).
            self.q_norm = Norm(K, cfg, mk, ("head_dim",), kind="layernorm", use_bias=False)
            self.k_norm = Norm(K, cfg, mk, ("head_dim",), kind="layernorm", use_bias=False)

    def project(self, x_BLD, rope_sincos):
        """(q scaled by 1/sqrt(K), k, v), each [B, L, H, K]: qk-norm and RoPE applied."""
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        B, L, _ = x_BLD.shape
        _, _, H, K = self.qkv.shape
        qkv_BL3HK = _dense(x_BLD, _weight(self.qkv, dt)).reshape(B, L, 3, H, K)
        if self.qkv_bias is not None:
            qkv_BL3HK = qkv_BL3HK + _weight(self.qkv_bias, dt)
        q_BLHK, k_BLHK, v_BLHK = (qkv_BL3HK[:, :, i] for i in range(3))
        if cfg.qk_layernorm:
            q_BLHK, k_BLHK = self.q_norm(q_BLHK), self.k_norm(k_BLHK)
        if rope_sincos is not None:
            q_BLHK = apply_rope(q_BLHK, *rope_sincos)
            k_BLHK = apply_rope(k_BLHK, *rope_sincos)
        return q_BLHK * (1.0 / math.sqrt(K)), k_BLHK, v_BLHK

    def attend(self, q_BLHK, k_BMHK, v_BMHK, mask_B1LM):
        """(output [B, L, D], max unmasked logit) of scaled queries over keys/values."""
        dt = DTYPES[self.cfg.dtype]
        B, L, H, K = q_BLHK.shape
        logits_BHLM = jnp.einsum("BLHK,BMHK->BHLM", q_BLHK, k_BMHK).astype(jnp.float32)
        logits_BHLM = jnp.where(mask_B1LM, logits_BHLM, jnp.finfo(jnp.float32).min)
        # Softmax by hand so its row max also gives the max-logit diagnostic (one
        # pass over the logits instead of two). Masked entries hold finfo.min and
        # every row has an unmasked diagonal, so they are never a row's max.
        row_max_BHL1 = jax.lax.stop_gradient(jnp.max(logits_BHLM, axis=-1, keepdims=True))
        exp_BHLM = jnp.exp(logits_BHLM - row_max_BHL1)
        probs_BHLM = (exp_BHLM / jnp.sum(exp_BHLM, axis=-1, keepdims=True)).astype(dt)
        max_logit = jnp.max(row_max_BHL1)
        ctx_BLHK = jnp.einsum("BHLM,BMHK->BLHK", probs_BHLM, v_BMHK)
        out_BLD = _dense(ctx_BLHK.reshape(B, L, H * K), _weight(self.out, dt), contract=2)
        if self.out_bias is not None:
            out_BLD = out_BLD + _weight(self.out_bias, dt)
        return out_BLD, max_logit

    def __call__(self, x_BLD, rope_sincos, mask_B1LM):
        """`rope_sincos`: `rope_tables(...)` for RoPE models, else None."""
        return self.attend(*self.project(x_BLD, rope_sincos), mask_B1LM)

    def cached(self, x_BSD, rope_sincos, cache, index, key_valid_BT):
        """Attention of S new tokens written into cache slots [index, index + S).

        `cache` = (k, v), each [B, T, H, K]. Slot j is visible to new token s if
        j <= index + s and `key_valid_BT[:, j]` (e.g. not left padding); a token
        always sees its own slot. Returns (output [B, S, D], new cache).
        """
        q, k, v = self.project(x_BSD, rope_sincos)
        k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, 1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, 1)
        S, T = x_BSD.shape[1], k_cache.shape[1]
        slot_S1 = index + jnp.arange(S)[:, None]
        causal_ST = jnp.arange(T)[None, :] <= slot_S1
        mask_BST = (causal_ST[None] & key_valid_BT[:, None, :]) | (
            jnp.arange(T)[None, None, :] == slot_S1[None]
        )
        out, _ = self.attend(q, k_cache, v_cache, mask_BST[:, None])
        return out, (k_cache, v_cache)


class MLP(nnx.Module):
    """GeLU MLP, or SwiGLU (silu(x W_gate) * x W_up) W_out."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs, mk: _Params):
        D, F = cfg.d_model, cfg.d_ff
        self.cfg = cfg
        n_in = 2 if cfg.activation == "swiglu" else 1
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
        else:
            h_BLF = jax.nn.gelu(h_BLnF[:, :, 0])
        out_BLD = _dense(h_BLF, _weight(self.w_out, dt))
        if self.b_out is not None:
            out_BLD = out_BLD + _weight(self.b_out, dt)
        return out_BLD


class Block(nnx.Module):
    """Pre-LN Transformer block."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs, mk: _Params):
        self.attn_norm = Norm(cfg.d_model, cfg, mk)
        self.attn = Attention(cfg, rngs, mk)
        self.mlp_norm = Norm(cfg.d_model, cfg, mk)
        self.mlp = MLP(cfg, rngs, mk)

    def __call__(self, x_BLD, rope_sincos, mask_B1LM, *, return_activations=False):
        """(x, max attention logit[, {"attn": attn out, "mlp": MLP out}])."""
        attn_BLD, max_logit = self.attn(self.attn_norm(x_BLD), rope_sincos, mask_B1LM)
        x_BLD = x_BLD + attn_BLD
        mlp_BLD = self.mlp(self.mlp_norm(x_BLD))
        x_BLD = x_BLD + mlp_BLD
        if return_activations:
            return x_BLD, max_logit, {"attn": attn_BLD, "mlp": mlp_BLD}
        return x_BLD, max_logit

    def cached(self, x_BSD, rope_sincos, cache, index, key_valid_BT):
        """The block on S new tokens with a KV cache (see `Attention.cached`)."""
        attn_BSD, cache = self.attn.cached(
            self.attn_norm(x_BSD), rope_sincos, cache, index, key_valid_BT
        )
        x_BSD = x_BSD + attn_BSD
        return x_BSD + self.mlp(self.mlp_norm(x_BSD)), cache


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
            rope_tables(positions_BL, cfg.resolved_head_dim, cfg.rope_theta)
            if cfg.position == "rope"
            else None
        )
        x_BLD = _lookup(self.embed, tokens_BL, dt)
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

        def layer(x_BSD, block_state_and_cache):
            graph_state, k, v = block_state_and_cache
            block = nnx.merge(graph, graph_state)
            x_BSD, (k, v) = block.cached(x_BSD, rope_sincos, (k, v), index, key_valid_BT)
            return x_BSD, (k, v)

        if cfg.scan_layers:
            graph, stacked = nnx.split(self.blocks)
            x_BSD, (k_N, v_N) = jax.lax.scan(layer, x_BSD, (stacked, cache[0], cache[1]))
        else:
            ks, vs = [], []
            for i, block in enumerate(self.blocks):
                graph, state = nnx.split(block)
                x_BSD, (k, v) = layer(x_BSD, (state, cache[0][i], cache[1][i]))
                ks.append(k)
                vs.append(v)
            k_N, v_N = jnp.stack(ks), jnp.stack(vs)
        x_BSD = self.final_norm(x_BSD)
        logits_BSV = _dense(x_BSD, self.readout_matrix()).astype(jnp.float32)
        return logits_BSV, (k_N, v_N)

    def readout_matrix(self):
        """[D, V] in the compute dtype: logits = final hidden states @ this."""
        dt = DTYPES[self.cfg.dtype]
        return _weight(self.embed, dt).T if self.cfg.tie_embeddings else _weight(self.readout, dt)

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

        def block_fn(block_graph, block_state, x_BLD):
            block = nnx.merge(block_graph, block_state)
            x_BLD, *rest = block(
                x_BLD, rope_sincos, mask_B1LM, return_activations=return_activations
            )
            return constrain_BLD(x_BLD), tuple(rest)

        policy = REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            block_fn = jax.checkpoint(block_fn, policy=policy, static_argnums=(0,))

        if cfg.scan_layers:
            graph, stacked = nnx.split(self.blocks)
            x_BLD, per_layer = jax.lax.scan(lambda x, s: block_fn(graph, s, x), x_BLD, stacked)
        else:
            outs = []
            for block in self.blocks:
                graph, state = nnx.split(block)
                x_BLD, rest = block_fn(graph, state, x_BLD)
                outs.append(rest)
            per_layer = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

        x_BLD = self.final_norm(x_BLD)
        if return_hidden and not return_activations:
            out = x_BLD
        else:
            logits_BLV = _dense(x_BLD, self.readout_matrix()).astype(jnp.float32)
            out = x_BLD if return_hidden else logits_BLV
        if return_activations:
            diag = {"max_attn_logit": per_layer[0], "embedding": embedding_BLD, **per_layer[1]}
            return out, {**diag, "logits": logits_BLV}
        if return_diagnostics:
            return out, {"max_attn_logit": per_layer[0]}
        return out


def init_cache(cfg: TransformerConfig, batch: int, length: int, dtype=None):
    """Empty KV cache: (k, v), each [n_layers, batch, length, n_heads, head_dim]."""
    shape = (cfg.n_layers, batch, length, cfg.n_heads, cfg.resolved_head_dim)
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
