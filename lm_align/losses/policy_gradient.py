"""Policy-gradient losses on sampled responses with rewards: REINFORCE, BoN-aware RL, BoN SFT.

Inputs per prompt: N sampled responses' summed log-probs ``logps`` [B, N]
(under the policy being trained, differentiable), their rewards [B, N] (binary
for the BoN losses: 1 = the verifier accepts) and a validity mask [B, N].
Each loss returns one value per prompt [B]; its gradient is the
score-function (REINFORCE) estimate ``-sum_i w_i grad log pi(y_i | x) / N``
with per-sample weights ``w`` that carry no gradient:

- ``reinforce``: ``w_i = r_i - mean_j r_j`` (REINFORCE with the leave-in mean
  baseline; the same samples, no BoN weighting).
- ``bon_rl``: BoN-aware RL with binary rewards, positive-only (Chow et al.
  2024, arXiv:2412.15287): with ``p = P_fail(x)`` estimated as the fraction of
  failed samples, correct samples get ``w_i = g(p) = N p^(N-1) (1-p) /
  (1 - p^N)`` (``lm_align.align.evaluation.bon_weight``) and failed ones 0.
  It is the gradient of the BoN success probability ``1 - p^N`` up to the
  factor that REINFORCE on a single sample would use: prompts the model
  already solves (p -> 0) get little weight, hard prompts (p -> 1) full weight.
- ``bon_sft``: supervised fine-tuning on the best-of-N sample: weight N on
  the first correct sample (the one a verifier would select), 0 elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _f32(*xs):
    return tuple(jnp.asarray(x).astype(jnp.float32) for x in xs)


def _weighted(logps, weights, mask):
    n = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    w = jax.lax.stop_gradient(weights * mask)
    return -jnp.sum(w * logps, axis=-1) / n


def reinforce(logps, rewards, mask):
    """REINFORCE with the per-prompt mean reward as baseline, [B]."""
    lp, r, m = _f32(logps, rewards, mask)
    n = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)
    baseline = jnp.sum(r * m, axis=-1, keepdims=True) / n
    return _weighted(lp, r - baseline, m)


def bon_weights(rewards, mask):
    """g(p) on correct samples, 0 elsewhere; p = failed fraction over valid samples."""
    r, m = _f32(rewards, mask)
    n = jnp.sum(m, axis=-1, keepdims=True)
    correct = (r > 0.5) * m
    p = 1.0 - jnp.sum(correct, axis=-1, keepdims=True) / jnp.maximum(n, 1.0)
    # g(p) = N p^(N-1) / sum_{j<N} p^j: exact and finite on [0, 1] (no 0/0 at p = 1).
    j = jnp.arange(r.shape[-1], dtype=jnp.float32)
    terms = jnp.where(j < n, p**j, 0.0)
    denom = jnp.maximum(jnp.sum(terms, axis=-1, keepdims=True), 1e-30)
    g = n * p ** jnp.maximum(n - 1.0, 0.0) / denom
    return correct * g


def bon_rl(logps, rewards, mask):
    """BoN-aware positive-only RL, [B]: correct samples weighted by g(P_fail)."""
    lp, r, m = _f32(logps, rewards, mask)
    return _weighted(lp, bon_weights(r, m), m)


def bon_sft(logps, rewards, mask):
    """NLL of the first correct sample (the verifier's best of N), [B]; 0 if none."""
    lp, r, m = _f32(logps, rewards, mask)
    correct = (r > 0.5) & (m > 0)
    first = jnp.argmax(correct, axis=-1)
    one_hot = jax.nn.one_hot(first, r.shape[-1]) * jnp.any(correct, axis=-1, keepdims=True)
    return _weighted(lp, one_hot * jnp.sum(m, axis=-1, keepdims=True), m)
