"""Online RL objectives (`lm_align.losses.rl`) against hand-computed numbers on ragged masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_align.losses import rl

# One prompt, a group of 3 responses of 2, 1 and 3 tokens.
REWARDS = jnp.array([[1.0, 0.0, 0.5]])
MASK = jnp.array([[[1, 1, 0], [1, 0, 0], [1, 1, 1]]], jnp.float32)
# log(rho) per token; the padding entries (mask 0) hold values that must not count.
LOG_RATIO = jnp.log(jnp.array([[[1.5, 0.9, 7.0], [0.7, 9.0, 9.0], [1.1, 1.0, 0.5]]]))


def test_advantages_by_hand():
    # mean 0.5; centred (0.5, -0.5, 0); population std sqrt(1/6).
    np.testing.assert_allclose(rl.advantages(REWARDS, kind="dr_grpo"), [[0.5, -0.5, 0.0]])
    np.testing.assert_allclose(
        rl.advantages(REWARDS, kind="grpo"), [[0.5 * 6**0.5, -0.5 * 6**0.5, 0.0]], rtol=1e-5
    )
    # RLOO: r_i - mean of the others: 1 - 0.25, 0 - 0.75, 0.5 - 0.5.
    np.testing.assert_allclose(rl.advantages(REWARDS, kind="rloo"), [[0.75, -0.75, 0.0]])
    # A padding response (valid 0) neither counts in the mean nor gets an advantage.
    padded = rl.advantages(jnp.array([[1.0, 0.0, 5.0]]), jnp.array([[1, 1, 0]]), kind="dr_grpo")
    np.testing.assert_allclose(padded, [[0.5, -0.5, 0.0]])


def loss(aggregation, **kw):
    logp = jnp.zeros((1, 3, 3)) + LOG_RATIO  # old_logp = 0
    return rl.policy_loss(
        logp, jnp.zeros_like(logp), rl.advantages(REWARDS, kind="dr_grpo"), MASK,
        aggregation=aggregation, **kw,
    )  # fmt: skip


def test_clipped_surrogate_and_the_three_aggregations_by_hand():
    """Advantages (0.5, -0.5, 0). Tokens: response 0: rho 1.5 -> clipped 1.2, term -0.6;
    rho 0.9 -> -0.45. Response 1: rho 0.7, A < 0 -> clipped 0.8, term +0.4. Response 2: 0."""
    np.testing.assert_allclose(loss("sequence_mean").loss, ((-1.05 / 2) + 0.4 + 0) / 3, rtol=1e-6)
    np.testing.assert_allclose(loss("token_mean").loss, (-1.05 + 0.4) / 6, rtol=1e-6)
    np.testing.assert_allclose(
        loss("constant", max_tokens=4).loss, (-1.05 / 4 + 0.4 / 4) / 3, rtol=1e-6
    )
    np.testing.assert_allclose(loss("token_mean").clip_fraction, 2 / 6, rtol=1e-6)
    # DAPO's clip-higher: eps_high 0.28 lets rho 1.5 count as 1.28.
    np.testing.assert_allclose(
        loss("token_mean", eps_high=0.28).loss, (-0.64 - 0.45 + 0.4) / 6, rtol=1e-6
    )


def test_kl_estimators_by_hand():
    logp, ref = jnp.zeros((1, 1, 1)), jnp.full((1, 1, 1), 0.5)  # ref - logp = 0.5
    m, a = jnp.ones((1, 1, 1)), jnp.zeros((1, 1))
    k3 = rl.policy_loss(logp, logp, a, m, ref_logp=ref, kl_coef=2.0)
    np.testing.assert_allclose(k3.kl, np.exp(0.5) - 0.5 - 1, rtol=1e-6)
    np.testing.assert_allclose(k3.loss, 2.0 * (np.exp(0.5) - 1.5), rtol=1e-6)
    k1 = rl.policy_loss(logp, logp, a, m, ref_logp=ref, kl_coef=1.0, kl_estimator="k1")
    np.testing.assert_allclose(k1.kl, -0.5)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_one_step_on_fresh_samples_is_reinforce_with_the_group_advantages(kind):
    """old_logp = logp: ratios 1, no clipping; the gradient is -A_i grad logp / |y_i| / #responses."""
    logp = jax.random.normal(jax.random.key(0), (2, 3, 3))
    rewards = jnp.array([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]])
    mask = jnp.concatenate([MASK, MASK[:, ::-1]])
    adv = rl.advantages(rewards, kind=kind)

    def grpo(lp):
        return rl.policy_loss(lp, lp, adv, mask).loss

    def reinforce(lp):
        per_resp = jnp.sum(adv[..., None] * lp * mask, -1) / jnp.sum(mask, -1)
        return -jnp.mean(per_resp)

    np.testing.assert_allclose(jax.grad(grpo)(logp), jax.grad(reinforce)(logp), rtol=1e-6, atol=1e-7)
    assert float(jnp.max(jnp.abs(jax.grad(grpo)(logp)))) > 0.01
    assert float(jax.grad(grpo)(logp)[0, 0, 2]) == 0.0  # padding gets no gradient


def test_dynamic_sampling_and_overlong_shaping():
    rewards = jnp.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 7.0]])
    valid = jnp.array([[1, 1, 1], [1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(rl.degenerate_groups(rewards, valid), [True, False, True])
    # max 16 tokens, buffer 4: 0 up to 12, then -1/4 per token, -1 from 16 on.
    np.testing.assert_allclose(
        rl.overlong_penalty(jnp.array([10, 12, 13, 14, 16, 20]), max_tokens=16, buffer=4),
        [0, 0, -0.25, -0.5, -1, -1],
    )


def test_misuse_is_named():
    with pytest.raises(ValueError, match="aggregation 'mean'"):
        loss("mean")
    with pytest.raises(ValueError, match="needs max_tokens"):
        loss("constant")
    with pytest.raises(ValueError, match="needs ref_logp"):
        loss("token_mean", kl_coef=0.1)
    with pytest.raises(ValueError, match="advantage kind 'ppo'"):
        rl.advantages(REWARDS, kind="ppo")
