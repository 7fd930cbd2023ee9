"""Summed completion log-probs of (prompt, completion) rows under a model.

Every preference loss compares log pi(y | x) of a policy and of a frozen
reference. Rows come from :func:`lm_align.data.preference.to_batch` (or any
dict with the same five features): ``loss_mask`` is 1 exactly on the target
positions that are completion tokens (and the final eos), so

    log pi(y | x) = sum_t loss_mask[t] * log softmax(logits[t])[targets[t]]

    out = sequence_logprobs(model, params, batch["chosen"])
    out.logps      # float32 [B]: log pi(chosen | prompt)
    out.lengths    # float32 [B]: completion tokens counted (eos included)

Rows may have any leading shape ([B, L], listwise [B, K, L]); the outputs have
that shape without L. The readout runs over `chunks` pieces of the sequence
(rematerialised in the backward pass), so no [rows, L, V] logits are held. For a frozen reference, call it once with the reference
params (under ``jax.lax.stop_gradient`` or outside the differentiated
function) and store the result next to the data.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lm_align.models.pure import PureModel
from lm_align.models.transformer import readout_logits

ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


class TokenLogprobs(NamedTuple):
    logps: jax.Array  # float32 [..., L]: log-prob of each target, 0 where the mask is 0
    entropy: jax.Array | None  # float32 [..., L]: entropy of each position's distribution


class SequenceLogprobs(NamedTuple):
    logps: jax.Array  # float32 [...]: summed log-prob of the masked targets
    lengths: jax.Array  # float32 [...]: number of masked targets


def token_logprobs(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """log softmax(logits)[target] per position, float32 [B, L]."""
    logits = logits_BLV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_BL[..., None], axis=-1)[..., 0]
    return picked - log_z


def sequence_logprobs(
    model: Any, params: Any, rows: dict, *, chunks: int = 8, constrain_BLD: Any = None
) -> SequenceLogprobs:
    """Summed log-probs and lengths of the masked targets of each row.

    With a `PureModel` and `chunks` > 1 dividing L, the readout and log-softmax
    run chunk by chunk under `jax.checkpoint`: peak memory [rows, L / chunks, V]
    instead of [rows, L, V], for one more readout matmul in the backward pass.
    `constrain_BLD` is applied to the residual stream (a PureModel's; see
    `Transformer`): the sharded steps keep it batch-sharded with it, as the
    language-model step does.

    Args:
      model: a :class:`lm_align.models.pure.PureModel` (anything with
        ``apply(params, tokens, positions_BL=, segment_ids_BL=)`` -> logits).
      params: its parameters (policy or reference).
      rows: dict with int ``inputs``, ``targets``, ``segment_ids``,
        ``positions`` and float ``loss_mask``, each shaped [..., L].
    """
    missing = [k for k in ROW_KEYS if k not in rows]
    if missing:
        raise ValueError(f"rows lack {missing}; expected the keys {ROW_KEYS} (see to_batch)")
    lead = rows["inputs"].shape[:-1]
    L = rows["inputs"].shape[-1]
    flat = {k: jnp.asarray(rows[k]).reshape(-1, L) for k in ROW_KEYS}
    kw = dict(positions_BL=flat["positions"], segment_ids_BL=flat["segment_ids"])
    if constrain_BLD is not None:
        kw["constrain_BLD"] = constrain_BLD
    mask = flat["loss_mask"].astype(jnp.float32)
    if chunks > 1 and L % chunks == 0 and isinstance(model, PureModel):
        module = model.bind(params)
        hidden = module(flat["inputs"], return_hidden=True, **kw)
        logps = _chunked_logps(
            hidden, module.readout_matrix(), flat["targets"], mask, chunks,
            model.cfg.final_logit_softcap,
        )  # fmt: skip
    else:
        logits = model.apply(params, flat["inputs"], **kw)
        logps = jnp.sum(token_logprobs(logits, flat["targets"]) * mask, axis=-1)
    return SequenceLogprobs(logps.reshape(lead), jnp.sum(mask, axis=-1).reshape(lead))


def masked_token_logprobs(
    model: Any,
    params: Any,
    rows: dict,
    *,
    chunks: int = 8,
    constrain_BLD: Any = None,
    entropy: bool = False,
) -> TokenLogprobs:
    """Per-token log-probs of the masked targets of each row (0 elsewhere), and with
    `entropy` the entropy of the model's next-token distribution at those positions
    (no gradient). Chunked like `sequence_logprobs`; what policy-gradient losses
    on sampled tokens need."""
    missing = [k for k in ROW_KEYS if k not in rows]
    if missing:
        raise ValueError(f"rows lack {missing}; expected the keys {ROW_KEYS} (see to_batch)")
    shape = rows["inputs"].shape
    L = shape[-1]
    flat = {k: jnp.asarray(rows[k]).reshape(-1, L) for k in ROW_KEYS}
    kw = dict(positions_BL=flat["positions"], segment_ids_BL=flat["segment_ids"])
    if constrain_BLD is not None:
        kw["constrain_BLD"] = constrain_BLD
    mask = flat["loss_mask"].astype(jnp.float32)
    module = model.bind(params)
    hidden = module(flat["inputs"], return_hidden=True, **kw)
    n = chunks if chunks > 1 and L % chunks == 0 else 1
    B = hidden.shape[0]
    split = lambda x: jnp.moveaxis(x.reshape(B, n, L // n, *x.shape[2:]), 1, 0)
    softcap = model.cfg.final_logit_softcap

    @jax.checkpoint
    def chunk(h_BCD, t_BC, m_BC, w_DV):
        logits = readout_logits(h_BCD, w_DV, softcap).astype(jnp.float32)
        logp = token_logprobs(logits, t_BC) * m_BC
        if not entropy:
            return logp, jnp.zeros_like(logp)
        p = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
        ent = -jnp.sum(p * jax.nn.log_softmax(jax.lax.stop_gradient(logits), axis=-1), -1)
        return logp, ent * m_BC

    w = module.readout_matrix()
    logp_nBC, ent_nBC = jax.lax.map(lambda xs: chunk(*xs, w), (split(hidden), split(flat["targets"]), split(mask)))
    join = lambda x: jnp.moveaxis(x, 0, 1).reshape(shape)
    return TokenLogprobs(join(logp_nBC), join(ent_nBC) if entropy else None)


def _chunked_logps(hidden_BLD, readout_DV, targets_BL, mask_BL, chunks: int, softcap: float):
    """sum_t mask * log softmax(readout(hidden))[target], `chunks` positions at a time."""
    B, L, D = hidden_BLD.shape
    split = lambda x: jnp.moveaxis(x.reshape(B, chunks, L // chunks, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk(h_BCD, t_BC, m_BC, w_DV):
        return jnp.sum(token_logprobs(readout_logits(h_BCD, w_DV, softcap), t_BC) * m_BC, -1)

    def body(total_B, xs):
        return total_B + chunk(*xs, readout_DV), None

    xs = (split(hidden_BLD), split(targets_BL), split(mask_BL))
    total_B, _ = jax.lax.scan(body, jnp.zeros((B,), jnp.float32), xs)
    return total_B
