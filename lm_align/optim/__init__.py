"""Optimizers for lm_align, as plain optax transformations (jax + optax only).

    >>> import jax.numpy as jnp, optax, lm_align.optim as lo
    >>> params = {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}
    >>> tx = lo.adam_atan2(lo.warmup_then_decay(1e-3, total_steps=1000, warmup_steps=100))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.full((4, 4), 1e-9), "b": jnp.ones(4)}
    >>> for step in range(2):  # warmup: the LR is 0 at step 0, 1e-5 at step 1
    ...     updates, state = tx.update(grads, state, params)
    ...     params = optax.apply_updates(params, updates)
    >>> # Adam-atan2's first steps are -lr * sign(g), however small the gradient.
    >>> round(float(updates["w"][0, 0]), 8), round(float(updates["b"][0]), 8)
    (-1e-05, -1e-05)

Contents (one idea per file):
- adam_atan2.py: ``scale_by_adam_atan2`` / ``adam_atan2``, Adam without epsilon.
- weight_decay.py: coupled and independent (Wortsman et al.) decay, ``adamw``.
- schedules.py: ``warmup_then_decay`` (cosine | linear | rsqrt | constant).
- factory.py: ``make_optimizer(config, total_steps=...)`` and ``DEFAULTS``.
- per_layer.py: per-parameter LR scales (``per_layer_lr``, ``scale_by_tree``) and
  Adam epsilons (``scale_by_adam_per_param_eps``) for any optax optimizer.
"""

from lm_align.optim.adam_atan2 import ScaleByAdamAtan2State, adam_atan2, scale_by_adam_atan2
from lm_align.optim.factory import DEFAULTS, NAMES, Optimizer, make_optimizer
from lm_align.optim.per_layer import per_layer_lr, scale_by_adam_per_param_eps, scale_by_tree
from lm_align.optim.schedules import DECAYS, warmup_then_decay
from lm_align.optim.weight_decay import (
    AddIndependentWeightDecayState,
    adamw,
    add_independent_weight_decay,
    decay_and_scale_by_learning_rate,
    decay_mask_matrices,
    independent_schedule_factor,
)

__all__ = [
    "AddIndependentWeightDecayState",
    "DECAYS",
    "DEFAULTS",
    "NAMES",
    "Optimizer",
    "ScaleByAdamAtan2State",
    "adam_atan2",
    "adamw",
    "add_independent_weight_decay",
    "decay_and_scale_by_learning_rate",
    "decay_mask_matrices",
    "independent_schedule_factor",
    "make_optimizer",
    "per_layer_lr",
    "scale_by_adam_atan2",
    "scale_by_adam_per_param_eps",
    "scale_by_tree",
    "warmup_then_decay",
]
