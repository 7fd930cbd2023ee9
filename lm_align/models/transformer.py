"""Decoder-only Transformer in Flax NNX.

Pre-LN blocks: x + Attn(Norm(x)), then x + MLP(Norm(x)); a final norm and a
readout to the vocabulary. Options: RoPE or learned positions, LayerNorm or
RMSNorm, GeLU or SwiGLU MLP, qk-layernorm (Wortsman et al. 2023), tied or
untied embeddings, scan over layers, remat.

Shape-suffix legend:
  B batch, L query length, M key length, D model dim, H heads, K head dim,
  F MLP hidden dim, V vocab, N layers.

Every parameter carries logical axis names (`embed`, `vocab`, `heads`,
`head_dim`, `mlp`, `layers`) in its `sharding_names` metadata; `lm_align.parallel`
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


def _param(rngs: nnx.Rngs, shape, std: float, names, dtype, *, truncated: bool = False):
    init = nnx.initializers.truncated_normal(std) if truncated else nnx.initializers.normal(std)
    return nnx.Param(init(rngs.params(), shape, dtype), sharding_names=names)


def _ones(shape, names, dtype):
    return nnx.Param(jnp.ones(shape, dtype), sharding_names=names)


def _zeros(shape, names, dtype):
    return nnx.Param(jnp.zeros(shape, dtype), sharding_names=names)


class Norm(nnx.Module):
    """LayerNorm or RMSNorm over the last axis, with a learnable scale (and bias)."""

    def __init__(
        self,
        size: int,
        cfg: TransformerConfig,
        names=("embed",),
        *,
        kind: str | None = None,
        use_bias: bool | None = None,
    ):
        pdt = DTYPES[cfg.param_dtype]
        self.kind = kind or cfg.norm
        self.eps = cfg.norm_eps
        self.scale = _ones((size,), names, pdt)
        self.bias = (
            _zeros((size,), names, pdt)
            if (cfg.use_bias if use_bias is None else use_bias)
            else None
        )

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        y = y * self.scale.value.astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias.value.astype(jnp.float32)
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

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        D, H, K = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
        pdt = DTYPES[cfg.param_dtype]
        self.cfg = cfg
        # Fused q/k/v projection: one [D, 3, H, K] matmul.
        self.qkv = _param(
            rngs,
            (D, 3, H, K),
            1 / math.sqrt(D),
            ("embed", None, "heads", "head_dim"),
            pdt,
            truncated=True,
        )
        self.out = _param(
            rngs,
            (H, K, D),
            1 / math.sqrt(H * K),
            ("heads", "head_dim", "embed"),
            pdt,
            truncated=True,
        )
        self.qkv_bias = (
            _zeros((3, H, K), (None, "heads", "head_dim"), pdt) if cfg.use_bias else None
        )
        self.out_bias = _zeros((D,), ("embed",), pdt) if cfg.use_bias else None
        if cfg.qk_layernorm:
            # One scale of size K shared by all heads, no bias (spec section 3).
            self.q_norm = Norm(K, cfg, ("head_dim",), kind="layernorm", use_bias=False)
            self.k_norm = Norm(K, cfg, ("head_dim",), kind="layernorm", use_bias=False)

    def __call__(self, x_BLD, rope_sincos, mask_B1LM):
        """`rope_sincos`: `rope_tables(...)` for RoPE models, else None."""
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        B, L, D = x_BLD.shape
        _, _, H, K = self.qkv.value.shape
        qkv_BL3HK = _dense(x_BLD, self.qkv.value.astype(dt)).reshape(B, L, 3, H, K)
        if self.qkv_bias is not None:
            qkv_BL3HK = qkv_BL3HK + self.qkv_bias.value.astype(dt)
        q_BLHK, k_BMHK, v_BMHK = (qkv_BL3HK[:, :, i] for i in range(3))
        if cfg.qk_layernorm:
            q_BLHK, k_BMHK = self.q_norm(q_BLHK), self.k_norm(k_BMHK)
        if rope_sincos is not None:
            q_BLHK = apply_rope(q_BLHK, *rope_sincos)
            k_BMHK = apply_rope(k_BMHK, *rope_sincos)
        q_BLHK = q_BLHK * (1.0 / math.sqrt(q_BLHK.shape[-1]))
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
        out_BLD = _dense(ctx_BLHK.reshape(B, L, H * K), self.out.value.astype(dt), contract=2)
        if self.out_bias is not None:
            out_BLD = out_BLD + self.out_bias.value.astype(dt)
        return out_BLD, max_logit


class MLP(nnx.Module):
    """GeLU MLP, or SwiGLU (silu(x W_gate) * x W_up) W_out."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.d_ff
        pdt = DTYPES[cfg.param_dtype]
        self.cfg = cfg
        n_in = 2 if cfg.activation == "swiglu" else 1
        self.w_in = _param(
            rngs, (D, n_in, F), 1 / math.sqrt(D), ("embed", None, "mlp"), pdt, truncated=True
        )
        self.w_out = _param(rngs, (F, D), 1 / math.sqrt(F), ("mlp", "embed"), pdt, truncated=True)
        self.b_in = _zeros((n_in, F), (None, "mlp"), pdt) if cfg.use_bias else None
        self.b_out = _zeros((D,), ("embed",), pdt) if cfg.use_bias else None

    def __call__(self, x_BLD):
        dt = DTYPES[self.cfg.dtype]
        B, L, _ = x_BLD.shape
        _, n, F = self.w_in.value.shape
        h_BLnF = _dense(x_BLD, self.w_in.value.astype(dt)).reshape(B, L, n, F)
        if self.b_in is not None:
            h_BLnF = h_BLnF + self.b_in.value.astype(dt)
        if self.cfg.activation == "swiglu":
            h_BLF = jax.nn.silu(h_BLnF[:, :, 0]) * h_BLnF[:, :, 1]
        else:
            h_BLF = jax.nn.gelu(h_BLnF[:, :, 0])
        out_BLD = _dense(h_BLF, self.w_out.value.astype(dt))
        if self.b_out is not None:
            out_BLD = out_BLD + self.b_out.value.astype(dt)
        return out_BLD


class Block(nnx.Module):
    """Pre-LN Transformer block."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg.d_model, cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg.d_model, cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BLD, rope_sincos, mask_B1LM):
        attn_BLD, max_logit = self.attn(self.attn_norm(x_BLD), rope_sincos, mask_B1LM)
        x_BLD = x_BLD + attn_BLD
        x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD))
        return x_BLD, max_logit


def attention_mask(segment_ids_BL):
    """[B, 1, L, M] bool: causal, and only within the same segment (packed documents)."""
    L = segment_ids_BL.shape[1]
    causal_LM = jnp.tril(jnp.ones((L, L), dtype=bool))
    same_BLM = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    return (causal_LM[None] & same_BLM)[:, None]


class Transformer(nnx.Module):
    """Decoder-only LM: tokens [B, L] -> logits [B, L, V] (float32)."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        D, V = cfg.d_model, cfg.vocab_size
        pdt = DTYPES[cfg.param_dtype]
        self.cfg = cfg
        embed_std = cfg.embed_init_std or (1 / math.sqrt(D) if cfg.tie_embeddings else 1.0)
        # Rows sharded (vocab over tensor and fsdp), the model dim whole: a lookup is
        # then a masked gather + sum, and the activations can stay batch-sharded.
        self.embed = _param(rngs, (V, D), embed_std, ("vocab", None), pdt)
        if cfg.position == "learned":
            self.pos_embed = _param(rngs, (cfg.max_len, D), embed_std, (None, "embed"), pdt)
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs):
                return Block(cfg, rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = Norm(D, cfg)
        if not cfg.tie_embeddings:
            self.readout = _param(
                rngs, (D, V), 1 / math.sqrt(D), ("embed", "vocab"), pdt, truncated=True
            )

    def readout_matrix(self):
        """[D, V] in the compute dtype: logits = final hidden states @ this."""
        readout_DV = self.embed.value.T if self.cfg.tie_embeddings else self.readout.value
        return readout_DV.astype(DTYPES[self.cfg.dtype])

    def __call__(
        self,
        tokens_BL,
        *,
        positions_BL=None,
        segment_ids_BL=None,
        return_diagnostics=False,
        return_hidden=False,
        constrain_BLD=None,
    ):
        """Logits [B, L, V] in float32; with `return_diagnostics`, also a dict with
        `max_attn_logit` [N]: max pre-softmax attention logit per layer (masked
        entries excluded). With `return_hidden`, the final-normed hidden states
        [B, L, D] replace the logits (for a fused readout + loss).
        `constrain_BLD` (e.g. a sharding constraint to batch sharding) is applied
        to the residual stream after the embedding and after every block."""
        constrain_BLD = constrain_BLD or (lambda x: x)
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        B, L = tokens_BL.shape
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones((B, L), dtype=jnp.int32)
        mask_B1LM = attention_mask(segment_ids_BL)
        # Computed once and shared by every layer.
        rope_sincos = (
            rope_tables(positions_BL, cfg.resolved_head_dim, cfg.rope_theta)
            if cfg.position == "rope"
            else None
        )

        x_BLD = jnp.take(self.embed.value, tokens_BL, axis=0).astype(dt)
        if cfg.position == "learned":
            x_BLD = x_BLD + jnp.take(self.pos_embed.value, positions_BL, axis=0).astype(dt)
        x_BLD = constrain_BLD(x_BLD)

        def block_fn(block_graph, block_state, x_BLD):
            block = nnx.merge(block_graph, block_state)
            x_BLD, max_logit = block(x_BLD, rope_sincos, mask_B1LM)
            return constrain_BLD(x_BLD), max_logit

        policy = REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            block_fn = jax.checkpoint(block_fn, policy=policy, static_argnums=(0,))

        if cfg.scan_layers:
            graph, stacked = nnx.split(self.blocks)
            x_BLD, max_logit_N = jax.lax.scan(lambda x, s: block_fn(graph, s, x), x_BLD, stacked)
        else:
            max_logits = []
            for block in self.blocks:
                graph, state = nnx.split(block)
                x_BLD, m = block_fn(graph, state, x_BLD)
                max_logits.append(m)
            max_logit_N = jnp.stack(max_logits)

        x_BLD = self.final_norm(x_BLD)
        out = x_BLD if return_hidden else _dense(x_BLD, self.readout_matrix()).astype(jnp.float32)
        if return_diagnostics:
            return out, {"max_attn_logit": max_logit_N}
        return out


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
