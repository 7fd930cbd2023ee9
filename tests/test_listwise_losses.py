"""Listwise losses (LiPO): the LiPO worked example of docs/listwise.md, closed forms, masks,
no-grad weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rax

from lm_align.losses import listwise

# The LiPO worked example of docs/listwise.md: K=4, beta 0.05.
BETA = 0.05
POLICY_LP = np.array([-40.0, -55.0, -38.0, -60.0])
REF_LP = np.array([-45.0, -50.0, -42.0, -58.0])
# By hand: psi_k = the row means of the example's win matrix
# [[0.5, 0.8, 0.6, 0.9], [0.2, 0.5, 0.3, 0.7], [0.4, 0.7, 0.5, 0.8], [0.1, 0.3, 0.2, 0.5]]
# (row k: P(y_k > y_i)); s_k = BETA * (POLICY_LP - REF_LP).
PSI = np.array([0.7, 0.425, 0.6, 0.275])
SCORES = np.array([0.25, -0.25, 0.2, -0.1])
FULL_MASK = np.ones((1, 4), bool)

ALL_LOSSES = {
    "lipo_lambda_paper": functools.partial(listwise.lipo_lambda, reduction="paper"),
    "lipo_lambda_rax": functools.partial(listwise.lipo_lambda, reduction="rax"),
    "list_mle": listwise.list_mle,
    "softmax_cross_entropy": listwise.softmax_cross_entropy,
    "pair_logistic": listwise.pair_logistic,
    "pair_hinge": listwise.pair_hinge,
    "point_mse": listwise.point_mse,
    "point_sigmoid": listwise.point_sigmoid,
}


def _example_value(loss_fn):
    return float(loss_fn(SCORES[None], PSI[None], FULL_MASK)[0])


def test_worked_example_gradient_with_respect_to_the_policy_logprobs():
    """d L / d lp_k = beta * sum over pairs of Delta_ij * d log(1 + e^-(s_i - s_j)) / d s_k.

    By hand: ranks by s are tau = (1, 4, 2, 3), so 1/log2(1 + tau) =
    (1, 0.43068, 0.63093, 0.5); gains 2^psi - 1 = (0.62450, 0.34257, 0.51572, 0.20999).
    Each pair (i, j) with psi_i > psi_j adds -Delta_ij sigma(-(s_i - s_j)) to s_i and
    the opposite to s_j.
    """
    grad = jax.grad(
        lambda lp: jnp.sum(listwise.lipo_lambda(BETA * (lp - REF_LP)[None], PSI[None], FULL_MASK))
    )(jnp.asarray(POLICY_LP))
    gain = 2.0**PSI - 1.0
    inv_discount = 1.0 / np.log2(1.0 + np.array([1.0, 4.0, 2.0, 3.0]))
    want = np.zeros(4)
    for i in range(4):
        for j in range(4):
            if PSI[i] > PSI[j]:
                delta = abs(gain[i] - gain[j]) * abs(inv_discount[i] - inv_discount[j])
                push = delta / (1.0 + np.exp(SCORES[i] - SCORES[j]))  # Delta sigma(-(s_i - s_j))
                want[i] -= push
                want[j] += push
    np.testing.assert_allclose(grad, BETA * want, rtol=1e-5)
    # The best response by psi (y_0) is pushed up, the worst (y_3) down.
    assert grad[0] < 0 < grad[3]


@pytest.mark.parametrize(
    "reduction, expected",
    [
        # Ranks by s: tau = (1, 4, 2, 3); 6 pairs; sum of Delta_ij log(1 + e^-(s_i - s_j)).
        ("paper", 0.25986),
        # Authors' code: K * mean over the 6 pairs = 0.25986 * 4 / 6.
        ("rax", 0.17324),
    ],
)
def test_lipo_lambda_worked_example(reduction, expected):
    value = _example_value(functools.partial(listwise.lipo_lambda, reduction=reduction))
    assert value == pytest.approx(expected, abs=1e-5)


def test_pair_logistic_and_list_mle_worked_example():
    assert _example_value(listwise.pair_logistic) == pytest.approx(3.49448, abs=1e-5)
    assert _example_value(listwise.list_mle) == pytest.approx(2.81988, abs=1e-5)


def test_pointwise_softmax_and_hinge_closed_forms():
    s, psi = SCORES, PSI
    hinge = sum(
        max(0.0, 1.0 - (s[i] - s[j])) for i in range(4) for j in range(4) if psi[i] > psi[j]
    )
    p = psi / psi.sum()
    softmax_ce = -np.sum(p * (s - np.log(np.sum(np.exp(s)))))
    mse = np.sum((s - psi) ** 2)
    sigmoid_ce = np.sum(psi * np.log1p(np.exp(-s)) + (1 - psi) * np.log1p(np.exp(s)))
    assert _example_value(listwise.pair_hinge) == pytest.approx(hinge, abs=1e-5)
    assert _example_value(listwise.softmax_cross_entropy) == pytest.approx(softmax_ce, abs=1e-5)
    assert _example_value(listwise.point_mse) == pytest.approx(mse, abs=1e-5)
    assert _example_value(listwise.point_sigmoid) == pytest.approx(sigmoid_ce, abs=1e-5)


def test_pair_logistic_with_two_responses_is_dpo():
    rng = np.random.default_rng(0)
    lp_w, lp_l, ref_w, ref_l = rng.normal(-50.0, 10.0, size=(4, 8))
    beta = 0.1
    h = (lp_w - ref_w) - (lp_l - ref_l)
    dpo = np.log1p(np.exp(-beta * h))  # -log sigmoid(beta * h)
    scores = beta * np.stack([lp_w - ref_w, lp_l - ref_l], axis=-1)
    labels = np.tile([1.0, 0.0], (8, 1))
    mask = np.ones((8, 2), bool)
    np.testing.assert_allclose(listwise.pair_logistic(scores, labels, mask), dpo, rtol=1e-5)
    # Which slot holds the winner does not matter.
    np.testing.assert_allclose(
        listwise.pair_logistic(scores[:, ::-1], labels[:, ::-1], mask), dpo, rtol=1e-5
    )


def test_lipo_rax_reduction_matches_the_rax_library_on_unpadded_lists():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(3, 5)).astype(np.float32)
    labels = rng.uniform(size=(3, 5)).astype(np.float32)
    ours = listwise.lipo_lambda(scores, labels, np.ones((3, 5), bool), reduction="rax")
    for b in range(3):
        theirs = rax.pairwise_logistic_loss(
            scores[b], labels[b], lambdaweight_fn=rax.dcg_lambdaweight, reduce_fn=jnp.mean
        )
        assert float(ours[b]) == pytest.approx(float(theirs), rel=1e-5)


def test_unknown_reduction_raises():
    with pytest.raises(ValueError, match="reduction"):
        listwise.lipo_lambda(SCORES[None], PSI[None], FULL_MASK, reduction="mean")


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_padded_entries_change_neither_value_nor_gradient(name):
    loss_fn = ALL_LOSSES[name]
    # Padding interleaved with the real entries, holding garbage (NaN, huge, best label).
    scores = np.array([[SCORES[0], np.nan, SCORES[1], SCORES[2], 1e6, SCORES[3]]], np.float32)
    labels = np.array([[PSI[0], 1.0, PSI[1], PSI[2], np.nan, PSI[3]]], np.float32)
    mask = np.array([[True, False, True, True, False, True]])
    valid = mask[0]

    value_and_grad = jax.jit(jax.value_and_grad(lambda s, y, m: jnp.sum(loss_fn(s, y, m))))
    padded_value, padded_grad = value_and_grad(scores, labels, mask)
    value, grad = value_and_grad(SCORES[None], PSI[None], FULL_MASK)
    assert float(padded_value) == pytest.approx(float(value), rel=1e-6)
    np.testing.assert_allclose(padded_grad[0, valid], grad[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(padded_grad[0, ~valid], 0.0)


def _numpy_lambda_weights(scores, labels):
    """Delta_ij as defined in docs/listwise.md, by hand: ranks from a descending argsort
    of the scores."""
    tau = np.empty(len(scores), int)
    tau[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    gain = 2.0**labels - 1.0
    inv_discount = 1.0 / np.log2(1.0 + tau)
    return np.abs(gain[:, None] - gain[None, :]) * np.abs(
        inv_discount[:, None] - inv_discount[None, :]
    )


def test_lambda_weights_carry_no_gradient():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(2, 6)).astype(np.float32)
    labels = rng.uniform(size=(2, 6)).astype(np.float32)
    mask = np.ones((2, 6), bool)
    delta = np.stack([_numpy_lambda_weights(scores[b], labels[b]) for b in range(2)])
    pairs = labels[:, :, None] > labels[:, None, :]

    def constant_weight_loss(s):  # Delta enters as a constant
        margin = s[:, :, None] - s[:, None, :]
        return jnp.sum(jnp.where(pairs, delta * jax.nn.softplus(-margin), 0.0))

    def lipo(s, y):
        return jnp.sum(listwise.lipo_lambda(s, y, mask))

    assert float(lipo(scores, labels)) == pytest.approx(float(constant_weight_loss(scores)), 1e-5)
    np.testing.assert_allclose(
        jax.grad(lipo)(scores, labels), jax.grad(constant_weight_loss)(scores), rtol=1e-5
    )
    # Labels enter only through Delta and the pair set: no gradient reaches them.
    np.testing.assert_array_equal(jax.grad(lipo, argnums=1)(scores, labels), 0.0)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_list_order_does_not_matter(name):
    loss_fn = ALL_LOSSES[name]
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(4, 7)).astype(np.float32)  # distinct scores and labels
    labels = rng.uniform(size=(4, 7)).astype(np.float32)
    mask = rng.uniform(size=(4, 7)) < 0.8
    perm = rng.permutation(7)
    np.testing.assert_allclose(
        loss_fn(scores, labels, mask),
        loss_fn(scores[:, perm], labels[:, perm], mask[:, perm]),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_extreme_scores_give_finite_values_and_gradients(name):
    loss_fn = jax.jit(ALL_LOSSES[name])
    scores = np.array([[1e4, -1e4, 0.0, 5e3], [-1e4, 1e4, -1e4, 1e4]], np.float32)
    labels = np.array([[0.9, 0.1, 0.5, 0.3], [0.9, 0.1, 0.5, 0.0]], np.float32)
    mask = np.array([[True, True, True, True], [True, True, True, False]])
    value, grad = jax.value_and_grad(lambda s: jnp.sum(loss_fn(s, labels, mask)))(scores)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_returns_one_value_per_example_and_zero_for_empty_lists(name):
    scores = np.stack([SCORES, SCORES]).astype(np.float32)
    labels = np.stack([PSI, PSI]).astype(np.float32)
    mask = np.array([[True] * 4, [False] * 4])
    loss = ALL_LOSSES[name](scores, labels, mask)
    assert loss.shape == (2,)
    assert float(loss[1]) == 0.0


def test_list_mle_gradient_at_tied_scores_is_the_plackett_luce_closed_form():
    """At s = 0 (the policy equal to its reference) with n = 4 distinct labels, the
    gradient for the item ranked k-th is -1 + sum_{m <= k} 1 / (n - m + 1):
    -3/4, -1 + 1/4 + 1/3, -1 + 1/4 + 1/3 + 1/2, -1 + 1/4 + 1/3 + 1/2 + 1.
    A score off the tie by float rounding must not change it."""
    labels = jnp.array([[0.0, 1.0, 0.2, 0.6]])  # ranked order: items 1, 3, 2, 0
    mask = jnp.ones((1, 4), bool)
    by_rank = np.array([-3 / 4, -5 / 12, 1 / 12, 13 / 12])
    want = by_rank[[3, 0, 2, 1]]  # back to list order
    grad = jax.grad(lambda s: listwise.list_mle(s, labels, mask).sum())
    for noise_at in (None, 0, 1, 3):
        s = jnp.zeros((1, 4)) if noise_at is None else jnp.zeros((1, 4)).at[0, noise_at].set(1e-7)
        np.testing.assert_allclose(grad(s)[0], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(listwise.list_mle(jnp.zeros((1, 4)), labels, mask), [np.log(24.0)])


def test_lipo_lambda_weights_ignore_rounding_noise_around_ties():
    """While the policy equals its reference every score is 0 up to float rounding, which
    differs between device layouts; it must not reorder the list (and so the weights)."""
    labels = jnp.array([[1.0, 0.6, 0.2, 0.0]])
    mask = jnp.ones((1, 4), bool)
    value_and_grad = jax.value_and_grad(lambda s: listwise.lipo_lambda(s, labels, mask).sum())
    zero = jnp.zeros((1, 4))
    want = value_and_grad(zero)
    for noise in (2e-7, -2e-7):
        for k in range(4):
            got = value_and_grad(zero.at[0, k].set(noise))
            np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_point_sigmoid_gradient_at_zero_is_sigmoid_minus_the_label():
    """d/ds [-psi logsig(s) - (1 - psi) logsig(-s)] = sigmoid(s) - psi, = 1/2 - psi at s = 0
    (every score is 0 while the policy equals its reference)."""
    labels = jnp.array([[1.0, 0.6, 0.2, 0.0]])
    mask = jnp.ones((1, 4), bool)
    grad = jax.grad(lambda s: listwise.point_sigmoid(s, labels, mask).sum())
    np.testing.assert_allclose(grad(jnp.zeros((1, 4)))[0], [-0.5, -0.1, 0.3, 0.5], atol=1e-6)
    np.testing.assert_allclose(listwise.point_sigmoid(jnp.zeros((1, 4)), labels, mask),
                               [4 * np.log(2.0)], rtol=1e-6)  # fmt: skip
