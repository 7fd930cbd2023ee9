"""Sampling from a policy: next-token choice, KV-cache decoding, batched text in / text out.

Three levels, each built on the one below:

    tokens_B, logps_B = sample_next(rng, logits_BV, temperature=1.0, top_k=0)
    out = generate(model, params, [[1, 50, 51], [1, 52]], max_new_tokens=8,
                   num_samples=4, stop_tokens=[2], rng=0)
    out.tokens, out.logps, out.lengths   # [8, 8], [8, 8], [8]
    s = sample_texts(model, params, tokenizer, ["37+5=", "12*3="],
                     num_samples=4, max_new_tokens=8, seed=0)
    s.responses, s.token_ids, s.logps, s.lengths   # [2][4] str, [2][4] ids, [2, 4], [2, 4]
    ref_logps_PN = rescore(model, ref_params, tokenizer, prompts, s.token_ids)

`logps` are the model's log-probs of the chosen tokens (log softmax of the
raw logits, temperature 1), the quantity preference losses and KL estimates
need; the sampling distribution itself is `softmax(process_logits(...))`.

The default sampling distribution (`DEFAULT_TEMPERATURE`, `DEFAULT_TOP_K`,
`DEFAULT_TOP_P`) is the model's own: temperature 1, no top-k, no nucleus
cut. It is the distribution the log-probs above describe, so KL estimates
from samples are unbiased and policy-gradient losses (REINFORCE, BoN-aware
RL) are on-policy. Methods that follow a paper's truncated sampling pass it
explicitly, e.g. SLiC-HF, RSO and ReST-EM sample at temperature 0.7, top-k 40.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lm_align import parallel
from lm_align.data.tokenizers import doc_start

if TYPE_CHECKING:
    from lm_align.data.tokenizers import Tokenizer

NEG_INF = -jnp.inf
DEFAULT_TEMPERATURE = 1.0  # the model's own distribution (see the module docstring)
DEFAULT_TOP_K = 0  # 0 = every token
DEFAULT_TOP_P = 1.0  # 1 = no nucleus cut
DEFAULT_BATCH_SIZE = 64  # prompts per decoding call of sample_texts and rescore


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
    vocab_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(tokens int32 [B], model log-probs float32 [B]) for one decoding step.

    ``greedy`` (or what decoding with temperature 0 means) takes the argmax and
    ignores rng, temperature, top_k and top_p. ``vocab_size`` (the tokenizer's)
    keeps ids at or above it from being chosen: a model's vocabulary is often
    padded past its tokenizer's, and those ids decode to nothing. The log-probs
    stay the model's own (over all of its ids), as a rescoring pass computes them.
    """
    logits = logits_BV.astype(jnp.float32)
    choose = logits
    V = logits.shape[-1]
    if vocab_size is not None and vocab_size < V:
        choose = jnp.where(jnp.arange(V) < vocab_size, logits, NEG_INF)
    if greedy:
        tokens = jnp.argmax(choose, axis=-1)
    else:
        x = process_logits(choose, temperature=temperature, top_k=top_k, top_p=top_p)
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
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = DEFAULT_TOP_K,
    top_p: float = DEFAULT_TOP_P,
    greedy: bool = False,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    vocab_size: int | None = None,
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
      vocab_size: ids at or above it are never generated (the tokenizer's
        vocabulary, when the model's is padded past it); None: every id.
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
        None if vocab_size is None else int(vocab_size),
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
def _decoder(
    model, max_new, temperature, top_k, top_p, greedy, stop_tokens, pad_id, mesh, vocab_size
):
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
                sub, logits_BV, temperature=temperature, top_k=top_k, top_p=top_p,
                greedy=greedy, vocab_size=vocab_size,
            )  # fmt: skip
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


# ----------------------------------------------------------------------------
# Text in, text out: the sampler every caller uses
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Samples:
    """`num_samples` responses to each of P prompts (n = num_samples)."""

    responses: list[list[str]]  # [P][n] decoded text, without the eos
    token_ids: list[list[list[int]]]  # [P][n] generated ids, the eos included when emitted
    logps: np.ndarray  # float32 [P, n]: log pi(y | x), model log-probs summed over token_ids
    lengths: np.ndarray  # int32 [P, n]: len(token_ids), the eos included
    response_lengths: np.ndarray  # int32 [P, n]: tokens before the eos (lengths - 1 if ended)


def decode_response(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The text of generated ids: everything before the first eos, decoded.

    A response cut at `max_new_tokens` (no eos) is decoded whole.
    """
    ids = [int(t) for t in ids]
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids)


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """How `sample_texts` and `rescore` feed a prompt: `[bos] + tokenizer.encode(prompt)`
    (no bos for a tokenizer without one)."""
    return doc_start(tokenizer) + tokenizer.encode(prompt)


def sample_texts(
    model: Any,
    params: Any,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int = 1,
    max_new_tokens: int,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = DEFAULT_TOP_K,
    top_p: float = DEFAULT_TOP_P,
    greedy: bool = False,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mesh: jax.sharding.Mesh | None = None,
) -> Samples:
    """`num_samples` responses per prompt from the KV-cache decoder (`generate`), as text.

    Each prompt is fed as `[bos] + tokenizer.encode(prompt)` and continued
    until eos or `max_new_tokens`; a response is its generated ids before
    the eos, decoded (`decode_response`). The defaults sample from the
    model's own distribution (temperature 1, no top-k or nucleus cut; see the
    module docstring); `greedy` takes the argmax and ignores the settings.
    Ids at or above the tokenizer's vocabulary (a model's vocabulary padded
    past it) are never generated.

    RNG scheme: prompts are decoded `batch_size` at a time (`batch_size *
    num_samples` rows per call); batch b = prompts `[b * batch_size, (b + 1)
    * batch_size)` samples with the key `jax.random.fold_in(jax.random.key(seed),
    b)`. The responses are a pure function of (seed, batch_size, the settings
    and the inputs); another `batch_size` draws other (equally distributed)
    samples. The last batch is filled up with copies of its first prompt,
    whose samples are dropped, so every call has the same number of rows;
    batches whose longest prompts differ in length compile separately.

    Args:
      model: a `lm_align.models.pure.PureModel`.
      params: its parameters.
      tokenizer: the model's tokenizer (bos, eos, pad and decode are used).
      prompts: P prompt texts.
      num_samples: n, responses per prompt.
      max_new_tokens: longest response, in tokens (eos included).
      temperature: softmax temperature of the sampling distribution (`process_logits`).
      top_k: keep the k most likely tokens (0: all).
      top_p: keep the nucleus of probability top_p (1: all).
      greedy: argmax decoding (then every sample of a prompt is the same).
      seed: the sampling seed (see the RNG scheme).
      batch_size: prompts per decoding call (at most P are used).
      mesh: split each call's rows over the mesh's data axes (`generate`);
        `batch_size` is rounded up so that a call's rows are a multiple of
        the data-parallel size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    size = _batch_prompts(min(batch_size, max(len(ids), 1)), num_samples, mesh)
    key = jax.random.key(seed)
    token_ids: list[list[list[int]]] = []
    logps: list[np.ndarray] = []
    for b, start in enumerate(range(0, len(ids), size)):
        batch = ids[start : start + size]
        num_real = len(batch)
        out = generate(
            model, params, batch + [batch[0]] * (size - num_real),
            max_new_tokens=max_new_tokens, rng=jax.random.fold_in(key, b),
            num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=top_p,
            greedy=greedy, stop_tokens=[tokenizer.eos_id], pad_id=tokenizer.pad_id, mesh=mesh,
            vocab_size=tokenizer.vocab_size,
        )  # fmt: skip
        tokens_RT = np.asarray(jax.device_get(out.tokens))[: num_real * num_samples]
        lengths_R = np.asarray(jax.device_get(out.lengths))[: num_real * num_samples]
        logps.append(np.asarray(jax.device_get(out.logps))[: num_real * num_samples].sum(-1))
        rows = [tokens_RT[r, : lengths_R[r]].tolist() for r in range(len(lengths_R))]
        token_ids += [rows[i * num_samples : (i + 1) * num_samples] for i in range(num_real)]
    return _samples(tokenizer, token_ids, logps, len(prompts), num_samples)


def _batch_prompts(size: int, num_samples: int, mesh: jax.sharding.Mesh | None) -> int:
    """Prompts per call: `size`, rounded up so the rows split over the mesh's data axes."""
    if mesh is None:
        return size
    dp = parallel.data_parallel_size(mesh)
    step = dp // math.gcd(dp, num_samples)  # prompts whose rows are a multiple of dp
    return -(-size // step) * step


def _samples(tokenizer, token_ids, logps, num_prompts: int, num_samples: int) -> Samples:
    shape = (num_prompts, num_samples)
    lengths = np.asarray([[len(t) for t in ts] for ts in token_ids], np.int32).reshape(shape)
    ended = np.asarray(
        [[bool(t) and t[-1] == tokenizer.eos_id for t in ts] for ts in token_ids], bool
    ).reshape(shape)
    return Samples(
        responses=[[decode_response(tokenizer, t) for t in ts] for ts in token_ids],
        token_ids=token_ids,
        logps=(np.concatenate(logps) if logps else np.zeros(0)).astype(np.float32).reshape(shape),
        lengths=lengths,
        response_lengths=lengths - ended,
    )


def rescore(
    model: Any,
    params: Any,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    token_ids: Sequence[Sequence[Sequence[int]]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """log pi(y | x) of given responses under `params`, float32 [P, n].

    `token_ids[p][j]` are response ids of prompt p (e.g. `Samples.token_ids`
    of another model, such as the policy when `params` is its reference);
    each row `[bos] + encode(prompt) + ids` is scored in one forward pass::

        rescore[p, j] = sum_t log softmax(logits[P_p - 1 + t])[ids[t]]

    with P_p the prompt length (bos included), the same sum `Samples.logps`
    holds for the sampling model. Rows are scored `batch_size` at a time,
    right-padded to one length (a causal model's logits do not see padding).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if len(token_ids) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(token_ids)} lists of responses")
    counts = {len(ts) for ts in token_ids}
    if len(counts) > 1:
        raise ValueError(f"every prompt needs the same number of responses, got {sorted(counts)}")
    n = counts.pop() if counts else 0
    docs = [prompt_ids(tokenizer, p) for p in prompts]
    rows = [(d, [int(t) for t in ids]) for d, ts in zip(docs, token_ids, strict=True) for ids in ts]
    if not rows:
        return np.zeros((len(prompts), n), np.float32)
    L = max(len(d) + len(ids) for d, ids in rows) - 1  # inputs: doc[:-1]
    inputs_RL = np.full((len(rows), L), tokenizer.pad_id, np.int32)
    targets_RL = np.zeros((len(rows), L), np.int32)
    mask_RL = np.zeros((len(rows), L), np.float32)
    for r, (prompt, ids) in enumerate(rows):
        doc = prompt + ids
        inputs_RL[r, : len(doc) - 1] = doc[:-1]
        targets_RL[r, : len(doc) - 1] = doc[1:]
        mask_RL[r, len(prompt) - 1 : len(doc) - 1] = 1.0  # the targets that are response ids
    fn = _rescorer(model)
    out = []
    for start in range(0, len(rows), batch_size):
        part = slice(start, start + batch_size)
        fill = batch_size - len(inputs_RL[part])  # one shape per call: fill with mask-0 rows
        padded = [np.concatenate([x[part], np.zeros((fill, L), x.dtype)]) for x in
                  (inputs_RL, targets_RL, mask_RL)]  # fmt: skip
        out.append(np.asarray(fn(params, *padded))[: batch_size - fill])
    return np.concatenate(out).astype(np.float32).reshape(len(prompts), n)


@functools.lru_cache(maxsize=8)
def _rescorer(model):
    """One jitted summed-log-prob function per model (recompiled only for new shapes)."""

    @jax.jit
    def run(params, inputs_BL, targets_BL, mask_BL):
        logits_BLV = model.apply(params, inputs_BL).astype(jnp.float32)
        logp_BLV = jax.nn.log_softmax(logits_BLV, axis=-1)
        picked_BL = jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
        return jnp.sum(picked_BL * mask_BL, axis=-1)

    return run
