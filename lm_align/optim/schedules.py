"""Learning-rate schedules: linear warmup, then cosine | linear | rsqrt | constant | wsd.

One function, :func:`warmup_then_decay`, built from optax schedule primitives
(``optax.linear_schedule``, ``optax.cosine_decay_schedule``,
``optax.join_schedules``). Steps are absolute: step ``t`` is the ``t``-th
optimizer update, counted from 0, exactly as ``optax.scale_by_schedule`` sees it.
"""

from typing import Optional

import jax.numpy as jnp
import optax

DECAYS = ("cosine", "linear", "rsqrt", "constant", "wsd")
COOLDOWNS = ("linear", "1-sqrt")  # wsd cooldown shapes


def _check_args(peak_lr, total_steps, warmup_steps, decay, end_lr, decay_steps, cooldown):
    if decay not in DECAYS:
        raise ValueError(f"Unknown decay {decay!r}; use one of {', '.join(DECAYS)}.")
    if cooldown not in COOLDOWNS:
        raise ValueError(f"Unknown cooldown {cooldown!r}; use one of {', '.join(COOLDOWNS)}.")
    if not peak_lr > 0:
        raise ValueError(f"peak_lr must be > 0, got {peak_lr}.")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} is larger than total_steps={total_steps}; "
            f"lower warmup_steps to at most {total_steps} or train longer."
        )
    if end_lr < 0:
        raise ValueError(f"end_lr must be >= 0, got {end_lr}.")
    if end_lr > peak_lr:
        raise ValueError(
            f"end_lr={end_lr} is larger than peak_lr={peak_lr}; end_lr is the "
            f"absolute floor the LR decays to, set it <= {peak_lr} (e.g. 0 or "
            f"peak_lr / 100)."
        )
    if decay_steps < warmup_steps:
        raise ValueError(
            f"decay_steps={decay_steps} is smaller than warmup_steps={warmup_steps}; "
            f"decay_steps is the absolute step where the decay reaches end_lr, set "
            f"it >= {warmup_steps} (or None for total_steps)."
        )


def warmup_then_decay(
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "cosine",
    end_lr: float = 0.0,
    decay_steps: Optional[int] = None,
    cooldown_steps: int = 0,
    cooldown: str = "linear",
) -> optax.Schedule:
    r"""Linear warmup from 0 to ``peak_lr``, then a decay floored at ``end_lr``.

    With :math:`\eta` = ``peak_lr``, :math:`\eta_{end}` = ``end_lr``,
    :math:`W` = ``warmup_steps``, :math:`D` = ``decay_steps`` and step :math:`t`:

    .. math::

      \eta_t = \eta\, t / W \quad (t < W), \qquad\text{then for } t \ge W:

      \text{cosine:}\ \eta_{end} + (\eta - \eta_{end})\,
          \tfrac12\big(1 + \cos(\pi \tfrac{\min(t, D) - W}{D - W})\big)

      \text{linear:}\ \eta + (\eta_{end} - \eta)\, \tfrac{\min(t, D) - W}{D - W}

      \text{rsqrt:}\ \max\big(\eta_{end},\ \eta \sqrt{W' / (t - W + W')}\big),
          \quad W' = \max(W, 1)

      \text{constant:}\ \eta

      \text{wsd:}\ \eta \text{ until } S = D - C, \text{ then }
          \eta - (\eta - \eta_{end})\, f(\tfrac{\min(t, D) - S}{C})

    with :math:`C` = ``cooldown_steps`` and :math:`f(u) = u` (``cooldown="linear"``)
    or :math:`\sqrt{u}` (``"1-sqrt"``: :math:`1 - \sqrt{u}` of the way left).
    rsqrt is :math:`\eta\sqrt{W/t}` after a warmup and :math:`\eta/\sqrt{t+1}`
    without one. After warmup the LR is never below ``end_lr``; cosine and linear
    reach it at step ``D`` and stay there. If ``D == W`` the decay phase is empty
    and cosine/linear hold ``end_lr`` from step ``W`` on.

    WSD (warmup-stable-decay) runs of different lengths share every step
    before their cooldown, so one long constant-LR run with cooldowns branched
    off it gives the runs of every length. Until S the LR is ``peak_lr``
    exactly in float32, the ``constant`` schedule bit for bit.

    Args:
      peak_lr: LR at the end of warmup (> 0).
      total_steps: number of training steps (>= 1); used for validation and as
        the default ``decay_steps``.
      warmup_steps: length of the linear warmup from 0; 0 for none. Default 0.
      decay: one of ``"cosine"``, ``"linear"``, ``"rsqrt"``, ``"constant"``, ``"wsd"``.
        Default ``"cosine"``.
      end_lr: absolute floor after warmup, ``0 <= end_lr <= peak_lr``.
        Default 0.0.
      decay_steps: absolute step at which cosine/linear/wsd reach ``end_lr``; None
        means ``total_steps``. Unused by rsqrt and constant. Default None.
      cooldown_steps: wsd: length of the final cooldown (1 <= C <= D - W).
      cooldown: wsd: ``"linear"`` or ``"1-sqrt"`` (Hägele et al. 2024).

    Returns:
      An optax schedule ``step -> lr`` (a jnp float32 scalar), jit-friendly.

    Raises:
      ValueError: for an unknown ``decay``, ``warmup_steps > total_steps``,
        ``end_lr > peak_lr``, ``decay_steps < warmup_steps`` or negative values.

    References:
      Loshchilov & Hutter, 2017, "SGDR", https://arxiv.org/abs/1608.03983 (cosine);
      Vaswani et al., 2017, https://arxiv.org/abs/1706.03762 (rsqrt);
      Hu et al., 2024, "MiniCPM", https://arxiv.org/abs/2404.06395 (WSD);
      Hägele et al., 2024, https://arxiv.org/abs/2405.18392 (1-sqrt cooldown).
    """
    decay_steps = total_steps if decay_steps is None else decay_steps
    _check_args(peak_lr, total_steps, warmup_steps, decay, end_lr, decay_steps, cooldown)
    decay_len = decay_steps - warmup_steps  # steps after warmup until end_lr
    if decay == "wsd" and not 1 <= cooldown_steps <= decay_len:
        raise ValueError(
            f"cooldown_steps={cooldown_steps} must be in [1, {decay_len}] (the steps between "
            f"warmup and decay_steps) for the wsd schedule"
        )

    if decay in ("cosine", "linear") and decay_len == 0:
        after_warmup = optax.constant_schedule(end_lr)
    elif decay == "cosine":
        after_warmup = optax.cosine_decay_schedule(
            init_value=peak_lr, decay_steps=decay_len, alpha=end_lr / peak_lr
        )
    elif decay == "linear":
        after_warmup = optax.linear_schedule(peak_lr, end_lr, decay_len)
    elif decay == "rsqrt":
        shift = max(warmup_steps, 1)
        # join_schedules also evaluates this branch at negative s (during warmup)
        # and discards it; clamp so that it stays finite there.
        after_warmup = lambda s: (
            peak_lr * jnp.sqrt(shift / (jnp.maximum(jnp.asarray(s, jnp.float32), 0.0) + shift))
        )
    elif decay == "wsd":
        stable = decay_len - cooldown_steps

        def after_warmup(s):
            u = jnp.clip((jnp.asarray(s, jnp.float32) - stable) / cooldown_steps, 0.0, 1.0)
            done = u if cooldown == "linear" else jnp.sqrt(u)
            # peak - (peak - end) * done, not end + (peak - end) * (1 - done): the
            # stable phase is then exactly peak_lr in float32, bit for bit the
            # `constant` schedule, so a WSD run is its constant-LR run until S.
            return peak_lr - (peak_lr - end_lr) * done

    else:  # constant
        after_warmup = optax.constant_schedule(peak_lr)

    def floored(step):
        return jnp.maximum(jnp.asarray(after_warmup(step), jnp.float32), end_lr)

    if warmup_steps == 0:
        return floored
    warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return optax.join_schedules([warmup, floored], boundaries=[warmup_steps])
