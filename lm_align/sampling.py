"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

    logits_BV = model.apply(params, tokens)[:, -1]
    tokens_B, logps_B = sample_next(rng, logits_BV, temperature=0.7, top_k=40)

`logps_B` are the model's log-probs of the chosen tokens (log softmax of the
raw logits, temperature 1), the quantity preference losses and KL estimates
need; the sampling distribution itself is `softmax(process_logits(...))`.
`generate` decodes batches of prompts with a KV cache:

    out = generate(model, params, [[1, 50, 51], [1, 52]], max_new_tokens=8,
                   num_samples=4, temperature=0.7, top_k=40, stop_tokens=[2], rng=0)
    out.tokens, out.logps, out.lengths   # [8, 8], [8, 8], [8]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lm_align import parallel

NEG_INF = -jnp.inf


def check_settings(*, temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError naming the bad sampling setting and its valid range."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use greedy decoding for 0)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")


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
    check_settings(temperature=temperature, top_k=top_k, top_p=top_p)
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


class Generation(NamedTuple):
    tokens: jax.Array  # int32 [B * n, max_new_tokens]; pad_id after a stop token
    logps: jax.Array  # float32 [B * n, max_new_tokens]: model log-probs; 0 after a stop
    lengths: jax.Array  # int32 [B * n]: generated tokens, the stop token included
    prompt_index: jax.Array  # int32 [B * n]: which prompt each row continues


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (tokens int32 [B, P], valid bool [B, P]), right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. bos)")
    P = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    valid = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p) :] = p
        valid[i, P - len(p) :] = True
    return tokens, valid


def generate(
    model: Any,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    rng: jax.Array | int = 0,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> Generation:
    """Batched autoregressive decoding with a KV cache (one compiled program).

    Prompts of different lengths are left-padded so that every row's next
    token lands in the same cache slot; padding is masked out of attention and
    positions start at 0 at each prompt's first real token. Each prompt is
    continued `num_samples` times (rows `i * num_samples ... + num_samples - 1`).
    A row stops after emitting one of `stop_tokens`. Reproducible from `rng`.

    With a `mesh`, rows and the KV cache are split over its data/fsdp axes
    like the train step's batch (params keep their own shardings); the
    tokens are the same as unsharded. The row count (prompts x num_samples)
    must then be a multiple of the data-parallel size.

    Args:
      model: a `lm_align.models.pure.PureModel`.
      params: its parameters.
      prompts: token id lists (include bos if the model was trained with it).
      max_new_tokens: tokens generated per row (fixed shapes).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    if not greedy:
        check_settings(temperature=temperature, top_k=top_k, top_p=top_p)
    tokens_BP, valid_BP = left_pad(prompts, pad_id)
    tokens_BP = np.repeat(tokens_BP, num_samples, axis=0)
    valid_BP = np.repeat(valid_BP, num_samples, axis=0)
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    fn = _decoder(
        model,
        max_new_tokens,
        float(temperature),
        int(top_k),
        float(top_p),
        bool(greedy),
        tuple(int(t) for t in stop_tokens),
        int(pad_id),
        mesh,
    )
    if mesh is not None:
        dp = parallel.data_parallel_size(mesh)
        if len(tokens_BP) % dp:
            raise ValueError(
                f"{len(tokens_BP)} rows (prompts x num_samples) do not split over the mesh's "
                f"data-parallel size {dp}; pass a multiple of {dp} rows or mesh=None"
            )
        sharding = parallel.batch_sharding(mesh)
        tokens_BP = jax.device_put(tokens_BP, sharding)
        valid_BP = jax.device_put(valid_BP, sharding)
    tokens, logps, lengths = fn(params, jnp.asarray(tokens_BP), jnp.asarray(valid_BP), key)
    index = np.repeat(np.arange(len(prompts), dtype=np.int32), num_samples)
    return Generation(tokens, logps, lengths, jnp.asarray(index))


@functools.lru_cache(maxsize=32)
def _decoder(model, max_new, temperature, top_k, top_p, greedy, stop_tokens, pad_id, mesh):
    from lm_align.models.transformer import init_cache

    stop = jnp.asarray(stop_tokens, jnp.int32) if stop_tokens else None

    @jax.jit
    def run(params, tokens_BP, valid_BP, key):
        module = model.bind(params)
        B, P = tokens_BP.shape
        key_valid_BT = jnp.concatenate([valid_BP, jnp.ones((B, max_new), bool)], axis=1)
        prompt_len_B = jnp.sum(valid_BP, axis=1).astype(jnp.int32)
        positions_BP = jnp.maximum(jnp.cumsum(valid_BP, axis=1) - 1, 0).astype(jnp.int32)
        cache = init_cache(model.cfg, B, P + max_new)
        if mesh is not None:  # [n_layers, B, T, H, K]: rows split like the batch
            spec = jax.sharding.PartitionSpec(None, parallel.BATCH_AXES)
            cache = jax.lax.with_sharding_constraint(cache, jax.sharding.NamedSharding(mesh, spec))
        logits_BPV, cache = module.cached(tokens_BP, positions_BP, cache, 0, key_valid_BT)

        def step(carry, t):
            logits_BV, cache, done_B, key = carry
            key, sub = jax.random.split(key)
            tok_B, logp_B = sample_next(
                sub, logits_BV, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
            )
            tok_B = jnp.where(done_B, pad_id, tok_B)
            logp_B = jnp.where(done_B, 0.0, logp_B)
            live_B = ~done_B
            if stop is not None:
                done_B = done_B | jnp.any(tok_B[:, None] == stop[None, :], axis=1)
            logits_B1V, cache = module.cached(
                tok_B[:, None], (prompt_len_B + t)[:, None], cache, P + t, key_valid_BT
            )
            return (logits_B1V[:, 0], cache, done_B, key), (tok_B, logp_B, live_B)

        init = (logits_BPV[:, -1], cache, jnp.zeros((B,), bool), key)
        _, (toks, logps, live) = jax.lax.scan(step, init, jnp.arange(max_new))
        return toks.T, logps.T, jnp.sum(live, axis=0).astype(jnp.int32)

    return run
