"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

    logits_BV = model.apply(params, tokens)[:, -1]
    tokens_B, logps_B = sample_next(rng, logits_BV, temperature=0.7, top_k=40)

`logps_B` are the model's log-probs of the chosen tokens (log softmax of the
raw logits, temperature 1), the quantity preference losses and KL estimates
need; the sampling distribution itself is `softmax(process_logits(...))`.
Batched autoregressive decoding with a KV cache builds on these functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def process_logits(
    logits_BV: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """Logits of the sampling distribution: scaled by 1/temperature, tokens
    outside the top k and outside the nucleus set to -inf.

    top_k = 0 keeps every token. top_p < 1 keeps the smallest set of most
    likely tokens whose probability (after temperature and top-k) reaches
    top_p; the most likely token is always kept. Ties at the k-th logit are
    all kept.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use greedy decoding for 0)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
    x = logits_BV.astype(jnp.float32) / temperature
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x < kth, NEG_INF, x)
    if top_p < 1:
        order = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better tokens
        drop_sorted = mass_before >= top_p
        drop = (
            jnp.zeros_like(drop_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(drop_sorted)
        )
        x = jnp.where(drop, NEG_INF, x)
    return x


def sample_next(
    rng: jax.Array,
    logits_BV: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(tokens int32 [B], model log-probs float32 [B]) for one decoding step.

    ``greedy`` (or what decoding with temperature 0 means) takes the argmax and
    ignores rng, temperature, top_k and top_p.
    """
    logits = logits_BV.astype(jnp.float32)
    if greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        x = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        tokens = jax.random.categorical(rng, x, axis=-1)
    logps = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logps, tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), picked
