"""Listwise preference losses (LiPO, Liu et al. 2024) over K responses per prompt.

Each prompt has K responses with scores s_k = beta * (lp(y_k) - lr(y_k)) (the
caller forms them; beta 0.05 in the paper), labels psi_k in [0, 1] (higher is
better, e.g. psi_k = mean_i Psi[k, i] of a pairwise win matrix) and a validity
mask for ragged lists. "Pairs" are the ordered pairs (i, j) of valid entries
with psi_i > psi_j; equal labels form no pair.

    LiPO-lambda   sum_{pairs} Delta_ij * log(1 + exp(-(s_i - s_j)))
                  Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|,
                  G = 2^psi - 1, D(tau) = log2(1 + tau),
                  tau = 1-based rank of s (descending, s compared on a
                  grid of RANK_RESOLUTION), no gradient
    pair-logistic sum_{pairs} log(1 + exp(-(s_i - s_j)))   (= DPO on all pairs)
    pair-hinge    sum_{pairs} max(0, 1 - (s_i - s_j))
    ListMLE       -sum_k log(exp(s_(k)) / sum_{m >= k} exp(s_(m)))  (Plackett-Luce DPO;
                  (k) = k-th entry sorted by psi, descending)
    softmax       -sum_k p_k log softmax(s)_k,  p = psi / sum(psi)  (ListNet)
    point-MSE     sum_k (s_k - psi_k)^2
    point-sigmoid sum_k -psi_k logsig(s_k) - (1 - psi_k) logsig(-s_k)

Every function takes scores_BK, labels_BK and a bool mask_BK and returns the
per-example loss [B]; invalid entries may hold anything (even NaN) and change
neither the value nor the gradient.
Shapes: B batch, K list size, P = K*K pairs (rax's flattened layout).

rax (Jagerman et al. 2022, the library of the authors' code) computes the
terms that match the definitions above; it is imported lazily because it is
an optional dependency (`pip install rax`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_REDUCTIONS = ("paper", "rax")
# The ranks behind the lambda weights compare scores on a grid of this step: scores in one
# cell tie (and go to the earlier list position).
RANK_RESOLUTION = 1e-4
_INVALID_SCORE = -1e9  # exp(-1e9 - s) is 0 in float32 for any score a policy gives


def _rax():
    try:
        import rax
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lm_align.losses.listwise needs the rax learning-to-rank library: pip install rax"
        ) from e
    return rax


def _clean(scores_BK, labels_BK, mask_BK):
    """float32 scores and labels with invalid entries set to 0, and a bool mask."""
    mask_BK = jnp.asarray(mask_BK, bool)
    scores_BK = jnp.where(mask_BK, jnp.asarray(scores_BK, jnp.float32), 0.0)
    labels_BK = jnp.where(mask_BK, jnp.asarray(labels_BK, jnp.float32), 0.0)
    return scores_BK, labels_BK, mask_BK


def _pairs(labels_BK, mask_BK):
    """[B, K, K] bool: (i, j) both valid and psi_i > psi_j."""
    both_valid_BKK = mask_BK[..., :, None] & mask_BK[..., None, :]
    return both_valid_BKK & (labels_BK[..., :, None] > labels_BK[..., None, :])


def _ranks(scores_BK, mask_BK):
    """1-based rank of each valid score among the valid ones, descending.

    Scores are compared as round(s / RANK_RESOLUTION); ties go to the earlier
    list position (as in rax.utils.ranks). While the policy equals its
    reference (at initialisation, or with a zero learning rate) every s is 0
    up to float rounding (about 1e-7), and that rounding depends on the device
    layout and the CPU: compared exactly, it would order the list differently
    on 1 and on 8 devices, and so weight the pairs differently. Counting
    instead of sorting keeps invalid entries out of the ranking whatever they hold.
    """
    grid_BK = jnp.round(scores_BK / RANK_RESOLUTION)
    s_i, s_j = grid_BK[..., :, None], grid_BK[..., None, :]
    k = jnp.arange(scores_BK.shape[-1])
    ahead_BKK = (s_j > s_i) | ((s_j == s_i) & (k[None, :] < k[:, None]))
    return 1 + jnp.sum(ahead_BKK & mask_BK[..., None, :], axis=-1)


def _lambda_weights(scores_BK, labels_BK, mask_BK):
    """Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|, [B, K, K], no gradient."""
    scores_BK = jax.lax.stop_gradient(scores_BK)
    labels_BK = jax.lax.stop_gradient(labels_BK)
    gain_BK = jnp.exp2(labels_BK) - 1.0
    inv_discount_BK = 1.0 / jnp.log2(1.0 + _ranks(scores_BK, mask_BK))
    gain_diff_BKK = jnp.abs(gain_BK[..., :, None] - gain_BK[..., None, :])
    discount_diff_BKK = jnp.abs(inv_discount_BK[..., :, None] - inv_discount_BK[..., None, :])
    return jax.lax.stop_gradient(gain_diff_BKK * discount_diff_BKK)


def lipo_lambda(scores, labels, mask, *, reduction: str = "paper"):
    """LiPO-lambda: lambda-weighted pair-logistic loss over all ordered pairs, [B].

        l_ij = log(1 + exp(-(s_i - s_j)))                  for psi_i > psi_j
        Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|  (stop_gradient)
        "paper": sum_{pairs} Delta_ij l_ij
        "rax":   K * sum_{pairs} Delta_ij l_ij / #pairs      (0 when #pairs = 0)

    tau are the ranks of the current scores s (descending, ties to the earlier
    position), so the weights favour pairs whose swap would change DCG most.

    "rax" is the reduction of the authors' code: `rax.pairwise_logistic_loss`
    with `lambdaweight_fn=rax.dcg_lambdaweight` (which multiplies the weights by
    the list size) and `reduce_fn=jnp.mean` over valid pairs. Computed here, not
    by rax, because rax multiplies by the PADDED list size and means over the
    whole batch; here K is each list's number of valid entries and the mean is
    per list, so padding changes nothing. On unpadded lists the two agree.
    The reductions differ by the factor K / #pairs (#pairs = K(K-1)/2 with
    distinct labels): equal only when #pairs = K (K=3, distinct labels); K=2
    gives "rax" = 2 x "paper", K=4 gives 4/6, large K about 2/K. So "paper"
    grows with the list size and "rax" does not; tied labels (fewer pairs)
    raise the "rax" weight of the remaining pairs.

    Args:
      scores: [B, K] s_k = beta * (lp(y_k) - lr(y_k)).
      labels: [B, K] psi_k in [0, 1], higher is better.
      mask: [B, K] bool, which entries exist.
      reduction: "paper" (sum per list) or "rax" (authors' code, see above).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    scores_BK, labels_BK, mask_BK = _clean(scores, labels, mask)
    pairs_BKK = _pairs(labels_BK, mask_BK)
    delta_BKK = _lambda_weights(scores_BK, labels_BK, mask_BK)
    margin_BKK = scores_BK[..., :, None] - scores_BK[..., None, :]
    pair_loss_BKK = jnp.where(pairs_BKK, delta_BKK * jax.nn.softplus(-margin_BKK), 0.0)
    total_B = jnp.sum(pair_loss_BKK, axis=(-2, -1))
    if reduction == "paper":
        return total_B
    num_valid_B = jnp.sum(mask_BK, axis=-1).astype(jnp.float32)
    num_pairs_B = jnp.sum(pairs_BKK, axis=(-2, -1)).astype(jnp.float32)
    return num_valid_B * total_B / jnp.maximum(num_pairs_B, 1.0)


def pair_logistic(scores, labels, mask):
    """sum_{psi_i > psi_j} log(1 + exp(-(s_i - s_j))), [B]; DPO summed over all pairs.

    `rax.pairwise_logistic_loss` per pair, summed per list.
    """
    scores_BK, labels_BK, mask_BK = _clean(scores, labels, mask)
    # rax returns the pairs flattened, [B, K*K], invalid pairs zeroed.
    pair_loss_BP = _rax().pairwise_logistic_loss(
        scores_BK, labels_BK, where=mask_BK, reduce_fn=None
    )
    return jnp.sum(pair_loss_BP, axis=-1)


def pair_hinge(scores, labels, mask):
    """sum_{psi_i > psi_j} max(0, 1 - (s_i - s_j)), [B].

    `rax.pairwise_hinge_loss` per pair, summed per list.
    """
    scores_BK, labels_BK, mask_BK = _clean(scores, labels, mask)
    pair_loss_BP = _rax().pairwise_hinge_loss(scores_BK, labels_BK, where=mask_BK, reduce_fn=None)
    return jnp.sum(pair_loss_BP, axis=-1)  # [B, K*K] -> [B]


def list_mle(scores, labels, mask):
    """ListMLE = Plackett-Luce DPO: -log P_PL(order of psi | s), [B].

        -sum_k [s_(k) - log sum_{m >= k} exp(s_(m))],  (k) sorted by psi descending

    Tied labels are ordered by list position (as `rax.listmle_loss`). The
    suffix log-sum-exps come from `jax.lax.cumlogsumexp`, whose gradient is
    the softmax over the suffix everywhere, ties in s included: at s = 0 (the
    policy equal to its reference) the gradient for item (k) is
    -1 + sum_{m <= k} 1 / (n - m + 1). (`rax.listmle_loss` differentiates
    through a running max there and gives another value at exact ties.)
    """
    scores_BK, labels_BK, mask_BK = _clean(scores, labels, mask)
    # Valid entries by label, descending (stable: ties keep list order); invalid ones last.
    order_BK = jnp.argsort(jnp.where(mask_BK, -labels_BK, jnp.inf), axis=-1, stable=True)
    s_BK = jnp.take_along_axis(scores_BK, order_BK, axis=-1)
    valid_BK = jnp.take_along_axis(mask_BK, order_BK, axis=-1)
    # A finite floor keeps invalid entries out of every suffix sum without inf - inf.
    s_BK = jnp.where(valid_BK, s_BK, _INVALID_SCORE)
    lse_BK = jax.lax.cumlogsumexp(s_BK, axis=s_BK.ndim - 1, reverse=True)
    return -jnp.sum(jnp.where(valid_BK, s_BK - lse_BK, 0.0), axis=-1)


def softmax_cross_entropy(scores, labels, mask):
    """ListNet softmax cross-entropy: -sum_k p_k log softmax(s)_k, p = psi / sum psi, [B].

    `rax.softmax_loss` with `label_fn=rax.utils.normalize_probabilities` (rax's
    default uses psi unnormalised; an all-zero list gets the uniform target).
    """
    rax = _rax()
    scores_BK, labels_BK, mask_BK = _clean(scores, labels, mask)
    return rax.softmax_loss(
        scores_BK,
        labels_BK,
        where=mask_BK,
        label_fn=rax.utils.normalize_probabilities,
        reduce_fn=None,
    )


def point_mse(scores, labels, mask):
    """sum_k (s_k - psi_k)^2 over valid entries, [B]. `rax.pointwise_mse_loss`, summed."""
    scores_BK, labels_BK, mask_BK = _clean(scores, labels, mask)
    loss_BK = _rax().pointwise_mse_loss(scores_BK, labels_BK, where=mask_BK, reduce_fn=None)
    return jnp.sum(loss_BK, axis=-1)


def point_sigmoid(scores, labels, mask):
    """sum_k -psi_k logsig(s_k) - (1 - psi_k) logsig(-s_k), [B].

    Sigmoid cross-entropy with psi (clipped to [0, 1]) as a soft target,
    summed over valid entries; equal to `rax.pointwise_sigmoid_loss` summed.
    Its gradient sigmoid(s_k) - psi_k holds at s_k = 0 too (the policy equal
    to its reference), where rax's, through max(s, 0), is off by one.
    """
    scores_BK, labels_BK, mask_BK = _clean(scores, labels, mask)
    psi_BK = jnp.clip(labels_BK, 0.0, 1.0)
    loss_BK = -psi_BK * jax.nn.log_sigmoid(scores_BK) - (1.0 - psi_BK) * jax.nn.log_sigmoid(
        -scores_BK
    )
    return jnp.sum(jnp.where(mask_BK, loss_BK, 0.0), axis=-1)
