"""Policy-gradient losses: weights against closed forms, gradients only through log-probs."""

import jax
import jax.numpy as jnp
import numpy as np

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


def test_bon_rl_weights_are_g_of_the_failure_rate_on_correct_samples():
    w = _weights(pg.bon_rl)
    # Prompt 0: p = 2/4 -> g = 4 * 0.5^3 * 0.5 / (1 - 0.5^4) = 0.25 / 0.9375.
    # Prompt 1: p = 1/4 -> g = 4 * 0.25^3 * 0.75 / (1 - 0.25^4) = 0.046875 / 0.99609375.
    g0, g1 = 0.25 / 0.9375, 0.046875 / 0.99609375
    np.testing.assert_allclose(w, [[g0, 0, g0, 0], [g1, g1, g1, 0]], rtol=1e-5)


def test_bon_limits_and_masking_are_finite():
    all_wrong = jnp.zeros((1, 4))
    all_right = jnp.ones((1, 4))
    assert np.all(_weights(pg.bon_rl, all_wrong)[:1] == 0)
    np.testing.assert_allclose(_weights(pg.bon_rl, all_right)[:1], 0.0, atol=1e-7)  # g(0) = 0
    # One correct of four real samples, two padding slots: p = 3/4 with N = 4.
    r = jnp.array([[1.0, 0.0, 0.0, 0.0, 1.0, 1.0]])
    m = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    w = np.asarray(pg.bon_weights(r, m))
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
