"""Tests for lm_align.losses.lm_loss against numpy and closed forms.

    out = lm_loss(logits_BLV, targets_BL, mask_BL, z_loss_coef=1e-4)
    out.loss        # ce + z_loss, what the train step differentiates
    out.ce, out.z_loss, out.accuracy, out.num_tokens, out.mean_logit, out.mean_log_z

Shape suffixes: B batch, L length, V vocab.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_align.losses import lm_loss

B, L, V = 3, 7, 11


def random_batch(seed, scale=3.0):
    """Random float32 logits [B, L, V], int targets [B, L] and a 0/1 mask [B, L] (some zeros)."""
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((B, L, V)) + rng.standard_normal((B, L, 1))).astype(
        np.float32
    )
    targets = rng.integers(0, V, (B, L)).astype(np.int32)
    mask = (rng.random((B, L)) < 0.6).astype(np.float32)
    mask[0, 0], mask[0, 1] = 1.0, 0.0
    return logits, targets, mask


def log_z_numpy(logits):
    """log sum_j exp(logit_j) in float64."""
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[..., 0]


def test_cross_entropy_matches_numpy_log_softmax_over_masked_tokens():
    logits, targets, mask = random_batch(0)
    log_probs = logits.astype(np.float64) - log_z_numpy(logits)[..., None]
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    expected_ce = (nll * mask).sum() / mask.sum()

    out = lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(out.ce, expected_ce, rtol=1e-5)
    np.testing.assert_allclose(out.loss, expected_ce, rtol=1e-5)  # z_loss_coef defaults to 0
    assert out.z_loss == 0.0
    assert out.num_tokens == mask.sum()
    np.testing.assert_allclose(
        out.mean_log_z, (log_z_numpy(logits) * mask).sum() / mask.sum(), rtol=1e-5
    )
    np.testing.assert_allclose(
        out.mean_logit, (logits.mean(-1) * mask).sum() / mask.sum(), rtol=1e-5
    )

    # No mask: every token counts.
    out_all = lm_loss(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(out_all.ce, nll.mean(), rtol=1e-5)
    assert out_all.num_tokens == B * L


def test_masked_out_tokens_change_nothing_and_get_no_gradient():
    logits, targets, mask = random_batch(1)
    rng = np.random.default_rng(2)
    off = mask == 0
    other_logits, other_targets = logits.copy(), targets.copy()
    other_logits[off] = 50.0 * rng.standard_normal((off.sum(), V))
    other_targets[off] = (targets[off] + 1) % V

    def loss(lg, tg):
        return lm_loss(jnp.asarray(lg), jnp.asarray(tg), jnp.asarray(mask), z_loss_coef=1e-2)

    a, b = loss(logits, targets), loss(other_logits, other_targets)
    for field in a._fields:
        np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=1e-6, err_msg=field)

    grad = jax.grad(
        lambda lg: lm_loss(lg, jnp.asarray(targets), jnp.asarray(mask), z_loss_coef=1e-2).loss
    )(jnp.asarray(logits))
    assert np.all(np.asarray(grad)[off] == 0.0)
    assert np.all(np.abs(np.asarray(grad)[~off]).max(-1) > 0)


def test_accuracy_counts_argmax_hits_over_masked_tokens():
    logits, targets, mask = random_batch(3)
    argmax = logits.argmax(-1)
    # Make exactly the tokens at even positions hits, the rest misses.
    hit = np.zeros((B, L), bool)
    hit[:, ::2] = True
    targets = np.where(hit, argmax, (argmax + 1) % V).astype(np.int32)

    out = lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(out.accuracy, (hit * mask).sum() / mask.sum(), rtol=1e-6)
    assert 0.0 < float(out.accuracy) < 1.0


@pytest.mark.parametrize("coef", [1e-4, 0.3])
def test_z_loss_gradient_is_two_coef_log_z_softmax_over_num_tokens(coef):
    """d z_loss / d logits_t = 2 * coef * log Z_t * softmax(logits_t) * m_t / T."""
    logits, targets, mask = random_batch(4)
    grad = jax.grad(
        lambda lg: lm_loss(lg, jnp.asarray(targets), jnp.asarray(mask), z_loss_coef=coef).z_loss
    )(jnp.asarray(logits))

    log_z = log_z_numpy(logits)
    softmax = np.exp(logits.astype(np.float64) - log_z[..., None])
    expected = 2 * coef * log_z[..., None] * softmax * mask[..., None] / mask.sum()
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-9 * coef)
    assert np.all(np.asarray(grad)[mask == 0] == 0.0)


def test_z_loss_value_and_its_response_to_a_logit_shift():
    """z_loss = coef * mean (log Z)^2 over masked tokens; logits + c leaves ce unchanged and
    moves every log Z to log Z + c."""
    coef, c = 1e-2, 2.5
    logits, targets, mask = random_batch(5)
    log_z = log_z_numpy(logits)

    def masked_mean(x):
        return (x * mask).sum() / mask.sum()

    out = lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z_loss_coef=coef)
    shifted = lm_loss(
        jnp.asarray(logits + c), jnp.asarray(targets), jnp.asarray(mask), z_loss_coef=coef
    )

    np.testing.assert_allclose(out.z_loss, coef * masked_mean(log_z**2), rtol=1e-5)
    np.testing.assert_allclose(out.loss, out.ce + coef * masked_mean(log_z**2), rtol=1e-5)
    np.testing.assert_allclose(shifted.ce, out.ce, rtol=1e-5)
    np.testing.assert_allclose(shifted.z_loss, coef * masked_mean((log_z + c) ** 2), rtol=1e-5)
    assert abs(float(shifted.z_loss) - float(out.z_loss)) > 1e-3  # the shift is visible


@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_fused_readout_loss_matches_materialised_logits(softcap):
    """Chunked readout + loss: same values, same gradients as lm_loss on full logits
    (soft-capped as cap * tanh(logits / cap) when softcap > 0)."""
    from lm_align.losses.lm import fused_readout_lm_loss

    B, L, D, V = 3, 8, 16, 37
    hidden = jax.random.normal(jax.random.key(0), (B, L, D))
    readout = jax.random.normal(jax.random.key(1), (D, V))
    targets = jax.random.randint(jax.random.key(2), (B, L), 0, V)
    mask = (jax.random.uniform(jax.random.key(3), (B, L)) > 0.3).astype(jnp.float32)

    def full(h, w):
        logits = jnp.einsum("bld,dv->blv", h, w)
        if softcap:
            logits = softcap * jnp.tanh(logits / softcap)
        return lm_loss(logits, targets, mask, z_loss_coef=1e-2)

    for chunks in (1, 2, 8):

        def fused(h, w):
            return fused_readout_lm_loss(
                h, w, targets, mask, z_loss_coef=1e-2, num_chunks=chunks, softcap=softcap
            )

        ref, out = full(hidden, readout), jax.jit(fused)(hidden, readout)
        for field in ref._fields:
            np.testing.assert_allclose(
                float(getattr(out, field)), float(getattr(ref, field)), rtol=1e-5, err_msg=field
            )
        # Scaled upstream cotangent, as when the loss is one term of a larger objective.
        g_ref = jax.grad(lambda h, w: 3.0 * full(h, w).loss, argnums=(0, 1))(hidden, readout)
        g_out = jax.jit(jax.grad(lambda h, w: 3.0 * fused(h, w).loss, argnums=(0, 1)))(
            hidden, readout
        )
        for a, b in zip(g_out, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="must divide"):
        fused_readout_lm_loss(hidden, readout, targets, mask, num_chunks=3)
