"""Pairwise preference losses against hand-computed numbers and closed forms.

Every expected value is worked out here with `math` (softplus(x) = log(1 + e^x),
-logsig(z) = softplus(-z)), never by calling the function under test. Each test
doubles as an example: inputs are per-sequence log-probs, shape [B].
"""

import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lm_align.losses.preference as P
from tests.helpers import REPO


def softplus(x):
    return math.log1p(math.exp(x)) if x < 30 else x + math.log1p(math.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# Three pairs: lp(y_w), lp(y_l), lr(y_w), lr(y_l). rho_w = lp_w - lr_w = 1 and
# rho_l = lp_l - lr_l = -1 in each, so the margin h = rho_w - rho_l = 2.
LP_W = [-10.0, -20.0, -5.0]
LP_L = [-12.0, -18.0, -5.0]
LR_W = [-11.0, -21.0, -6.0]
LR_L = [-11.0, -17.0, -4.0]
H = [2.0, 2.0, 2.0]
FOUR = tuple(jnp.array(x) for x in (LP_W, LP_L, LR_W, LR_L))


# ---------------------------------------------------------------------- DPO


def test_dpo_worked_number():
    # h = 2, beta = 0.1: -logsig(0.2) = log(1 + e^-0.2) = 0.598139
    loss = P.dpo(*FOUR)
    assert loss.shape == (3,) and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, [0.5981389] * 3, rtol=1e-6)
    np.testing.assert_allclose(loss, [softplus(-0.1 * h) for h in H], rtol=1e-6)


def test_dpo_spec_lipo_example_pair_logistic():
    """docs/listwise.md: pair-logistic over all pairs is DPO on every pair with
    psi_i > psi_j; beta 0.05 on the LiPO worked example (K=4) sums to 3.49448,
    and with K=2 pair-logistic equals DPO."""
    lp, lr = [-40.0, -55.0, -38.0, -60.0], [-45.0, -50.0, -42.0, -58.0]
    psi = [0.7, 0.425, 0.6, 0.275]
    pairs = [(i, j) for i in range(4) for j in range(4) if psi[i] > psi[j]]
    w, lo = [i for i, _ in pairs], [j for _, j in pairs]
    take = lambda x, idx: jnp.array([x[k] for k in idx])  # noqa: E731
    loss = P.dpo(take(lp, w), take(lp, lo), take(lr, w), take(lr, lo), beta=0.05)
    assert loss.shape == (6,)
    np.testing.assert_allclose(float(jnp.sum(loss)), 3.49448, atol=1e-5)
    # K = 2, responses 0 and 1: rho = (5, -5), s = (0.25, -0.25): softplus(-0.5).
    pair = P.dpo(*(jnp.array([x]) for x in (-40.0, -55.0, -45.0, -50.0)), beta=0.05)
    np.testing.assert_allclose(pair, [softplus(-0.5)], rtol=1e-6)
    np.testing.assert_allclose(pair, [0.474077], rtol=1e-5)


def test_cdpo_label_smoothing_formula():
    eps, z = 0.1, 0.1 * 2.0
    want = -(1 - eps) * -softplus(-z) - eps * -softplus(z)  # 0.9*0.598139 + 0.1*0.798139
    np.testing.assert_allclose(want, 0.618139, atol=1e-6)
    np.testing.assert_allclose(P.dpo(*FOUR, label_smoothing=eps), [want] * 3, rtol=1e-6)
    # eps = 0.5: both directions equally likely, -0.5 (logsig(z) + logsig(-z)).
    half = 0.5 * (softplus(-z) + softplus(z))
    np.testing.assert_allclose(P.dpo(*FOUR, label_smoothing=0.5), [half] * 3, rtol=1e-6)


def test_dpo_soft_cross_entropy_per_example_labels():
    # The cDPO-style soft cross-entropy for soft labels p is label_smoothing = 1 - p.
    p = np.array([1.0, 0.8, 0.5], np.float32)
    z = 0.1 * 2.0
    want = [pi * softplus(-z) + (1 - pi) * softplus(z) for pi in p]
    np.testing.assert_allclose(P.dpo(*FOUR, label_smoothing=1.0 - p), want, rtol=1e-6)


def test_dpo_gradient_closed_form():
    """d loss / d lp_w = -beta sigmoid(-beta h) = -d loss / d lp_l; the reference
    log-probs get the opposite signs (the caller stops them if it wants)."""
    beta = 0.1
    grads = jax.grad(lambda *a: jnp.sum(P.dpo(*a, beta=beta)), argnums=(0, 1, 2, 3))(*FOUR)
    g = [-beta * sigmoid(-beta * h) for h in H]  # -0.1 * sigmoid(-0.2) = -0.0450166
    np.testing.assert_allclose(g[0], -0.0450166, rtol=1e-5)
    np.testing.assert_allclose(grads[0], g, rtol=1e-6)
    np.testing.assert_allclose(grads[1], [-x for x in g], rtol=1e-6)
    np.testing.assert_allclose(grads[2], [-x for x in g], rtol=1e-6)
    np.testing.assert_allclose(grads[3], g, rtol=1e-6)


# ---------------------------------------------------------------------- IPO


def test_ipo_paper_form():
    # beta 0.1: target margin 1/(2 beta) = 5; h = 2 -> (2 - 5)^2 = 9.
    np.testing.assert_allclose(P.ipo(*FOUR, beta=0.1), [9.0] * 3, rtol=1e-6)
    # beta 0.5: target 1, h = 2 -> 1; at h = 1/(2 beta) the loss is 0.
    np.testing.assert_allclose(P.ipo(*FOUR, beta=0.5), [1.0] * 3, rtol=1e-6)
    np.testing.assert_allclose(P.ipo(*FOUR, beta=0.25), [0.0] * 3, atol=1e-7)


def test_ipo_length_normalised():
    # rho_w = 1 over 4 tokens, rho_l = -1 over 2 tokens: h = 0.25 + 0.5 = 0.75;
    # beta 0.5 -> (0.75 - 1)^2 = 0.0625.
    len_w, len_l = jnp.array([4, 1, 2]), jnp.array([2, 1, 4])
    loss = P.ipo(*FOUR, beta=0.5, chosen_lengths=len_w, rejected_lengths=len_l)
    hs = [1 / 4 + 1 / 2, 1 + 1, 1 / 2 + 1 / 4]
    np.testing.assert_allclose(loss, [(h - 1.0) ** 2 for h in hs], rtol=1e-6)
    np.testing.assert_allclose(loss[0], 0.0625, rtol=1e-6)
    # Lengths of 1 reproduce the paper form.
    ones = jnp.ones(3)
    np.testing.assert_allclose(
        P.ipo(*FOUR, beta=0.1, chosen_lengths=ones, rejected_lengths=ones), [9.0] * 3, rtol=1e-6
    )
    # Empty (padding) rows stay finite: lengths are clamped to 1.
    zeros = jnp.zeros(3)
    assert np.isfinite(P.ipo(*FOUR, beta=0.1, chosen_lengths=zeros, rejected_lengths=zeros)).all()


def test_ipo_needs_both_lengths():
    with pytest.raises(ValueError, match="both chosen_lengths and rejected_lengths"):
        P.ipo(*FOUR, beta=0.1, chosen_lengths=jnp.ones(3))


# ------------------------------------------------------- SLiC and RSO hinges

# Log-prob differences lp_w - lp_l spanning both sides of the hinge.
DIFFS = np.array([-3.0, 0.0, 0.5, 1.0, 1.5, 30.0], np.float32)


def test_slic_hinge_zero_beyond_margin_linear_inside():
    lp_l = jnp.full(DIFFS.shape, -20.0)
    loss = P.slic(lp_l + DIFFS, lp_l)  # margin 1.0
    np.testing.assert_allclose(loss, [4.0, 1.0, 0.5, 0.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(P.slic(lp_l + DIFFS, lp_l, margin=2.0), [5, 2, 1.5, 1, 0.5, 0])
    # Inside the margin the slope in lp_w is -1; beyond it no gradient.
    g = jax.grad(lambda lp_w: jnp.sum(P.slic(lp_w, lp_l)))(lp_l + DIFFS)
    np.testing.assert_allclose(g, [-1, -1, -1, 0, 0, 0])  # at the kink relu' = 0


def test_rso_hinge_no_reference():
    lp_l = jnp.full(DIFFS.shape, -20.0)
    gamma = 0.05  # hinge at lp_w - lp_l = 1/gamma = 20
    loss = P.rso_hinge(lp_l + DIFFS, lp_l, gamma=gamma)
    np.testing.assert_allclose(loss, [max(0.0, 1 - gamma * d) for d in DIFFS], rtol=1e-6)
    np.testing.assert_allclose(loss[-1], 0.0)  # 30 > 20: beyond the margin
    np.testing.assert_allclose(loss[0], 1.15, rtol=1e-6)


def test_rso_hinge_norm_and_sigmoid_norm():
    gamma = 0.05
    # h = 2: hinge-norm 1 - 0.1 = 0.9; sigmoid-norm softplus(-0.1) = 0.644397.
    np.testing.assert_allclose(P.rso_hinge_norm(*FOUR, gamma=gamma), [0.9] * 3, rtol=1e-6)
    np.testing.assert_allclose(P.rso_sigmoid_norm(*FOUR, gamma=gamma), [0.6443967] * 3, rtol=1e-6)
    # Hinge-norm is zero once gamma h >= 1 (h = 2, gamma = 0.5 and 1.0).
    np.testing.assert_allclose(P.rso_hinge_norm(*FOUR, gamma=0.5), [0.0] * 3)
    np.testing.assert_allclose(P.rso_hinge_norm(*FOUR, gamma=1.0), [0.0] * 3)
    # Sigmoid-norm is DPO with beta = gamma.
    np.testing.assert_allclose(
        P.rso_sigmoid_norm(*FOUR, gamma=0.3), P.dpo(*FOUR, beta=0.3), rtol=1e-7
    )


# ------------------------------------------------------------ geometric DPO


def test_geometric_dpo_soft_labels():
    beta = 0.1
    # p = 1: DPO; p = 0.5: log 2 whatever the margin, with zero gradient.
    np.testing.assert_allclose(
        P.geometric_dpo(*FOUR, beta=beta, soft_labels=1.0), P.dpo(*FOUR, beta=beta), rtol=1e-7
    )
    np.testing.assert_allclose(
        P.geometric_dpo(*FOUR, beta=beta, soft_labels=0.5), [math.log(2)] * 3, rtol=1e-7
    )
    g = jax.grad(lambda lp_w: jnp.sum(P.geometric_dpo(lp_w, *FOUR[1:], beta=beta, soft_labels=0.5)))
    np.testing.assert_array_equal(g(FOUR[0]), [0.0] * 3)
    # Per-example p: -logsig(beta (2p - 1) h), h = 2.
    p = jnp.array([1.0, 0.75, 0.5])
    want = [softplus(-beta * (2 * pi - 1) * 2.0) for pi in (1.0, 0.75, 0.5)]
    np.testing.assert_allclose(P.geometric_dpo(*FOUR, beta=beta, soft_labels=p), want, rtol=1e-6)


# ------------------------------------------------------------ Bradley-Terry


def test_bradley_terry_is_dpo_on_implicit_rewards():
    beta = 0.1
    r_w = P.implicit_rewards(FOUR[0], FOUR[2], beta)
    r_l = P.implicit_rewards(FOUR[1], FOUR[3], beta)
    np.testing.assert_allclose(r_w, [0.1] * 3, rtol=1e-6)  # beta * rho_w = 0.1 * 1
    np.testing.assert_allclose(r_l, [-0.1] * 3, rtol=1e-6)
    np.testing.assert_allclose(P.bradley_terry(r_w, r_l), P.dpo(*FOUR, beta=beta), rtol=1e-6)


def test_bradley_terry_margin_and_centering():
    r_w, r_l = jnp.array([2.0, 0.5, -1.0]), jnp.array([1.0, 0.5, 1.0])
    np.testing.assert_allclose(
        P.bradley_terry(r_w, r_l), [softplus(-1.0), math.log(2), softplus(2.0)], rtol=1e-6
    )
    margin = jnp.array([1.0, -1.0, 0.0])
    np.testing.assert_allclose(
        P.bradley_terry(r_w, r_l, margin=margin),
        [math.log(2), softplus(-1.0), softplus(2.0)],
        rtol=1e-6,
    )
    np.testing.assert_allclose(P.reward_centering(r_w, r_l), [9.0, 1.0, 0.0])


# ----------------------------------------------------- dtypes, jit, extremes

ALL_PAIRWISE = {
    "dpo": lambda a, b, c, d: P.dpo(a, b, c, d, beta=0.1, label_smoothing=0.1),
    "ipo": lambda a, b, c, d: P.ipo(a, b, c, d, beta=0.1),
    "ipo_len": lambda a, b, c, d: P.ipo(
        a, b, c, d, beta=0.1, chosen_lengths=jnp.full(a.shape, 7), rejected_lengths=jnp.ones(3)
    ),
    "slic": lambda a, b, c, d: P.slic(a, b),
    "rso_hinge": lambda a, b, c, d: P.rso_hinge(a, b, gamma=0.05),
    "rso_hinge_norm": lambda a, b, c, d: P.rso_hinge_norm(a, b, c, d, gamma=0.05),
    "rso_sigmoid_norm": lambda a, b, c, d: P.rso_sigmoid_norm(a, b, c, d, gamma=0.05),
    "geometric_dpo": lambda a, b, c, d: P.geometric_dpo(a, b, c, d, beta=0.1, soft_labels=0.8),
    "bradley_terry": lambda a, b, c, d: P.bradley_terry(a - c, b - d, margin=0.5),
}


@pytest.mark.parametrize("name", sorted(ALL_PAIRWISE))
def test_extreme_log_ratios_are_finite(name):
    """Log-ratios of +/-1e4 (beta h up to +/-2e3): finite values and gradients."""
    loss_fn = ALL_PAIRWISE[name]
    big = jnp.array([1e4, -1e4, 0.0])
    lp_w, lp_l, lr = -50.0 + big, -50.0 - big, jnp.full(3, -50.0)
    loss = loss_fn(lp_w, lp_l, lr, lr)
    grads = jax.grad(lambda *a: jnp.sum(loss_fn(*a)), argnums=(0, 1))(lp_w, lp_l, lr, lr)
    assert loss.shape == (3,) and np.isfinite(loss).all(), loss
    assert all(np.isfinite(g).all() for g in grads), grads


def test_dpo_extreme_values_by_hand():
    big = jnp.array([1e4, -1e4])
    lp_w, lp_l, lr = -50.0 + big, -50.0 - big, jnp.full(2, -50.0)
    # h = +/-2e4, beta h = +/-2e3: softplus(-2000) ~ 0, softplus(2000) = 2000.
    np.testing.assert_allclose(P.dpo(lp_w, lp_l, lr, lr), [0.0, 2000.0], atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(P.dpo(x, lp_l, lr, lr)))(lp_w)
    np.testing.assert_allclose(g, [0.0, -0.1], atol=1e-7)  # saturates at -beta


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("name", sorted(ALL_PAIRWISE))
def test_any_float_dtype_computes_in_float32(name, dtype):
    # The inputs are exact in every dtype, so the result matches float32's.
    args = tuple(x.astype(dtype) for x in FOUR)
    loss = jax.jit(ALL_PAIRWISE[name])(*args)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ALL_PAIRWISE[name](*FOUR), rtol=1e-6)


# ---------------------------------------------------------------------- docs


def _pairwise_doc_blocks():
    with open(os.path.join(REPO, "docs", "alignment.md"), encoding="utf-8") as f:
        text = f.read()
    heading = r"^## Preference losses \(pairwise\)\s*$"
    section = re.search(heading + r"(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, "docs/alignment.md has no '## Preference losses (pairwise)' section"
    return re.findall(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)


def test_alignment_md_pairwise_example_runs():
    blocks = _pairwise_doc_blocks()
    assert blocks
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/alignment.md[pairwise block {i}]", "exec"), {"__name__": "doc"})
