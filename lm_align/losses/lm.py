"""Next-token cross-entropy with z-loss (Wortsman et al. 2023, section 3.1.2).

For target-masked tokens t (mask m_t in {0, 1}, T = sum_t m_t):

    log Z_t = logsumexp_j logits_tj
    ce      = sum_t m_t (log Z_t - logits_t[y_t]) / T
    z_loss  = coef * sum_t m_t (log Z_t)^2 / T
    loss    = ce + z_loss

so d z_loss / d logits_t = 2 * coef * log Z_t * softmax(logits_t) * m_t / T.
Shapes: B batch, L length, V vocab.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class LMLoss(NamedTuple):
    loss: jax.Array  # ce + z_loss, scalar (what is differentiated)
    ce: jax.Array  # mean cross-entropy over masked tokens
    z_loss: jax.Array  # coef * mean (log Z)^2
    accuracy: jax.Array  # fraction of masked tokens whose target is the unique argmax
    num_tokens: jax.Array  # sum of the mask
    mean_logit: jax.Array  # mean output logit over masked tokens and the vocab
    mean_log_z: jax.Array  # mean log Z over masked tokens


def lm_loss(logits_BLV, targets_BL, mask_BL=None, *, z_loss_coef: float = 0.0) -> LMLoss:
    """Cross-entropy + z-loss averaged over tokens with mask 1 (all tokens if None)."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    if mask_BL is None:
        mask_BL = jnp.ones(targets_BL.shape, jnp.float32)
    mask_BL = mask_BL.astype(jnp.float32)
    num_tokens = jnp.sum(mask_BL)
    denom = jnp.maximum(num_tokens, 1.0)

    # One max over the vocab serves log Z, accuracy and the diagnostics: on CPU
    # every extra pass over [B, L, V] costs about as much as a matmul.
    max_BL = jax.lax.stop_gradient(jnp.max(logits_BLV, axis=-1))
    log_z_BL = max_BL + jnp.log(jnp.sum(jnp.exp(logits_BLV - max_BL[..., None]), axis=-1))
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    ce = jnp.sum((log_z_BL - target_logit_BL) * mask_BL) / denom
    z_loss = z_loss_coef * jnp.sum(jnp.square(log_z_BL) * mask_BL) / denom
    # Correct when the target is the unique max logit (ties count as wrong).
    num_max_BL = jnp.sum((logits_BLV == max_BL[..., None]).astype(jnp.int32), axis=-1)
    correct_BL = ((jax.lax.stop_gradient(target_logit_BL) >= max_BL) & (num_max_BL == 1)).astype(
        jnp.float32
    )
    accuracy = jnp.sum(correct_BL * mask_BL) / denom
    # Diagnostics carry no gradient.
    mean_logit = jax.lax.stop_gradient(jnp.sum(jnp.mean(logits_BLV, axis=-1) * mask_BL) / denom)
    mean_log_z = jax.lax.stop_gradient(jnp.sum(log_z_BL * mask_BL) / denom)
    return LMLoss(ce + z_loss, ce, z_loss, accuracy, num_tokens, mean_logit, mean_log_z)


def fused_readout_lm_loss(
    hidden_BLD,
    readout_DV,
    targets_BL,
    mask_BL=None,
    *,
    z_loss_coef: float = 0.0,
    num_chunks: int = 8,
    softcap: float = 0.0,
) -> LMLoss:
    """`lm_loss(hidden @ readout, ...)` without materialising [B, L, V] logits.

    With `softcap` > 0 the logits are `softcap * tanh(hidden @ readout / softcap)`
    (Gemma 2's final soft-capping).

    The sequence is split into `num_chunks` chunks (batch sharding untouched);
    for each chunk the logits [B*L/num_chunks, V] are formed, reduced to the
    loss terms and turned straight into their gradients
        d loss / d logits_t = w_t * (softmax_t * (1 + 2 coef log Z_t) - onehot(y_t)),
        w_t = m_t / T,
    which are contracted with the readout and the hidden states while still in
    cache. Same values and gradients as `lm_loss` (up to float rounding), less
    memory traffic: on CPU the readout is the largest matmul of small models.
    Gradients flow to `hidden_BLD` and `readout_DV` only.
    """
    B, L, D = hidden_BLD.shape
    if L % num_chunks:
        raise ValueError(f"num_chunks={num_chunks} must divide the sequence length {L}")
    if mask_BL is None:
        mask_BL = jnp.ones(targets_BL.shape, jnp.float32)
    mask_BL = mask_BL.astype(jnp.float32)
    loss, stats = _fused_loss(
        hidden_BLD, readout_DV, targets_BL, mask_BL, z_loss_coef, num_chunks, float(softcap)
    )
    ce_sum, z_sum, correct, logit_sum, log_z_sum, num_tokens = stats
    denom = jnp.maximum(num_tokens, 1.0)
    return LMLoss(
        loss,
        ce_sum / denom,
        z_loss_coef * z_sum / denom,
        correct / denom,
        num_tokens,
        logit_sum / denom,
        log_z_sum / denom,
    )


def _chunked(x_BL, num_chunks):
    """[B, L, ...] -> [num_chunks, B, L/num_chunks, ...]."""
    B, L = x_BL.shape[:2]
    x = x_BL.reshape(B, num_chunks, L // num_chunks, *x_BL.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _fused_loss_fwd(hidden_BLD, readout_DV, targets_BL, mask_BL, coef, num_chunks, softcap):
    B, L, D = hidden_BLD.shape
    denom = jnp.maximum(jnp.sum(mask_BL), 1.0)
    w_DV = readout_DV.astype(hidden_BLD.dtype)

    def chunk(d_readout_DV, inputs):
        h_BCD, y_BC, m_BC = inputs
        h_ND = h_BCD.reshape(-1, D)
        logits_NV = jnp.matmul(h_ND, w_DV, preferred_element_type=jnp.float32)
        if softcap:
            tanh_NV = jnp.tanh(logits_NV / softcap)
            logits_NV = softcap * tanh_NV
        max_N1 = jnp.max(logits_NV, axis=-1, keepdims=True)
        exp_NV = jnp.exp(logits_NV - max_N1)
        sum_N1 = jnp.sum(exp_NV, axis=-1, keepdims=True)
        log_z_N1 = max_N1 + jnp.log(sum_N1)
        is_target_NV = jax.lax.broadcasted_iota(jnp.int32, logits_NV.shape, 1) == y_BC.reshape(
            -1, 1
        )
        target_N1 = jnp.sum(jnp.where(is_target_NV, logits_NV, 0.0), axis=-1, keepdims=True)
        m_N1 = m_BC.reshape(-1, 1)
        unique_max_N1 = (
            jnp.sum((logits_NV == max_N1).astype(jnp.int32), axis=-1, keepdims=True) == 1
        )
        stats = jnp.stack(
            [
                jnp.sum((log_z_N1 - target_N1) * m_N1),  # ce
                jnp.sum(jnp.square(log_z_N1) * m_N1),  # (log Z)^2
                jnp.sum(((target_N1 >= max_N1) & unique_max_N1) * m_N1),  # correct
                jnp.sum(jnp.mean(logits_NV, axis=-1, keepdims=True) * m_N1),
                jnp.sum(log_z_N1 * m_N1),
            ]
        )
        w_N1 = m_N1 / denom
        d_logits_NV = exp_NV * (w_N1 * (1.0 + 2.0 * coef * log_z_N1) / sum_N1) - jnp.where(
            is_target_NV, w_N1, 0.0
        )
        if softcap:  # d(cap tanh(x / cap)) / dx = 1 - tanh^2
            d_logits_NV = d_logits_NV * (1.0 - jnp.square(tanh_NV))
        d_logits_NV = d_logits_NV.astype(h_ND.dtype)
        d_hidden_BCD = (d_logits_NV @ w_DV.T).reshape(h_BCD.shape)
        d_readout_DV = d_readout_DV + (h_ND.T @ d_logits_NV).astype(jnp.float32)
        return d_readout_DV, (stats, d_hidden_BCD)

    d_readout_DV, (stats_n5, d_hidden_nBCD) = jax.lax.scan(
        chunk,
        jnp.zeros(readout_DV.shape, jnp.float32),
        (
            _chunked(hidden_BLD, num_chunks),
            _chunked(targets_BL, num_chunks),
            _chunked(mask_BL, num_chunks),
        ),
    )
    ce_sum, z_sum, correct, logit_sum, log_z_sum = jnp.sum(stats_n5, axis=0)
    loss = (ce_sum + coef * z_sum) / denom
    d_hidden_BLD = jnp.moveaxis(d_hidden_nBCD, 0, 1).reshape(hidden_BLD.shape)
    stats = (ce_sum, z_sum, correct, logit_sum, log_z_sum, jnp.sum(mask_BL))
    return (loss, stats), (d_hidden_BLD, d_readout_DV.astype(readout_DV.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_loss(hidden_BLD, readout_DV, targets_BL, mask_BL, coef, num_chunks, softcap):
    return _fused_loss_fwd(hidden_BLD, readout_DV, targets_BL, mask_BL, coef, num_chunks, softcap)[0]


def _fused_loss_bwd(coef, num_chunks, softcap, grads, cotangents):
    d_hidden_BLD, d_readout_DV = grads
    g_loss = cotangents[0]  # the statistics carry no gradient
    return (g_loss * d_hidden_BLD).astype(d_hidden_BLD.dtype), g_loss * d_readout_DV, None, None


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)
