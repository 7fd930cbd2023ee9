"""Fused attention kernels behind `model.attention` (the reference path is in transformer.py).

All take queries already multiplied by the query scale, q [B, L, H, K], and
keys/values [B, M, G, K] with G dividing H (query head h reads key/value head
h // (H / G)), and return the context [B, L, H, K]:

- `dot_product`: `jax.nn.dot_product_attention` (cuDNN flash attention on GPU
  where it supports the call, XLA otherwise) with a boolean mask;
- `splash`: Pallas splash attention (`jax.experimental.pallas.ops.tpu.
  splash_attention`): causal or sliding-window masks, segment ids and logit
  soft-capping inside the kernel, never materialising [L, M] scores. It is
  compiled for TPU and run by the Pallas interpreter on other backends (tests).

Neither returns the row maxima of the scores, so `max_logit_bound` stands in
for the max-attention-logit diagnostic: max ||q|| * max ||k|| per head, an upper
bound on every q . k (capped at the soft-cap).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SPLASH_BLOCK = 128  # splash block size; sequence lengths must be multiples of it


def dot_product(q_BLHK, k_BMGK, v_BMGK, mask_B1LM):
    """`jax.nn.dot_product_attention` on pre-scaled queries and a [B, 1, L, M] mask."""
    return jax.nn.dot_product_attention(q_BLHK, k_BMGK, v_BMGK, mask=mask_B1LM, scale=1.0)


def max_logit_bound(q_BLHK, k_BMGK, softcap: float = 0.0):
    """max over heads of (max_i ||q_i||) (max_j ||k_j||): >= every attention logit."""
    B, L, H, _ = q_BLHK.shape
    G = k_BMGK.shape[2]
    q_norm_BH = jnp.max(jnp.linalg.norm(q_BLHK.astype(jnp.float32), axis=-1), axis=1)
    k_norm_BG = jnp.max(jnp.linalg.norm(k_BMGK.astype(jnp.float32), axis=-1), axis=1)
    bound = jnp.max(q_norm_BH.reshape(B, G, H // G) * k_norm_BG[:, :, None])
    bound = jnp.minimum(bound, softcap) if softcap else bound
    return jax.lax.stop_gradient(bound)


def _splash_kernel(length: int, queries_per_kv: int, window: int | None, softcap: float, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel,
        splash_attention_mask as masks,
    )

    shape = (length, length)
    one = masks.CausalMask(shape) if window is None else masks.LocalMask(shape, (window - 1, 0), 0)
    block = min(SPLASH_BLOCK * 4, length) if length % (SPLASH_BLOCK * 4) == 0 else SPLASH_BLOCK
    sizes = kernel.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    return kernel.make_splash_mqa_single_device(
        masks.MultiHeadMask([one] * queries_per_kv),
        block_sizes=sizes,
        attn_logits_soft_cap=softcap or None,
        interpret=interpret,
    )


def splash(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, window: int | None, softcap: float = 0.0):
    """Splash attention: causal (or `window`: keys i - j < window), within segments.

    Each key/value head with its H / G query heads is one multi-query kernel
    call (vmapped over batch and groups).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import (
        SegmentIds,
    )

    B, L, H, K = q_BLHK.shape
    G = k_BLGK.shape[2]
    if L % SPLASH_BLOCK:
        raise ValueError(
            f"model.attention='splash' needs a sequence length that is a multiple of "
            f"{SPLASH_BLOCK} (got {L}); change data.seq_len or use model.attention='reference'"
        )
    q_BGRLK = q_BLHK.reshape(B, L, G, H // G, K).transpose(0, 2, 3, 1, 4)
    k_BGLK, v_BGLK = k_BLGK.transpose(0, 2, 1, 3), v_BLGK.transpose(0, 2, 1, 3)

    def per_shard(q_BGRLK, k_BGLK, v_BGLK, segment_ids_BL):
        def run(interpret):
            kernel = _splash_kernel(L, H // G, window, float(softcap), interpret)

            def one(q_RLK, k_LK, v_LK, seg_L):
                return kernel(q_RLK, k_LK, v_LK, segment_ids=SegmentIds(q=seg_L, kv=seg_L))

            per_group = jax.vmap(one, in_axes=(0, 0, 0, None))
            return jax.vmap(per_group)(q_BGRLK, k_BGLK, v_BGLK, segment_ids_BL)

        # The Mosaic kernel where the program is lowered for TPU; the interpreter elsewhere.
        return jax.lax.platform_dependent(tpu=lambda: run(False), default=lambda: run(True))

    out_BGRLK = _over_mesh(per_shard, B, G)(q_BGRLK, k_BGLK, v_BGLK, segment_ids_BL)
    return out_BGRLK.transpose(0, 3, 1, 2, 4).reshape(B, L, H, K)


def _over_mesh(fn, batch: int, kv_heads: int):
    """`fn` on each device's rows and key/value heads (`shard_map`) under a mesh context.

    A Pallas kernel is one custom call that XLA cannot partition. Inside
    `jax.sharding.use_abstract_mesh(mesh)` (the train steps set it) the rows go
    over every mesh axis but `tensor` (the batch axes) and the key/value heads
    over `tensor` where they divide; without a multi-device mesh, `fn` itself.
    """
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn
    rows = tuple(a for a in mesh.axis_names if a != "tensor" and mesh.shape[a] > 1)
    if batch % math.prod(mesh.shape[a] for a in rows):
        rows = ()
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and kv_heads % tensor == 0 else None
    rows = rows or None
    q, kv, seg = P(rows, heads, None, None, None), P(rows, heads, None, None), P(rows, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q, kv, kv, seg), out_specs=q, check_vma=False)
