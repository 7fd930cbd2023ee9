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
    correct_BL = ((jax.lax.stop_gradient(target_logit_BL) >= max_BL) & (num_max_BL == 1)).astype(jnp.float32)
    accuracy = jnp.sum(correct_BL * mask_BL) / denom
    # Diagnostics carry no gradient.
    mean_logit = jax.lax.stop_gradient(jnp.sum(jnp.mean(logits_BLV, axis=-1) * mask_BL) / denom)
    mean_log_z = jax.lax.stop_gradient(jnp.sum(log_z_BL * mask_BL) / denom)
    return LMLoss(ce + z_loss, ce, z_loss, accuracy, num_tokens, mean_logit, mean_log_z)
