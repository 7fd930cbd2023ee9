"""Online RL objectives with group sampling: GRPO, Dr. GRPO, DAPO and RLOO.

Each prompt has G sampled responses (a group). Inputs, per response i and
token t: the log-probs under the policy being trained ``logp`` [B, G, T]
(differentiable), under the policy that sampled them ``old_logp`` [B, G, T],
optionally under a frozen reference ``ref_logp``, the response-token mask
``mask`` [B, G, T] and one reward per response ``rewards`` [B, G].

Advantages (:func:`advantages`, no gradient):

- GRPO (Shao et al. 2024, arXiv:2402.03300): ``(r_i - mean_j r_j) / (std_j r_j + eps)``;
- Dr. GRPO (Liu et al. 2025, arXiv:2503.20783): ``r_i - mean_j r_j`` (no std division);
- RLOO (Ahmadian et al. 2024, arXiv:2402.14740): ``r_i - mean_{j != i} r_j``
  ``= G / (G - 1) (r_i - mean_j r_j)``.

Per-token surrogate (PPO clip, Schulman et al. 2017), with ``rho = exp(logp - old_logp)``:

    l_t = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i)  [+ beta KL_t]

DAPO (Yu et al. 2025, arXiv:2503.14476) raises ``eps_high`` (clip-higher,
0.28 against eps_low 0.2). ``KL_t`` estimates KL(pi || ref) per token from
samples of pi: k1 = ``logp - ref_logp``, k3 = ``exp(ref - logp) - (ref - logp) - 1``
(Schulman 2020, "Approximating KL divergence"; GRPO uses k3).

Aggregation of ``l_t`` into one loss (:data:`AGGREGATIONS`), explicit because the
methods differ exactly here:

- ``sequence_mean`` (GRPO): the mean over each response's tokens, then over responses;
- ``token_mean`` (DAPO): the sum over every token of the batch / the number of tokens;
- ``constant`` (Dr. GRPO): the sum over each response's tokens / a constant
  ``max_tokens``, then the mean over responses (no length normalisation).

Every aggregation is a weighted sum ``sum_t w_t l_t`` with weights that carry
no gradient (:func:`aggregation_weights`). A trainer that splits a batch into
micro-batches computes the weights over the whole batch and passes each
micro-batch its share (``policy_loss(..., weights=w)``): the micro-batch losses
and gradients then add up to the full batch's exactly.

With ``old_logp == logp`` (one optimisation step on fresh samples) every ratio
is 1, the clip is inactive, and the gradient is REINFORCE's with these
advantages: ``-sum_t A_i grad logp_t``, aggregated the same way.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

ADVANTAGES = ("grpo", "dr_grpo", "rloo")
AGGREGATIONS = ("sequence_mean", "token_mean", "constant")
KL_ESTIMATORS = ("k1", "k3")


class RLLoss(NamedTuple):
    """The loss and its diagnostics (no gradient through the diagnostics)."""

    loss: jax.Array
    clip_fraction: jax.Array  # tokens whose clipped term was the active one
    kl: jax.Array  # mean per-token KL estimate to the reference (0 without one)
    ratio_mean: jax.Array


def advantages(rewards, valid=None, *, kind: str = "grpo", eps: float = 1e-6):
    """[B, G] advantages of each response within its group; `valid` masks padding responses."""
    if kind not in ADVANTAGES:
        raise ValueError(f"advantage kind {kind!r}; use one of {ADVANTAGES}")
    r = jnp.asarray(rewards, jnp.float32)
    v = jnp.ones_like(r) if valid is None else jnp.asarray(valid, jnp.float32)
    n = jnp.sum(v, axis=-1, keepdims=True)
    mean = jnp.sum(r * v, -1, keepdims=True) / jnp.maximum(n, 1.0)
    centred = (r - mean) * v
    if kind == "dr_grpo":
        out = centred
    elif kind == "rloo":
        out = centred * n / jnp.maximum(n - 1.0, 1.0)
    else:
        std = jnp.sqrt(jnp.sum(jnp.square(centred), -1, keepdims=True) / jnp.maximum(n, 1.0))
        out = centred / (std + eps)
    return jax.lax.stop_gradient(out)


def degenerate_groups(rewards, valid=None):
    """[B] bool: groups whose valid rewards are all equal (zero advantage: DAPO's
    dynamic sampling drops them)."""
    r = jnp.asarray(rewards, jnp.float32)
    v = jnp.ones_like(r, bool) if valid is None else jnp.asarray(valid, bool)
    hi = jnp.max(jnp.where(v, r, -jnp.inf), -1)
    lo = jnp.min(jnp.where(v, r, jnp.inf), -1)
    return hi <= lo


def overlong_penalty(lengths, *, max_tokens: int, buffer: int):
    """DAPO's soft overlong punishment, added to the reward: 0 up to max_tokens -
    buffer tokens, then falling linearly to -1 at max_tokens, -1 beyond."""
    length = jnp.asarray(lengths, jnp.float32)
    start = max_tokens - buffer
    return jnp.where(length <= start, 0.0, jnp.maximum((start - length) / buffer, -1.0))


def policy_loss(
    logp,
    old_logp,
    adv,
    mask,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "sequence_mean",
    max_tokens: int | None = None,
    ref_logp=None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    weights=None,
) -> RLLoss:
    """The clipped surrogate over a batch of groups (module docstring).

    `weights` (same shape as `mask`): the aggregation weights of these tokens,
    computed by `aggregation_weights` over a larger batch this one is part of;
    `aggregation` and `max_tokens` are then not used.
    """
    if weights is None:
        weights = aggregation_weights(mask, aggregation, max_tokens)
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator {kl_estimator!r}; use one of {KL_ESTIMATORS}")
    if kl_coef and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp (the reference's token log-probs)")
    logp = jnp.asarray(logp, jnp.float32)
    m = jnp.asarray(mask, jnp.float32)
    old = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
    a = jnp.asarray(adv, jnp.float32)[..., None]
    ratio = jnp.exp(logp - old)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -jnp.minimum(ratio * a, clipped * a)
    kl_t = jnp.zeros_like(logp)
    if ref_logp is not None:
        d = jax.lax.stop_gradient(jnp.asarray(ref_logp, jnp.float32)) - logp
        kl_t = -d if kl_estimator == "k1" else jnp.exp(d) - d - 1.0
        per_token = per_token + kl_coef * kl_t
    loss = jnp.sum(per_token * jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32)))
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    stats = jax.lax.stop_gradient(
        jnp.stack(
            [
                jnp.sum((clipped * a < ratio * a) * m) / tokens,
                jnp.sum(kl_t * m) / tokens,
                jnp.sum(ratio * m) / tokens,
            ]
        )
    )
    return RLLoss(loss, stats[0], stats[1], stats[2])


def aggregation_weights(mask, aggregation: str = "sequence_mean", max_tokens: int | None = None):
    """Per-token weights ``w`` [..., T] with ``loss = sum_t w_t l_t`` (module docstring).

    ``mask`` [..., T] marks response tokens (leading axes: responses, e.g.
    [B, G]); responses without a token get no weight and are not counted.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r}; use one of {AGGREGATIONS}")
    if aggregation == "constant" and not max_tokens:
        raise ValueError("aggregation='constant' needs max_tokens (the generation budget)")
    m = jnp.asarray(mask, jnp.float32)
    if aggregation == "token_mean":
        return m / jnp.maximum(jnp.sum(m), 1.0)
    tokens = jnp.sum(m, -1, keepdims=True)
    n_resp = jnp.maximum(jnp.sum(tokens > 0), 1.0)
    per_resp = jnp.maximum(tokens, 1.0) if aggregation == "sequence_mean" else float(max_tokens)
    return m / per_resp / n_resp
