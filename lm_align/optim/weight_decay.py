"""Weight decay, coupled (AdamW) and independent (Wortsman et al. 2023).

With learning rate ``eta_t = eta_peak * s_t`` (``s_t`` is the schedule factor:
0 -> 1 during warmup, then decaying) and decay ``lambda``:

- coupled (AdamW, ``optax.add_decayed_weights`` before the LR scaling):
  ``theta <- theta - eta_t * lambda * theta``. The decay per step scales with
  the peak LR, so sweeping the LR also sweeps the regularization.
- independent: ``theta <- theta - lambda * s_t * theta``, applied after the LR
  scaling. It does not depend on the peak LR, which makes LR sweeps and LR
  transfer across widths cleaner. Typical lambda 1e-4 (vs 0.1 coupled).
  Equivalent to coupled decay with ``lambda / eta_peak``.

By default only matrices decay (arrays with ``ndim >= 2``): embeddings and
kernels yes; biases and norm scales no. See :func:`decay_mask_matrices`.
To decay everything pass ``mask=lambda p: jax.tree.map(lambda _: True, p)``.
"""

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from lm_align.optim.per_layer import scale_by_tree

MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]


def decay_mask_matrices(params: optax.Params) -> Any:
    """Mask that is True for arrays with ``ndim >= 2`` (the lm_align default).

    Args:
      params: a pytree of arrays.

    Returns:
      A pytree of bools with the structure of ``params``.
    """
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _resolve_mask(mask: MaskOrFn) -> Union[Any, Callable[[optax.Params], Any]]:
    return decay_mask_matrices if mask is None else mask


class AddIndependentWeightDecayState(NamedTuple):
    """State of :func:`add_independent_weight_decay`.

    Attributes:
      count: number of updates applied so far (int32 scalar), the step ``t``.
    """

    count: jax.Array


def add_independent_weight_decay(
    weight_decay: float,
    schedule_factor: Optional[Callable[[jax.Array], jax.Array]] = None,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    r"""Add learning-rate-independent weight decay (apply AFTER the LR scaling).

    .. math::

      u_t \leftarrow u_t - \lambda\, s_t\, \theta_t

    where :math:`u_t` is the incoming (already LR-scaled, sign-flipped) update
    and :math:`s_t` = ``schedule_factor(t)`` (1 when None), with ``t`` counted
    from 0 like ``optax.scale_by_schedule``.

    Args:
      weight_decay: :math:`\lambda`, decay per step at schedule factor 1.
      schedule_factor: callable ``step -> s_t``, normally ``lr(t) / peak_lr``.
        Default None (``s_t = 1``).
      mask: pytree of bools or callable ``params -> mask``; None decays only
        arrays with ``ndim >= 2``. Default None.

    Returns:
      An ``optax.GradientTransformation``; its ``update`` requires ``params``.

    References:
      Wortsman et al., 2023, "Small-scale proxies for large-scale Transformer
      training instabilities", https://arxiv.org/abs/2309.14322;
      Loshchilov & Hutter, 2019, https://arxiv.org/abs/1711.05101.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")

    def init_fn(params):
        del params
        return AddIndependentWeightDecayState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "add_independent_weight_decay needs params: call tx.update(grads, state, params)."
            )
        s_t = 1.0 if schedule_factor is None else schedule_factor(state.count)
        updates = jax.tree.map(
            lambda u, p: None if u is None else u - (weight_decay * s_t * p).astype(u.dtype),
            updates,
            params,
            is_leaf=lambda x: x is None,
        )
        return updates, AddIndependentWeightDecayState(count=optax.safe_increment(state.count))

    return optax.masked(optax.GradientTransformation(init_fn, update_fn), _resolve_mask(mask))


def independent_schedule_factor(
    learning_rate: optax.ScalarOrSchedule,
    peak_learning_rate: Optional[float] = None,
) -> Optional[Callable[[jax.Array], jax.Array]]:
    """The schedule factor ``s_t = lr(t) / peak_lr`` for independent decay.

    Args:
      learning_rate: float or optax schedule.
      peak_learning_rate: the peak LR; required when ``learning_rate`` is a
        schedule. Default None.

    Returns:
      A callable ``step -> s_t``, or None (meaning ``s_t = 1``) for a constant
      learning rate without ``peak_learning_rate``.
    """
    if peak_learning_rate is not None and peak_learning_rate <= 0:
        raise ValueError(f"peak_learning_rate must be > 0, got {peak_learning_rate}.")
    if callable(learning_rate):
        if peak_learning_rate is None:
            raise ValueError(
                "independent_weight_decay=True with a learning-rate schedule needs "
                "peak_learning_rate, so that the decay per step is "
                "weight_decay * schedule(t) / peak_learning_rate; pass "
                "peak_learning_rate=<the schedule's peak value>."
            )
        return lambda count: learning_rate(count) / peak_learning_rate
    if peak_learning_rate is None:
        return None
    ratio = learning_rate / peak_learning_rate
    return lambda count: ratio


def decay_and_scale_by_learning_rate(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    independent_weight_decay: bool = False,
    peak_learning_rate: Optional[float] = None,
    mask: MaskOrFn = None,
    lr_scales: Any = None,
) -> optax.GradientTransformation:
    r"""Turn a direction :math:`d_t` into a parameter change, with weight decay.

    .. math::

      u_t = -\eta_t c_l (d_t + \lambda \theta_t) \quad\text{(coupled)}, \qquad
      u_t = -\eta_t c_l d_t - \lambda s_t \theta_t \quad\text{(independent)},

    with :math:`s_t = \eta_t / \eta_{peak}` and :math:`c_l` the per-parameter
    LR factor (``lr_scales``, default 1): coupled decay follows the layer's
    LR, independent decay stays independent of it. This is the tail that
    :func:`adamw`, :func:`~lm_align.optim.adam_atan2` and
    :func:`~lm_align.optim.make_optimizer` share.

    Args:
      learning_rate: float or optax schedule :math:`\eta_t`.
      weight_decay: :math:`\lambda`; 0 disables decay. Default 0.0.
      independent_weight_decay: independent (True) or coupled (False) decay.
        Default False.
      peak_learning_rate: :math:`\eta_{peak}`; required for independent decay
        with a schedule. Default None.
      mask: pytree of bools or callable; None decays only ``ndim >= 2`` arrays.
        Default None.
      lr_scales: pytree of floats with the params' structure (per-layer LR
        factors, :func:`~lm_align.optim.scale_by_tree`); None = 1 everywhere.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Wortsman et al., 2023, https://arxiv.org/abs/2309.14322.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    mask = _resolve_mask(mask)
    lr = optax.scale_by_learning_rate(learning_rate)
    if lr_scales is not None:
        lr = optax.chain(scale_by_tree(lr_scales), lr)
    if not weight_decay:
        return lr
    if not independent_weight_decay:
        return optax.chain(optax.add_decayed_weights(weight_decay, mask=mask), lr)
    factor = independent_schedule_factor(learning_rate, peak_learning_rate)
    return optax.chain(lr, add_independent_weight_decay(weight_decay, factor, mask=mask))


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    independent_weight_decay: bool = False,
    peak_learning_rate: Optional[float] = None,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    r"""AdamW with coupled or independent weight decay.

    .. math::

      d_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon) \quad\text{(optax.scale\_by\_adam)}, \\
      \Delta\theta_t = -\eta_t (d_t + \lambda \theta_t) \;\text{(coupled)}
      \quad\text{or}\quad
      -\eta_t d_t - \lambda s_t \theta_t \;\text{(independent)},

    with :math:`s_t = \eta_t / \eta_{peak}`.

    Args:
      learning_rate: float or optax schedule.
      b1: first-moment decay. Default 0.9.
      b2: second-moment decay. Default 0.999.
      eps: added to :math:`\sqrt{\hat v_t}`. Default 1e-8.
      weight_decay: :math:`\lambda`. Default 1e-4.
      independent_weight_decay: decay by :math:`\lambda s_t` instead of
        :math:`\eta_t \lambda`. Default False.
      peak_learning_rate: required with independent decay and a schedule.
        Default None.
      mask: pytree of bools or callable; None decays only ``ndim >= 2`` arrays
        (note: optax.adamw decays everything by default). Default None.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization",
      https://arxiv.org/abs/1711.05101;
      Wortsman et al., 2023, https://arxiv.org/abs/2309.14322.
    """
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        decay_and_scale_by_learning_rate(
            learning_rate,
            weight_decay=weight_decay,
            independent_weight_decay=independent_weight_decay,
            peak_learning_rate=peak_learning_rate,
            mask=mask,
        ),
    )
