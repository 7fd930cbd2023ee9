"""Pairwise preference losses (docs/alignment.md, "Preference losses (pairwise)").

Inputs are per-sequence log-probs summed over completion tokens, shape [B]
(B = pairs in the batch): ``lp(y) = log pi_theta(y|x)``, ``lr(y) = log
pi_ref(y|x)`` (precomputed, no gradient wanted). With ``y_w`` chosen and
``y_l`` rejected:

    rho(y) = lp(y) - lr(y)                 implicit reward / beta
    h      = rho(y_w) - rho(y_l)           pair margin
    logsig(z) = -softplus(-z)              (never log(sigmoid(z)))

Every function returns the loss PER EXAMPLE, float32 [B]; the trainer reduces.

    dpo             -logsig(beta h)                                 Rafailov et al. 2023
      cDPO (eps)    -(1-eps) logsig(beta h) - eps logsig(-beta h)   Mitchell 2023
    ipo             (h - 1/(2 beta))^2                              Azar et al. 2024
      length-norm.  the same with rho(y) / |y| for each response    (TRL, OpenRLHF)
    slic            max(0, delta - lp(y_w) + lp(y_l))               Zhao et al. 2023
                    (+ lambda_reg * NLL(y_ref), added by the trainer)
    rso_sigmoid_norm  -logsig(gamma h)                              Liu et al. 2024 (RSO)
    rso_hinge_norm    max(0, 1 - gamma h)
    rso_hinge         max(0, 1 - gamma (lp(y_w) - lp(y_l)))
    geometric_dpo   -logsig(beta (2p - 1) h),  p in [0.5, 1]        Furuta et al. 2024
    bradley_terry   -logsig(r(y_w) - r(y_l) - margin)               Bradley & Terry 1952;
                    optional centering eta * mean((r_w + r_l)^2)    Eisenstein et al. 2023

p = 1 turns geometric_dpo into dpo and p = 0.5 into the constant log 2. The
cDPO-style soft cross-entropy with the same soft label is ``dpo(...,
label_smoothing=1 - p)``. The gradient of DPO pushes along the margin with the
weight of a misordered pair: d dpo / d lp(y_w) = -beta * sigmoid(-beta h).

References:
  Rafailov et al. 2023, Direct Preference Optimization, arXiv:2305.18290.
  Mitchell 2023, A note on DPO with noisy preferences (cDPO).
  Azar et al. 2024, A General Theoretical Paradigm to Understand Learning from
    Human Preferences (IPO), arXiv:2310.12036.
  Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback, arXiv:2305.10425.
  Liu et al. 2024, Statistical Rejection Sampling Improves Preference
    Optimization (RSO), arXiv:2309.06657.
  Furuta et al. 2024, Geometric-Averaged Preference Optimization for Soft
    Preference Labels, arXiv:2409.06691.
  Bradley & Terry 1952, Rank Analysis of Incomplete Block Designs.
  Eisenstein et al. 2023, Helping or Herding? Reward Model Ensembles Mitigate
    but do not Eliminate Reward Hacking, arXiv:2312.09244 (centering term).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _f32(*arrays):
    return tuple(jnp.asarray(a).astype(jnp.float32) for a in arrays)


def _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """h = (lp(y_w) - lr(y_w)) - (lp(y_l) - lr(y_l)), float32 [B]."""
    lp_w_B, lp_l_B, lr_w_B, lr_l_B = _f32(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return (lp_w_B - lr_w_B) - (lp_l_B - lr_l_B)


def implicit_rewards(policy_logps, ref_logps, beta):
    """DPO's implicit reward r(y) = beta * (lp(y) - lr(y)), float32 [B].

    For metrics: chosen/rejected rewards, their margin r_w - r_l = beta * h,
    and the reward accuracy mean(r_w > r_l). Take it under stop_gradient when
    logging.
    """
    lp_B, lr_B = _f32(policy_logps, ref_logps)
    return beta * (lp_B - lr_B)


def dpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta=0.1,
    label_smoothing=0.0,
):
    """DPO, with cDPO label smoothing: per-example loss, float32 [B].

        loss = -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)

    eps = ``label_smoothing`` (scalar or [B]): the probability that the label
    is flipped; eps = 0 is plain DPO, -logsig(beta * h). With eps = 1 - p this
    is the soft cross-entropy for a soft label p = P(y_w beats y_l).

    Args:
      policy_chosen_logps, policy_rejected_logps: lp(y_w), lp(y_l), [B].
      ref_chosen_logps, ref_rejected_logps: lr(y_w), lr(y_l), [B].
      beta: inverse temperature of the implicit reward (default 0.1, as in Rafailov et al.).
      label_smoothing: eps in [0, 0.5], scalar or [B].
    """
    logits_B = beta * _margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    eps = jnp.asarray(label_smoothing, jnp.float32)
    return -(1.0 - eps) * jax.nn.log_sigmoid(logits_B) - eps * jax.nn.log_sigmoid(-logits_B)


def ipo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """IPO: per-example loss (h - 1/(2 beta))^2, float32 [B].

    Without lengths this is the paper's form (log-probs summed over tokens).
    With ``chosen_lengths`` and ``rejected_lengths`` (completion token counts,
    [B]) each log-ratio is averaged per token first, as TRL and OpenRLHF do:

        h = rho(y_w) / |y_w| - rho(y_l) / |y_l|

    Lengths are clamped to >= 1 so that empty (padding) rows stay finite.
    Pass both lengths or neither.
    """
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("ipo: pass both chosen_lengths and rejected_lengths, or neither")
    lp_w_B, lp_l_B, lr_w_B, lr_l_B = _f32(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    rho_w_B, rho_l_B = lp_w_B - lr_w_B, lp_l_B - lr_l_B
    if chosen_lengths is not None:
        len_w_B, len_l_B = _f32(chosen_lengths, rejected_lengths)
        rho_w_B = rho_w_B / jnp.maximum(len_w_B, 1.0)
        rho_l_B = rho_l_B / jnp.maximum(len_l_B, 1.0)
    return jnp.square(rho_w_B - rho_l_B - 1.0 / (2.0 * beta))


def slic(policy_chosen_logps, policy_rejected_logps, *, margin=1.0):
    """SLiC-HF calibration hinge: max(0, delta - lp(y_w) + lp(y_l)), float32 [B].

    No reference model. delta = ``margin`` (default 1.0, as in Zhao et al.). The full SLiC-HF
    loss adds lambda_reg * (-lp(y_ref)) on the SFT target or the best-ranked
    sample; the trainer adds that term, not this function.
    """
    lp_w_B, lp_l_B = _f32(policy_chosen_logps, policy_rejected_logps)
    return jax.nn.relu(margin - (lp_w_B - lp_l_B))


def rso_hinge(policy_chosen_logps, policy_rejected_logps, *, gamma):
    """RSO hinge (no reference): max(0, 1 - gamma * (lp(y_w) - lp(y_l))), float32 [B].

    gamma is the loss temperature (default 0.05), separate from the
    sampling beta of rejection sampling.
    """
    lp_w_B, lp_l_B = _f32(policy_chosen_logps, policy_rejected_logps)
    return jax.nn.relu(1.0 - gamma * (lp_w_B - lp_l_B))


def rso_hinge_norm(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, gamma
):
    """RSO hinge-norm: max(0, 1 - gamma * h), float32 [B] (default gamma 0.05)."""
    h_B = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return jax.nn.relu(1.0 - gamma * h_B)


def rso_sigmoid_norm(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, gamma
):
    """RSO sigmoid-norm: -logsig(gamma * h), float32 [B] (DPO with beta = gamma;
    default gamma 0.05)."""
    h_B = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -jax.nn.log_sigmoid(gamma * h_B)


def geometric_dpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    soft_labels,
):
    """Geometric-averaged DPO (GDPO): -logsig(beta * (2p - 1) * h), float32 [B].

    p = ``soft_labels`` = P(y_w beats y_l) in [0.5, 1], scalar or [B]
    (``to_batch`` gives 1.0 for hard labels). p = 1 is DPO; p = 0.5 is the
    constant log 2 with zero gradient: a tie teaches nothing. Compare with the
    soft cross-entropy ``dpo(..., label_smoothing=1 - p)``, which at p = 0.5
    pulls the margin to 0 instead.
    """
    h_B = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    p_B = jnp.asarray(soft_labels, jnp.float32)
    return -jax.nn.log_sigmoid(beta * (2.0 * p_B - 1.0) * h_B)


def bradley_terry(reward_chosen, reward_rejected, *, margin=0.0):
    """Bradley-Terry reward-model loss: -logsig(r_w - r_l - margin), float32 [B].

    ``reward_chosen``, ``reward_rejected``: scalar rewards r(x, y), [B];
    ``margin``: scalar or [B] (e.g. a preference-strength margin, Llama 2).
    On DPO's implicit rewards r = beta * rho with margin 0 this is DPO.
    Add the optional centering term with ``eta * mean(reward_centering(...))``.
    """
    r_w_B, r_l_B = _f32(reward_chosen, reward_rejected)
    return -jax.nn.log_sigmoid(r_w_B - r_l_B - margin)


def reward_centering(reward_chosen, reward_rejected):
    """(r_w + r_l)^2, float32 [B]: the centering term of a reward model, which the
    trainer weights as eta * mean(...) so rewards stay near zero (BT is shift-invariant)."""
    r_w_B, r_l_B = _f32(reward_chosen, reward_rejected)
    return jnp.square(r_w_B + r_l_B)
