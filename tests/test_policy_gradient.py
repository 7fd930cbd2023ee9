"""Policy-gradient losses: weights against closed forms, gradients only through log-probs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_align.losses import policy_gradient as pg

LOGPS = jnp.array([[-1.0, -2.0, -3.0, -4.0], [-0.5, -1.5, -2.5, -3.5]])
REWARDS = jnp.array([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
MASK = jnp.ones((2, 4))


def g(p, n):
    """The BoN weight by hand: N p^(N-1) (1 - p) / (1 - p^N), p the failure rate."""
    return n * p ** (n - 1) * (1 - p) / (1 - p**n)


def _weights(loss_fn, rewards=REWARDS, mask=MASK):
    """The per-sample weights: -N * d loss / d logps."""
    grad = jax.grad(lambda lp: jnp.sum(loss_fn(lp, rewards, mask)))(LOGPS)
    return -np.asarray(grad) * np.asarray(mask).sum(-1, keepdims=True)


def test_reinforce_weights_are_reward_minus_mean():
    w = _weights(pg.reinforce)
    np.testing.assert_allclose(w, [[0.5, -0.5, 0.5, -0.5], [0.25, 0.25, 0.25, -0.75]], atol=1e-6)
    # The value is -sum(w * lp) / N.
    np.testing.assert_allclose(
        pg.reinforce(LOGPS, REWARDS, MASK), -(w * np.asarray(LOGPS)).sum(-1) / 4, rtol=1e-6
    )


def test_bon_rlb_p_weights_are_g_of_the_failure_rate_on_correct_samples():
    w = _weights(pg.bon_rlb_p)
    # Prompt 0: p = 2/4 -> g = 4 * 0.5^3 * 0.5 / (1 - 0.5^4) = 0.25 / 0.9375.
    # Prompt 1: p = 1/4 -> g = 4 * 0.25^3 * 0.75 / (1 - 0.25^4) = 0.046875 / 0.99609375.
    g0, g1 = 0.25 / 0.9375, 0.046875 / 0.99609375
    np.testing.assert_allclose(w, [[g0, 0, g0, 0], [g1, g1, g1, 0]], rtol=1e-5)


def test_bon_limits_and_masking_are_finite():
    all_wrong = jnp.zeros((1, 4))
    all_right = jnp.ones((1, 4))
    assert np.all(_weights(pg.bon_rlb_p, all_wrong)[:1] == 0)
    np.testing.assert_allclose(_weights(pg.bon_rlb_p, all_right)[:1], 0.0, atol=1e-7)  # g(0) = 0
    # One correct of four real samples, two padding slots: p = 3/4 with N = 4.
    r = jnp.array([[1.0, 0.0, 0.0, 0.0, 1.0, 1.0]])
    m = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    w = np.asarray(pg.bon_rlb_p_weights(r, m))
    np.testing.assert_allclose(w[0, 0], g(0.75, 4), rtol=1e-5)  # 0.421875 / 0.68359375
    assert np.all(w[0, 1:] == 0) and np.all(np.isfinite(w))


def test_bon_sft_is_the_nll_of_the_first_correct_sample():
    loss = pg.bon_sft(LOGPS, REWARDS, MASK)
    np.testing.assert_allclose(loss, [1.0, 0.5], rtol=1e-6)
    assert float(pg.bon_sft(LOGPS, jnp.zeros((2, 4)), MASK)[0]) == 0.0


def test_bon_imitation_gradient_is_the_gradient_of_log_pi_bon():
    # A categorical policy over 4 responses, 0 and 1 correct. Eight samples in
    # exact proportion to pi = (1/2, 1/4, 1/8, 1/8), so their mean equals the
    # expectation, and the surrogate's gradient must equal the exact gradient
    # of log pi_bon(y*) = log((1 - p^N) pi(y*) / q) with y* = response 0, N = 8.
    theta = jnp.log(jnp.array([0.5, 0.25, 0.125, 0.125]))
    drawn = jnp.array([0, 0, 0, 0, 1, 1, 2, 3])
    rewards = (drawn < 2).astype(jnp.float32)[None]
    mask = jnp.ones((1, 8))

    def surrogate(t):
        logps = jax.nn.log_softmax(t)[drawn][None]
        return pg.bon_imitation(logps, rewards, mask)[0]

    def exact(t):
        pi = jax.nn.softmax(t)
        q = pi[0] + pi[1]
        return -jnp.log((1 - (1 - q) ** 8) * pi[0] / q)

    np.testing.assert_allclose(jax.grad(surrogate)(theta), jax.grad(exact)(theta), atol=1e-6)
    # The correction is what makes it BoN-aware: plain SFT on y* differs.
    sft = jax.grad(lambda t: pg.bon_sft(jax.nn.log_softmax(t)[drawn][None], rewards, mask)[0])
    assert np.abs(np.asarray(sft(theta) - jax.grad(exact)(theta))).max() > 0.05


def test_bon_imitation_with_one_correct_response_is_g_weighted_sft():
    # All correct samples are y* (same log-prob): the weights sum to g(p).
    lp = jnp.array([[-0.7, -2.0, -0.7, -3.0]])
    r = jnp.array([[1.0, 0.0, 1.0, 0.0]])
    grad = jax.grad(lambda x: pg.bon_imitation(x, r, MASK[:1])[0])(lp)
    np.testing.assert_allclose(-float(grad[0, 0] + grad[0, 2]), g(0.5, 4), rtol=1e-5)


def test_bon_imitation_is_finite_at_the_limits():
    for rewards in (jnp.ones((1, 4)), jnp.zeros((1, 4)), jnp.array([[0.0, 0.0, 0.0, 1.0]])):
        value, grad = jax.value_and_grad(lambda x, r=rewards: pg.bon_imitation(x, r, MASK[:1])[0])(
            LOGPS[:1]
        )
        assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
    # Nothing correct: no target, no gradient.
    assert float(pg.bon_imitation(LOGPS, jnp.zeros((2, 4)), MASK)[0]) == 0.0
    # p = 0 (all correct): g = 0, weights N on y* and -1 on every sample.
    w = _weights(pg.bon_imitation, jnp.ones((2, 4)))
    np.testing.assert_allclose(w[0], [4 - 1, -1, -1, -1], atol=1e-5)


# ---------------------------------------------------------------------------
# BoN-RLB (Chow et al. 2024): g+ on correct samples, -g- on incorrect ones.
# Ragged rows: N is each row's count of valid samples.

RAGGED_LOGPS = jnp.array(
    [[-1.0, -2.0, -3.0, -4.0], [-0.5, -1.5, -2.5, -9.0], [-1.0, -1.0, -2.0, -9.0],
     [-0.1, -0.2, -9.0, -9.0]]
)  # fmt: skip
RAGGED_REWARDS = jnp.array(
    [[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
)
RAGGED_MASK = jnp.array(
    [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
)


def _ragged_weights(loss_fn):
    """-N_row * d loss / d logps on the ragged batch: the per-sample weights."""
    grad = jax.grad(lambda lp: jnp.sum(loss_fn(lp, RAGGED_REWARDS, RAGGED_MASK)))(RAGGED_LOGPS)
    return -np.asarray(grad) * np.asarray(RAGGED_MASK).sum(-1, keepdims=True)


def test_bon_rlb_weights_by_hand_on_ragged_rows():
    w = _ragged_weights(pg.bon_rlb)
    # Row 0: N = 4, p = 1/2: g+ = 4 (1/8) / (1 - 1/16) = 8/15, g- = 4 (1/2) / (1/2) = 4.
    # Row 1: N = 3 (slot 3 is padding, its reward 1 ignored), p = 2/3:
    #   g+ = 3 (4/9) / (1 - 8/27) = 36/19, g- = 3 (2/3) / (1/3) = 6.
    # Row 2: N = 3, every sample failed: p is taken as (N - 1)/N = 2/3, so g- = 6.
    # Row 3: N = 2, both correct: p = 0, g+ = 2 * 0 / 1 = 0; nothing to push down.
    want = [
        [8 / 15, -4, 8 / 15, -4],
        [36 / 19, -6, -6, 0],
        [-6, -6, -6, 0],
        [0, 0, 0, 0],
    ]
    np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pg.bon_rlb_weights(RAGGED_REWARDS, RAGGED_MASK), want, rtol=1e-5)
    # The value is -sum(w * lp) / N per row: row 0 = -(8/15 (-1 - 3) - 4 (-2 - 4)) / 4.
    loss = np.asarray(pg.bon_rlb(RAGGED_LOGPS, RAGGED_REWARDS, RAGGED_MASK))
    np.testing.assert_allclose(loss[0], -(8 / 15 * -4 - 4 * -6) / 4, rtol=1e-6)
    np.testing.assert_allclose(loss[2], -(-6 * (-1 - 1 - 2)) / 3, rtol=1e-6)


def test_bon_rlb_p_weights_by_hand_on_ragged_rows():
    w = _ragged_weights(pg.bon_rlb_p)
    # gbar+ = (1 - p) g+: row 0 (1/2)(8/15) = 4/15; row 1 (1/3)(36/19) = 12/19.
    want = [[4 / 15, 0, 4 / 15, 0], [12 / 19, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-6)


# A categorical policy over 4 responses, 0 and 1 correct. Eight samples in exact
# proportion to pi = (1/2, 1/4, 1/8, 1/8), so a sample mean is the expectation
# and a surrogate's gradient is its expected gradient.
THETA = jnp.log(jnp.array([0.5, 0.25, 0.125, 0.125]))
DRAWN = jnp.array([0, 0, 0, 0, 1, 1, 2, 3])
DRAWN_REWARDS = (DRAWN < 2).astype(jnp.float32)[None]
DRAWN_MASK = jnp.ones((1, 8))


def _surrogate_grad(loss_fn):
    def surrogate(t):
        return loss_fn(jax.nn.log_softmax(t)[DRAWN][None], DRAWN_REWARDS, DRAWN_MASK)[0]

    return np.asarray(jax.grad(surrogate)(THETA))


def test_bon_rl_losses_ascend_the_bon_success_probability():
    # grad(1 - p^N) = N p^(N-1) grad q; in expectation BoN-RLB's gradient is
    # (g+ + g-) grad q and BoN-RLB(P)'s gbar+ grad q (p = 1/4, N = 8).
    def success(t):
        pi = jax.nn.softmax(t)
        return 1 - (pi[2] + pi[3]) ** 8

    def q(t):
        pi = jax.nn.softmax(t)
        return pi[0] + pi[1]

    grad_q = np.asarray(jax.grad(q)(THETA))
    p, n = 0.25, 8
    g_plus, g_minus = n * p ** (n - 1) / (1 - p**n), n * p / (1 - p)
    np.testing.assert_allclose(-_surrogate_grad(pg.bon_rlb), (g_plus + g_minus) * grad_q, rtol=1e-5)
    np.testing.assert_allclose(-_surrogate_grad(pg.bon_rlb_p), (1 - p) * g_plus * grad_q, rtol=1e-5)
    ascent = np.asarray(jax.grad(success)(THETA))
    np.testing.assert_allclose(ascent, n * p ** (n - 1) * grad_q, rtol=1e-5)
    assert np.dot(-_surrogate_grad(pg.bon_rlb), ascent) > 0


# ---------------------------------------------------------------------------
# BoN-SFT of Chow et al. 2024: the variational BoN policy pi exp(lambda_N Q) / Z.


def _tilt_kl_by_quadrature(lam):
    """KL of density lam e^(lam u) / (e^lam - 1) on [0, 1] from the uniform, numerically."""
    u = np.linspace(0.0, 1.0, 200_001)
    dens = lam * np.exp(lam * u) / np.expm1(lam)
    f = dens * np.log(dens)
    return float(np.sum((f[1:] + f[:-1]) / 2) * (u[1] - u[0]))


@pytest.mark.parametrize("n", [2, 4, 8, 32])
def test_bon_lambda_matches_the_kl_of_best_of_n(n):
    lam = pg.bon_lambda(n)
    np.testing.assert_allclose(_tilt_kl_by_quadrature(lam), math.log(n) - (n - 1) / n, rtol=1e-6)
    assert pg.bon_lambda(1) == 0.0


def _c(lam, p):
    """c_lambda(p) = -d log Z / dq with Z = q e^lam + p e^(lam p), by hand."""
    q = 1 - p
    return (math.exp(lam) - math.exp(lam * p) * (1 + lam * p)) / (
        q * math.exp(lam) + p * math.exp(lam * p)
    )


def test_bon_aware_sft_weights_by_hand_on_ragged_rows():
    w = _ragged_weights(pg.bon_aware_sft)
    # y* is the first correct sample: weight N there, -c on every correct sample.
    c0 = _c(pg.bon_lambda(4), 0.5)  # row 0: N = 4, p = 1/2
    c1 = _c(pg.bon_lambda(3), 2 / 3)  # row 1: N = 3, p = 2/3
    c3 = _c(pg.bon_lambda(2), 0.0)  # row 3: N = 2, p = 0: c = 1 - e^-lambda
    assert c3 == pytest.approx(1 - math.exp(-pg.bon_lambda(2)))
    want = [
        [4 - c0, 0, -c0, 0],
        [3 - c1, 0, 0, 0],
        [0, 0, 0, 0],  # no correct sample: no target, no gradient
        [2 - c3, -c3, 0, 0],
    ]
    np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "probs,drawn",
    [
        ((0.5, 0.25, 0.125, 0.125), (0, 0, 0, 0, 1, 1, 2, 3)),  # p = 1/4
        ((0.125, 0.125, 0.5, 0.25), (0, 1, 2, 2, 2, 2, 3, 3)),  # p = 3/4
    ],
)
def test_bon_aware_sft_gradient_is_the_gradient_of_log_pi_bon(probs, drawn):
    # Responses 0 and 1 are correct; eight samples in exact proportion to pi.
    # pi_bon(y) = pi(y) exp(lambda Q(y)) / Z with Q(y) = P_{y'~pi}[r(y) >= r(y')],
    # computed from that definition; y* = response 0, N = 8.
    theta, drawn = jnp.log(jnp.array(probs)), jnp.array(drawn)
    rewards, mask = (drawn < 2).astype(jnp.float32)[None], jnp.ones((1, 8))
    lam = pg.bon_lambda(8)
    r = jnp.array([1.0, 1.0, 0.0, 0.0])

    def exact(t):
        pi = jax.nn.softmax(t)
        Q = jnp.sum(pi[None, :] * (r[:, None] >= r[None, :]), axis=1)
        tilted = pi * jnp.exp(lam * Q)
        return -jnp.log(tilted[0] / jnp.sum(tilted))

    def surrogate(loss_fn):
        return jax.grad(lambda t: loss_fn(jax.nn.log_softmax(t)[drawn][None], rewards, mask)[0])

    np.testing.assert_allclose(
        surrogate(pg.bon_aware_sft)(theta), jax.grad(exact)(theta), atol=1e-5
    )
    if probs[0] < 0.5:  # a hard prompt: the exact binary-verifier BoN policy differs
        diff = surrogate(pg.bon_aware_sft)(theta) - surrogate(pg.bon_imitation)(theta)
        assert np.abs(np.asarray(diff)).max() > 0.05


def test_bon_aware_sft_is_finite_at_the_limits():
    for rewards in (jnp.ones((1, 4)), jnp.zeros((1, 4)), jnp.array([[0.0, 0.0, 0.0, 1.0]])):
        value, grad = jax.value_and_grad(lambda x, r=rewards: pg.bon_aware_sft(x, r, MASK[:1])[0])(
            LOGPS[:1]
        )
        assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
