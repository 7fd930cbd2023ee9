"""Listwise preference losses (LiPO, Liu et al. 2024) over K responses per prompt.

Each prompt has K responses with scores s_k = beta * (lp(y_k) - lr(y_k)) (the
caller forms them; beta 0.05 in the paper), labels psi_k in [0, 1] (higher is
better, e.g. psi_k = mean_i Psi[k, i] of a pairwise win matrix) and a validity
mask for ragged lists. "Pairs" are the ordered pairs (i, j) of valid entries
with psi_i > psi_j; equal labels form no pair.

    LiPO-lambda   sum_{pairs} Delta_ij * log(1 + exp(-(s_i - s_j)))
                  Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|,
                  G = 2^psi - 1, D(tau) = log2(1 + tau),
                  tau = 1-based rank of s (descending), no gradient
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

    Ties go to the earlier list position (as in rax.utils.ranks); counting
    instead of sorting keeps invalid entries out of the ranking whatever they hold.
    """
    s_i, s_j = scores_BK[..., :, None], scores_BK[..., None, :]
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

    `rax.listmle_loss` per list. Tied labels are ordered by list position.
    """
    scores_BK, labels_BK, mask_BK = _clean(scores, labels, mask)
    return _rax().listmle_loss(scores_BK, labels_BK, where=mask_BK, reduce_fn=None)


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

    Sigmoid cross-entropy with psi as a soft target; `rax.pointwise_sigmoid_loss`
    (which clips psi to [0, 1]), summed over valid entries.
    """
    scores_BK, labels_BK, mask_BK = _clean(scores, labels, mask)
    loss_BK = _rax().pointwise_sigmoid_loss(scores_BK, labels_BK, where=mask_BK, reduce_fn=None)
    return jnp.sum(loss_BK, axis=-1)
