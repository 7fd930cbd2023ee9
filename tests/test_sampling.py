"""Next-token selection: greedy, temperature, top-k, top-p."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_align.sampling import process_logits, sample_next


def _logits(probs):
    return jnp.log(jnp.asarray([probs], jnp.float32))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = _logits([0.05, 0.5, 0.15, 0.3])

    def kept(p):
        return set(np.flatnonzero(np.isfinite(process_logits(logits, top_p=p)[0])))

    assert kept(0.4) == {1}  # the top token alone has 0.5 >= 0.4
    assert kept(0.75) == {1, 3}  # 0.5 + 0.3 = 0.8 >= 0.75
    assert kept(0.85) == {1, 3, 2}  # 0.95 >= 0.85
    assert kept(1.0) == {0, 1, 2, 3}


def test_top_k_never_emits_a_token_outside_the_top_k():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(64, 50)), jnp.float32)
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    keys = jax.random.split(jax.random.key(0), 200)
    draws = jax.vmap(lambda k: sample_next(k, logits, top_k=3)[0])(keys)  # [200, 64]
    for b in range(64):
        assert set(np.asarray(draws[:, b]).tolist()) <= set(top3[b].tolist())
    # Each of the 3 is drawn (200 draws, renormalised probabilities all > 1%).
    assert all(len(set(np.asarray(draws[:, b]).tolist())) == 3 for b in range(8))


def test_frequencies_follow_the_tempered_distribution():
    probs = np.array([0.1, 0.2, 0.7])
    T = 2.0
    tempered = probs ** (1 / T) / np.sum(probs ** (1 / T))
    keys = jax.random.split(jax.random.key(1), 20000)
    logits = _logits(probs)
    draws = np.asarray(jax.vmap(lambda k: sample_next(k, logits, temperature=T)[0][0])(keys))
    freq = np.bincount(draws, minlength=3) / len(draws)
    # 4 standard errors of a binomial proportion.
    np.testing.assert_allclose(freq, tempered, atol=4 * math.sqrt(0.25 / len(draws)))


def test_greedy_and_logprobs_of_the_raw_model():
    logits = jnp.asarray([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    tokens, logps = sample_next(jax.random.key(0), logits, greedy=True)
    np.testing.assert_array_equal(tokens, [1, 2])
    want = [
        3.0 - math.log(math.e + math.e**3 + math.e**2),
        5.0 - math.log(1 + math.e**-1 + math.e**5),
    ]
    np.testing.assert_allclose(logps, want, atol=1e-6)
    # Sampled tokens get the model's log-prob at temperature 1, not the tempered one.
    t, lp = sample_next(jax.random.key(3), logits, temperature=0.3, top_k=2)
    full = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_allclose(lp, full[jnp.arange(2), t], rtol=1e-6)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="temperature"):
        process_logits(_logits([0.5, 0.5]), temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        process_logits(_logits([0.5, 0.5]), top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        process_logits(_logits([0.5, 0.5]), top_k=-1)
