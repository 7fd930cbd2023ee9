"""Losses: language modelling (lm), pairwise preference and listwise ranking losses.

    >>> import jax.numpy as jnp
    >>> from lm_align.losses import lm_loss, preference, listwise
    >>> pc, pr = jnp.array([-10.0]), jnp.array([-12.0])  # policy log-probs: chosen, rejected
    >>> rc, rr = jnp.array([-11.0]), jnp.array([-11.0])  # reference log-probs
    >>> loss = preference.dpo(pc, pr, rc, rr, beta=0.1)  # per example [B]: -logsig(0.1 * 2)
    >>> loss.shape, round(float(loss[0]), 5)
    ((1,), 0.59814)
    >>> scores = jnp.array([[0.25, -0.25, 0.2, -0.1]])  # beta * (policy - reference) log-probs
    >>> labels = jnp.array([[0.7, 0.425, 0.6, 0.275]])  # psi_k, higher is better
    >>> loss = listwise.lipo_lambda(scores, labels, jnp.ones((1, 4), bool))  # per list [B]
    >>> loss.shape, round(float(loss[0]), 5)
    ((1,), 0.25986)

Inputs are per-sequence log-probs (pairwise, [B]) or scores and labels per list
entry with a validity mask (listwise, [B, K]); see docs/alignment.md and
docs/listwise.md.
"""

from lm_align.losses import listwise, preference
from lm_align.losses.lm import LMLoss, lm_loss

__all__ = ["LMLoss", "listwise", "lm_loss", "preference"]
