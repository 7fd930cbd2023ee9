"""Policy-gradient losses on sampled responses with rewards: REINFORCE, BoN-aware RL and imitation.

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
- ``bon_imitation``: BoN-aware imitation: maximise ``log pi_bon(y*|x)``, the
  log-likelihood *under the best-of-N policy* of the verifier's best of N
  samples ``y*``. With a binary verifier that picks uniformly among the
  correct samples, ``pi_bon(y*) = (1 - p^N) pi(y*) / q`` with ``q = 1 - p``
  the policy's probability of a correct response, so

      grad log pi_bon(y*) = grad log pi(y*) + (g(p) - 1) / q * grad q,

  and ``grad q = E_y[1{y correct} grad log pi(y)]`` is estimated from the N
  samples. The second term is the exploration correction: ``g <= 1``, so it
  pushes down the total mass of correct responses by up to ``1/q`` (most when
  the prompt is already solved, p -> 0), leaving room for diverse samples.
  Per-sample weights: ``N`` on ``y*`` plus ``(g(p) - 1) / q`` on every correct
  sample. When a prompt has one correct response (all correct samples equal
  ``y*``) the sum is ``g(p) grad log pi(y*)``, the BoN-aware RL weight.
- ``bon_sft``: supervised fine-tuning on the best-of-N sample (no
  correction): weight N on the first correct sample (the one a verifier would
  select), 0 elsewhere.
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


def _correct_and_fail_rate(r, m):
    n = jnp.sum(m, axis=-1, keepdims=True)
    correct = (r > 0.5) * m
    p = 1.0 - jnp.sum(correct, axis=-1, keepdims=True) / jnp.maximum(n, 1.0)
    return n, correct, p


def _g(p, n, size):
    """g(p) = N p^(N-1) / sum_{j<N} p^j: exact and finite on [0, 1] (no 0/0 at p = 1)."""
    j = jnp.arange(size, dtype=jnp.float32)
    terms = jnp.where(j < n, p**j, 0.0)
    denom = jnp.maximum(jnp.sum(terms, axis=-1, keepdims=True), 1e-30)
    return n * p ** jnp.maximum(n - 1.0, 0.0) / denom


def bon_weights(rewards, mask):
    """g(p) on correct samples, 0 elsewhere; p = failed fraction over valid samples."""
    r, m = _f32(rewards, mask)
    n, correct, p = _correct_and_fail_rate(r, m)
    return correct * _g(p, n, r.shape[-1])


def bon_rl(logps, rewards, mask):
    """BoN-aware positive-only RL, [B]: correct samples weighted by g(P_fail)."""
    lp, r, m = _f32(logps, rewards, mask)
    return _weighted(lp, bon_weights(r, m), m)


def _first_correct(r, m):
    """One-hot of the first correct valid sample (the verifier's pick), zeros if none."""
    correct = (r > 0.5) & (m > 0)
    first = jnp.argmax(correct, axis=-1)
    return jax.nn.one_hot(first, r.shape[-1]) * jnp.any(correct, axis=-1, keepdims=True)


def bon_sft(logps, rewards, mask):
    """NLL of the first correct sample (the verifier's best of N), [B]; 0 if none."""
    lp, r, m = _f32(logps, rewards, mask)
    return _weighted(lp, _first_correct(r, m) * jnp.sum(m, axis=-1, keepdims=True), m)


def bon_imitation(logps, rewards, mask):
    """-log pi_bon(y*) of the verifier's best of N, with the exploration correction, [B].

    The value is the surrogate whose gradient is the estimate in the module
    docstring; 0 for prompts without a correct sample.
    """
    lp, r, m = _f32(logps, rewards, mask)
    n, correct, p = _correct_and_fail_rate(r, m)
    q = 1.0 - p  # >= 1/N wherever a correct sample exists
    g = _g(p, n, r.shape[-1])
    correction = jnp.where(q > 0, (g - 1.0) / jnp.maximum(q, 1e-6), 0.0)
    return _weighted(lp, _first_correct(r, m) * n + correct * correction, m)
