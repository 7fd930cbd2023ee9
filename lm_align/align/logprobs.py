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
that shape without L. For a frozen reference, call it once with the reference
params (under ``jax.lax.stop_gradient`` or outside the differentiated
function) and store the result next to the data.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


class SequenceLogprobs(NamedTuple):
    logps: jax.Array  # float32 [...]: summed log-prob of the masked targets
    lengths: jax.Array  # float32 [...]: number of masked targets


def token_logprobs(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """log softmax(logits)[target] per position, float32 [B, L]."""
    logits = logits_BLV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_BL[..., None], axis=-1)[..., 0]
    return picked - log_z


def sequence_logprobs(model: Any, params: Any, rows: dict) -> SequenceLogprobs:
    """Summed log-probs and lengths of the masked targets of each row.

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
    logits = model.apply(
        params,
        flat["inputs"],
        positions_BL=flat["positions"],
        segment_ids_BL=flat["segment_ids"],
    )
    mask = flat["loss_mask"].astype(jnp.float32)
    logps = jnp.sum(token_logprobs(logits, flat["targets"]) * mask, axis=-1)
    return SequenceLogprobs(logps.reshape(lead), jnp.sum(mask, axis=-1).reshape(lead))
