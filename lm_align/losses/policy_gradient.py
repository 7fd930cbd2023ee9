"""Policy-gradient losses on sampled responses with rewards: REINFORCE, BoN-aware RL and imitation.

Inputs per prompt: N sampled responses' summed log-probs ``logps`` [B, N]
(under the policy being trained, differentiable), their rewards [B, N] (binary
for the BoN losses: correct iff reward > 0.5) and a validity mask [B, N]
(ragged rows: N below is each row's count of valid samples). Each loss returns
one value per prompt [B]; its gradient is the score-function (REINFORCE)
estimate ``-sum_i w_i grad log pi(y_i | x) / N`` with per-sample weights ``w``
that carry no gradient. ``p = P_fail(x)`` is estimated as the failed fraction
of the prompt's N samples and ``q = 1 - p``; the best-of-N (BoN) policy with a
perfect binary verifier succeeds with probability ``1 - p^N``, and since
``grad (1 - p^N) = N p^(N-1) grad q`` every BoN-aware weighting below is, in
expectation, a per-prompt positive multiple of ``grad q`` that puts less
weight on prompts the policy already solves.

| name | weights w_i | source |
|---|---|---|
| ``reinforce`` | ``r_i - mean_j r_j`` | REINFORCE with the leave-in mean baseline |
| ``bon_rlb`` | ``g+(p)`` correct, ``-g-(p)`` incorrect | BoN-RLB, Chow et al. 2024 |
| ``bon_rlb_p`` | ``gbar+(p)`` correct, 0 incorrect | BoN-RLB(P), Chow et al. 2024 |
| ``bon_aware_sft`` | ``N`` on y*, ``-c_lambda(p)`` on correct | BoN-SFT, Chow et al. 2024 (variational BoN policy) |
| ``bon_imitation`` | ``N`` on y*, ``(gbar+(p) - 1)/q`` on correct | ``-log pi_bon(y*)`` of the exact binary-verifier BoN policy (derived here) |
| ``bon_sft`` | ``N`` on y* | SFT on the verifier's best of N (no BoN awareness) |

with ``y*`` the first correct sample (the verifier's pick among ties) and

    g+(p)    = N p^(N-1) / (1 - p^N)
    g-(p)    = N p / (1 - p)
    gbar+(p) = N p^(N-1) (1 - p) / (1 - p^N)          (= (1 - p) g+(p))

Sources, and what was checked against what:

- BoN-RLB and BoN-RLB(P): the three weight functions and the names are those
  of Chow et al. 2024 (arXiv:2412.15287, the binary-reward BoN-RL section) as
  quoted by secondary notes on the paper (a positive weight ``g+`` on correct
  samples and a *negative* weight ``g-`` on incorrect ones; the positive-only
  variant ``gbar+``); the paper's own text was not reachable from where this
  was written. On samples from the policy, as here, the expected gradient of
  ``bon_rlb`` is ``(g+ + g-) grad q`` and that of ``bon_rlb_p`` is
  ``gbar+ grad q``. ``gbar+ grad q = (1 - p) grad log(1 - p^N)``: the
  gradient of the BoN success probability's log, scaled by the mass of
  correct samples (``lm_align.align.evaluation.bon_weight``). On a prompt
  whose N samples all failed (p estimated as 1), p is taken as ``(N - 1)/N``
  so that ``g-`` stays finite (at most ``N (N - 1)``); ``g+`` is unused there.
- BoN-SFT (``bon_aware_sft``): the variational BoN policy of the paper,
  ``pi_bon(y|x) = pi(y|x) exp(lambda_N Q(x, y)) / Z(x)`` with
  ``Q(x, y) = P_{y'~pi}[r(x, y) >= r(x, y')]``, the probability that y beats
  (or ties) another sample. With a binary verifier Q is 1 on correct and p on
  incorrect responses, so ``Z = q e^lambda + p e^(lambda p)`` and for a
  correct y*

      grad log pi_bon(y*) = grad log pi(y*) - c_lambda(p) grad q,
      c_lambda(p) = (1 - e^(-lambda q) (1 + lambda p)) / (q + p e^(-lambda q)),

  differentiating through p everywhere (exact for this family);
  ``grad q = E_y[1{y correct} grad log pi(y)]`` is estimated from the N
  samples. ``lambda_N`` (:func:`bon_lambda`) solves
  ``KL(pi_lambda || pi) = log N - (N - 1)/N``, the commonly used KL of the
  best-of-N policy (an upper bound on it, Beirami et al. 2024), for a
  continuous verifier (Q uniform on [0, 1] under pi); the notes available
  here give the form of pi_bon but not the paper's definition of lambda_N,
  so this matching is this module's choice. lambda_N is about N + 1 for
  large N (lambda_2 = 2.29, lambda_8 = 9.05). ``c_lambda`` is ``1 - e^(-lambda)`` at p = 0 (the
  correction then lowers the mass of correct answers, like
  ``bon_imitation``) and ``-lambda`` as p -> 1 (it raises it there).
- ``bon_imitation``: the same objective with the *exact* best-of-N policy of a
  binary verifier that picks uniformly among correct samples,
  ``pi_bon(y*) = (1 - p^N) pi(y*) / q``, so
  ``grad log pi_bon(y*) = grad log pi(y*) + (gbar+(p) - 1) / q * grad q``.
  ``(gbar+ - 1)/q`` runs from -1 at p = 0 to ``-(N - 1)/2`` as p -> 1. When
  all correct samples are the same string (one right answer), the weights on
  it add up to ``gbar+(p)``: BoN-RLB(P) on that answer.
- ``bon_sft``: the NLL of y* (the best-of-N sample), the inference-unaware
  baseline.

References:
  Chow et al. 2024, Inference-Aware Fine-Tuning for Best-of-N Sampling in
    Large Language Models, ICLR 2025, arXiv:2412.15287.
  Beirami et al. 2024, Theoretical guarantees on the best-of-n alignment
    policy, arXiv:2401.01879.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


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
    """gbar+(p) = N p^(N-1) / sum_{j<N} p^j: exact and finite on [0, 1] (no 0/0 at p = 1)."""
    j = jnp.arange(size, dtype=jnp.float32)
    terms = jnp.where(j < n, p**j, 0.0)
    denom = jnp.maximum(jnp.sum(terms, axis=-1, keepdims=True), 1e-30)
    return n * p ** jnp.maximum(n - 1.0, 0.0) / denom


def bon_rlb_p_weights(rewards, mask):
    """BoN-RLB(P): gbar+(p) on correct samples, 0 elsewhere, [B, N]."""
    r, m = _f32(rewards, mask)
    n, correct, p = _correct_and_fail_rate(r, m)
    return correct * _g(p, n, r.shape[-1])


def bon_rlb_weights(rewards, mask):
    """BoN-RLB: g+(p) on correct samples, -g-(p) on incorrect ones, 0 on padding, [B, N].

    p is clipped to at most (N - 1)/N (all-failed prompts), where 1 - p >= 1/N.
    """
    r, m = _f32(rewards, mask)
    n, correct, p = _correct_and_fail_rate(r, m)
    p = jnp.minimum(p, (n - 1.0) / jnp.maximum(n, 1.0))
    q = jnp.maximum(1.0 - p, 1e-30)  # >= 1/N after the clip; guards empty rows
    g_plus = _g(p, n, r.shape[-1]) / q  # N p^(N-1) / (1 - p^N)
    g_minus = n * p / q
    return correct * g_plus - (m - correct) * g_minus


def bon_rlb(logps, rewards, mask):
    """BoN-RLB, [B]: correct samples weighted g+(p), incorrect -g-(p) (module doc)."""
    lp, r, m = _f32(logps, rewards, mask)
    return _weighted(lp, bon_rlb_weights(r, m), m)


def bon_rlb_p(logps, rewards, mask):
    """BoN-RLB(P), positive-only, [B]: correct samples weighted gbar+(p) (module doc)."""
    lp, r, m = _f32(logps, rewards, mask)
    return _weighted(lp, bon_rlb_p_weights(r, m), m)


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
    """-log pi_bon(y*) under the exact binary-verifier BoN policy, as a surrogate, [B].

    The value is the surrogate whose gradient is the estimate in the module
    docstring; 0 for prompts without a correct sample.
    """
    lp, r, m = _f32(logps, rewards, mask)
    n, correct, p = _correct_and_fail_rate(r, m)
    q = 1.0 - p  # >= 1/N wherever a correct sample exists
    g = _g(p, n, r.shape[-1])
    correction = jnp.where(q > 0, (g - 1.0) / jnp.maximum(q, 1e-6), 0.0)
    return _weighted(lp, _first_correct(r, m) * n + correction * correct, m)


def _kl_of_tilt(lam: float) -> float:
    """KL(pi_lambda || pi) for Q ~ U[0, 1] under pi and density lambda e^(lambda u) / (e^lambda - 1)."""
    if lam < 1e-4:
        return lam * lam / 24.0  # the series; the closed form cancels badly here
    one_minus = -math.expm1(-lam)  # 1 - e^-lambda
    # lambda E[u] - log((e^lambda - 1) / lambda), E[u] = 1 / (1 - e^-lambda) - 1 / lambda.
    return lam / one_minus - 1.0 - lam - math.log(one_minus) + math.log(lam)


@functools.cache
def bon_lambda(n: int) -> float:
    """lambda_N of the variational BoN policy: KL(pi_lambda || pi) = log N - (N - 1)/N.

    Bisection in float64 on the closed form of the tilted uniform's KL
    (increasing in lambda); 0 for N = 1.

    >>> round(bon_lambda(1), 6), round(bon_lambda(8), 3), round(bon_lambda(32), 2)
    (0.0, 9.055, 33.02)
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        return 0.0  # best of 1 is the policy itself
    target = math.log(n) - (n - 1) / n
    lo, hi = 0.0, 10.0 * n + 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _kl_of_tilt(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


def bon_aware_sft(logps, rewards, mask):
    """BoN-SFT of Chow et al. 2024: -log pi_bon(y*) under the variational BoN policy, [B].

    Surrogate whose gradient is ``-(grad log pi(y*) - c_lambda(p) grad q)``
    with ``grad q`` estimated from the N samples (module doc); lambda_N per
    row from its valid-sample count. 0 for prompts without a correct sample.
    """
    lp, r, m = _f32(logps, rewards, mask)
    n, correct, p = _correct_and_fail_rate(r, m)
    table = np.array([bon_lambda(k) for k in range(1, r.shape[-1] + 1)], np.float32)
    lam = jnp.asarray(table)[jnp.clip(n.astype(jnp.int32) - 1, 0, r.shape[-1] - 1)]
    q = 1.0 - p
    tail = jnp.exp(-lam * q)  # e^(-lambda q) <= 1: no overflow for any lambda
    c = (1.0 - tail * (1.0 + lam * p)) / (q + p * tail)
    return _weighted(lp, _first_correct(r, m) * n - c * correct, m)
