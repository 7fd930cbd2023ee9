"""RSO statistical rejection sampling (Liu et al. 2024, Algorithm 1)."""

import numpy as np
import pytest

from lm_align.align.rso import (
    acceptance_probabilities,
    rejection_sample,
    rejection_sample_batch,
    rejection_sweep,
)


def _rewards(n, seed=0):
    return np.random.default_rng(seed).normal(size=n)


def test_tiny_beta_returns_the_top_k_by_reward_in_descending_order():
    r_N = _rewards(64)
    top_8 = np.argsort(-r_N)[:8]
    for seed in range(5):
        idx = rejection_sample(r_N, num_samples=8, beta=1e-9, rng=seed)
        assert set(idx) == set(top_8)
        np.testing.assert_array_equal(idx, top_8)  # one sweep per sample, best first


def test_tiny_beta_gives_no_overflow_or_nan():
    r_N = np.array([0.0, -1e3, 5.0, 4.999])
    with np.errstate(all="raise"):
        prob = acceptance_probabilities(r_N, beta=1e-310)
        np.testing.assert_array_equal(prob, [0.0, 0.0, 1.0, 0.0])
        np.testing.assert_array_equal(rejection_sample(r_N, 2, 1e-310, rng=0), [2, 3])


def test_infinite_beta_includes_every_candidate_equally_often():
    num_draws, num_candidates, k = 20_000, 10, 3
    r_PN = np.tile(_rewards(num_candidates), (num_draws, 1))  # unequal rewards, ignored
    idx_PK = rejection_sample_batch(r_PN, num_samples=k, beta=np.inf, rng=0)

    assert all(len(set(row)) == k for row in idx_PK)
    included = np.bincount(idx_PK.ravel(), minlength=num_candidates) / num_draws
    p = k / num_candidates
    stderr = np.sqrt(p * (1 - p) / num_draws)
    np.testing.assert_allclose(included, p, atol=5 * stderr)
    # The order is uniform too: each candidate comes first 1/N of the time.
    first = np.bincount(idx_PK[:, 0], minlength=num_candidates) / num_draws
    p1 = 1 / num_candidates
    np.testing.assert_allclose(first, p1, atol=5 * np.sqrt(p1 * (1 - p1) / num_draws))


def test_acceptance_probabilities_at_the_limits():
    r_N = np.array([1.0, 3.0, 2.0])
    np.testing.assert_allclose(acceptance_probabilities(r_N, 0.5), np.exp([-4.0, 0.0, -2.0]))
    np.testing.assert_array_equal(acceptance_probabilities(r_N, np.inf), [1.0, 1.0, 1.0])


def test_first_sweep_acceptance_rate_matches_the_mean_probability():
    r_N = _rewards(20_000, seed=1)
    prob_N = acceptance_probabilities(r_N, beta=0.5)
    # Acceptances are independent Bernoulli(prob_i): the count's variance is
    # sum p (1 - p).
    stderr = np.sqrt(np.sum(prob_N * (1 - prob_N))) / r_N.size
    for seed in range(3):
        rate = rejection_sweep(r_N, beta=0.5, rng=seed).size / r_N.size
        assert abs(rate - prob_N.mean()) < 4 * stderr


def test_never_returns_a_candidate_twice():
    rng = np.random.default_rng(0)
    for seed in range(200):
        num_candidates = int(rng.integers(1, 40))
        k = int(rng.integers(1, num_candidates + 1))
        beta = float(rng.choice([1e-6, 0.1, 0.5, 2.0, np.inf]))
        r_N = np.round(rng.normal(size=num_candidates), 1)  # with ties
        idx = rejection_sample(r_N, k, beta, rng=seed)
        assert idx.dtype == np.int64 and idx.shape == (k,)
        assert len(set(idx.tolist())) == k
        assert idx.min() >= 0 and idx.max() < num_candidates


def test_deterministic_for_a_seed():
    r_N = _rewards(64)
    a = rejection_sample(r_N, 8, 0.5, rng=7)
    np.testing.assert_array_equal(a, rejection_sample(r_N, 8, 0.5, rng=7))
    np.testing.assert_array_equal(a, rejection_sample(r_N, 8, 0.5, np.random.default_rng(7)))


def test_batch_rows_are_independent_draws_reproducible_from_one_seed():
    r_PN = np.tile(_rewards(16), (6, 1))  # the same candidates for every prompt
    idx_PK = rejection_sample_batch(r_PN, num_samples=4, beta=np.inf, rng=3)
    assert idx_PK.shape == (6, 4) and idx_PK.dtype == np.int64
    # One generator for the batch: equal rows would mean one draw reused.
    assert len({tuple(row) for row in idx_PK.tolist()}) == 6
    np.testing.assert_array_equal(idx_PK, rejection_sample_batch(r_PN, 4, np.inf, rng=3))
    # beta -> 0: every row is its own top 4 in descending order.
    r_PN = np.stack([_rewards(16, seed) for seed in range(4)])
    np.testing.assert_array_equal(
        rejection_sample_batch(r_PN, 4, 1e-9, rng=0), np.argsort(-r_PN, axis=1)[:, :4]
    )


def test_intermediate_beta_favours_high_rewards():
    r_PN = np.stack([_rewards(64, seed) for seed in range(50)])
    pool_mean = r_PN.mean()
    top_mean = np.sort(r_PN, axis=1)[:, -8:].mean()

    def accepted_mean(beta):
        idx_PK = rejection_sample_batch(r_PN, num_samples=8, beta=beta, rng=0)
        return np.take_along_axis(r_PN, idx_PK, axis=1).mean()

    # The spec's RSO setting: 8 of 64 at beta 0.5, between the pool and the top 8.
    assert pool_mean < accepted_mean(0.5) < top_mean
    # Lower beta leans further towards the top-8.
    assert pool_mean < accepted_mean(5.0) < accepted_mean(0.5) < accepted_mean(0.1) < top_mean


@pytest.mark.parametrize(
    "rewards, num_samples, beta, match",
    [
        ([1.0, 2.0], 3, 0.5, "num_samples=3 > number of candidates 2"),
        ([1.0, 2.0], 0, 0.5, "num_samples must be a positive integer"),
        ([1.0, 2.0], 1.5, 0.5, "num_samples must be a positive integer"),
        ([1.0, 2.0], 1, 0.0, "beta must be > 0"),
        ([1.0, 2.0], 1, -1.0, "beta must be > 0"),
        ([1.0, 2.0], 1, np.nan, "beta must be > 0"),
        ([1.0, np.nan], 1, 0.5, "rewards must be finite"),
        ([1.0, np.inf], 1, 0.5, "rewards must be finite"),
        ([], 1, 0.5, "rewards is empty"),
        ([[1.0, 2.0]], 1, 0.5, "rewards must be 1-D"),
    ],
)
def test_invalid_inputs_raise(rewards, num_samples, beta, match):
    with pytest.raises(ValueError, match=match):
        rejection_sample(rewards, num_samples, beta, rng=0)


def test_invalid_batch_and_sweep_inputs_raise():
    with pytest.raises(ValueError, match="rewards_PN must be 2-D"):
        rejection_sample_batch([1.0, 2.0], 1, 0.5, rng=0)
    with pytest.raises(ValueError, match="remaining must be"):
        rejection_sweep([1.0, 2.0], 0.5, rng=0, remaining=[False, False])


def test_rso_pairs_accept_then_pair():
    from lm_align.align.rso import rso_pairs

    prompts = ["1+1=", "2+2="]
    responses = [[str(i) for i in range(10)], [f"a{i}" for i in range(10)]]
    rewards = [np.arange(10.0), np.arange(10.0)[::-1]]
    # beta -> 0 accepts the top 4 by reward; first-round pairs among them.
    records, stats = rso_pairs(prompts, responses, rewards, num_accept=4, beta=1e-9, seed=1)
    assert stats.num_records == len(records) == 4
    top = [{"6", "7", "8", "9"}, {"a0", "a1", "a2", "a3"}]
    for r in records:
        k = prompts.index(r.prompt)
        assert {r.chosen, r.rejected} <= top[k]
        score = dict(zip(responses[k], rewards[k], strict=True))
        assert score[r.chosen] > score[r.rejected]
    with pytest.raises(ValueError, match="num_accept=12"):
        rso_pairs(prompts, responses, rewards, num_accept=12, beta=0.5)


def test_rso_preferences_samples_scores_accepts_and_pairs():
    from lm_align.align.rso import rso_preferences
    from lm_align.data.tokenizers import make_tokenizer
    from lm_align.models import TransformerConfig
    from lm_align.models.pure import PureModel
    from lm_align.sampling import sample_texts

    model = PureModel(TransformerConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    params, tok = model.init(0), make_tokenizer("byte")
    prompts = ["1+2=", "30+4=", "5+67="]

    def code_sum(ps, rs):  # a reward with many distinct values
        return np.array([float(sum(map(ord, r))) for r in rs])

    kw = {"num_candidates": 8, "max_new_tokens": 4, "seed": 5}
    records, stats = rso_preferences(
        model, params, tok, prompts, scorer=code_sum, num_accept=4, beta=1e-9, **kw
    )
    cands = sample_texts(model, params, tok, prompts, num_samples=8, max_new_tokens=4, seed=5)
    assert stats.mean_score == pytest.approx(code_sum(None, sum(cands.responses, [])).mean())
    assert records and stats.num_records == len(records)
    for r in records:  # beta -> 0 accepts the top 4 of each prompt's candidates
        c = cands.responses[prompts.index(r.prompt)]
        top4 = {c[i] for i in np.argsort(-code_sum(None, c), kind="stable")[:4]}
        assert {r.chosen, r.rejected} <= top4
        assert code_sum(None, [r.chosen])[0] > code_sum(None, [r.rejected])[0]
    with pytest.raises(ValueError, match="num_accept=9"):
        rso_preferences(model, params, tok, prompts, scorer=code_sum, num_accept=9, **kw)
