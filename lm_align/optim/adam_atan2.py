"""Adam-atan2: Adam without epsilon, bounded and exactly scale invariant.

Adam divides the first moment by ``sqrt(v_hat) + eps``. When gradients shrink
toward ``eps`` (wide models, small learning rates) the update silently
collapses: at step 1 with ``|g| = eps`` Adam moves by ``0.5 * sign(g)`` instead
of ``sign(g)``. Adam-atan2 replaces the division by ``atan2``, which needs no
epsilon:

    update = a * atan2(m_hat, b * sqrt(v_hat))

For ``|m_hat| << b * sqrt(v_hat)`` this is Adam's ``(a / b) * m_hat / sqrt(v_hat)``;
for large ratios it saturates at ``a * pi / 2``; at ``m_hat = v_hat = 0`` it is 0.
Adam-atan2 is from Everett et al. 2024, "Scaling Exponents Across
Parameterizations and Optimizers", arXiv:2407.05872; docs/optim.md,
"Adam-atan2", derives these properties.
"""

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from lm_align.optim.weight_decay import decay_and_scale_by_learning_rate


def _bias_correction(moment, decay, count):
    """``moment / (1 - decay**count)``, with ``1 - decay**count`` accurate in f32.

    ``optax.tree.bias_correction`` forms ``1 - decay**count`` in float32, which
    for ``decay = 0.999`` is off by 1.3e-5 relative (1e-4 for 0.9999), enough to
    move the first Adam-atan2 step 4e-6 away from ``a*atan(1/b)``. Computing it
    as ``-expm1(count * log(decay))`` keeps it within a few ulps.
    """
    if isinstance(decay, (int, float)):
        log_decay = math.log(decay) if decay > 0 else -math.inf
    else:
        log_decay = jnp.log(decay)
    correction = -jnp.expm1(count.astype(jnp.float32) * log_decay)
    return jax.tree.map(lambda t: t / correction.astype(t.dtype), moment)


class ScaleByAdamAtan2State(NamedTuple):
    """State of :func:`scale_by_adam_atan2`.

    Attributes:
      count: number of updates applied so far (int32 scalar).
      mu: first-moment EMA ``m``, same tree as the params.
      nu: second-moment EMA ``v``, same tree as the params.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam_atan2(
    b1: float = 0.9,
    b2: float = 0.999,
    a: float = 4 / math.pi,
    b: float = 1.0,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
    r"""Rescale updates with the Adam-atan2 rule (the direction, no learning rate).

    At step :math:`t = 1, 2, \dots` with gradient :math:`g_t`:

    .. math::

      m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
      v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
      \hat m_t &= m_t / (1 - \beta_1^t), \qquad \hat v_t = v_t / (1 - \beta_2^t) \\
      u_t &= a \cdot \operatorname{atan2}\!\big(\hat m_t,\; b \sqrt{\hat v_t}\big)

    There is no epsilon. Properties (all tested): scaling every gradient by any
    :math:`c > 0` leaves :math:`u_t` unchanged; :math:`|u_t| \le a \pi / 2`;
    :math:`u_1 = a \arctan(1/b)\, \operatorname{sign}(g_1)` (``sign(g_1)`` with the
    defaults); and :math:`u_t \approx (a/b)\, \hat m_t / \sqrt{\hat v_t}` (Adam with
    ``eps=0``) when :math:`|\hat m_t| \ll b \sqrt{\hat v_t}`.

    Finite precision: ``v`` holds :math:`g^2`, so in float32 the invariance holds
    while :math:`g^2 (1 - \beta_2)` stays a normal number, roughly
    ``1e-17 < |g| < 1e19``; below, ``v`` flushes to 0 and the update saturates at
    ``a*pi/2``; above, ``v`` overflows and the update is 0.

    Args:
      b1: decay of the first-moment EMA. Default 0.9.
      b2: decay of the second-moment EMA. Default 0.999.
      a: output scale; the update is bounded by ``a * pi / 2``. Default ``4/pi``
        (about 1.27), so that the first step is exactly ``sign(g)`` when ``b=1``.
      b: scale of the denominator; larger ``b`` widens the regime where the rule
        equals Adam with learning rate multiplied by ``a/b``. Default 1.0.
      mu_dtype: dtype of the first-moment accumulator; ``None`` infers it from
        the params. Default None.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByAdamAtan2State`.

    References:
      Everett et al., 2024, "Scaling Exponents Across Parameterizations and
      Optimizers", https://arxiv.org/abs/2407.05872 (Adam-atan2).
    """
    if mu_dtype is not None:
        mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype)

    def init_fn(params):
        return ScaleByAdamAtan2State(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        mu_hat = _bias_correction(mu, b1, count)
        nu_hat = _bias_correction(nu, b2, count)
        updates = jax.tree.map(
            lambda m, v: None if m is None else a * jnp.arctan2(m, b * jnp.sqrt(v)),
            mu_hat,
            nu_hat,
            is_leaf=lambda x: x is None,
        )
        mu = optax.tree.cast(mu, mu_dtype)
        nu = optax.tree.cast_like(nu, state.nu)
        return updates, ScaleByAdamAtan2State(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adam_atan2(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    a: float = 4 / math.pi,
    b: float = 1.0,
    weight_decay: float = 0.0,
    independent_weight_decay: bool = False,
    peak_learning_rate: Optional[float] = None,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
) -> optax.GradientTransformation:
    r"""Adam-atan2 with optional (coupled or independent) weight decay.

    With :math:`u_t` from :func:`scale_by_adam_atan2`, learning rate
    :math:`\eta_t`, decay :math:`\lambda` and schedule factor
    :math:`s_t = \eta_t / \eta_{\text{peak}}`, the parameter change is

    .. math::

      \Delta\theta_t = -\eta_t\,(u_t + \lambda \theta_t)
        \quad\text{(coupled)}, \qquad
      \Delta\theta_t = -\eta_t\, u_t - \lambda s_t \theta_t
        \quad\text{(independent)}.

    Args:
      learning_rate: float or optax schedule ``step -> lr``.
      b1: first-moment decay. Default 0.9.
      b2: second-moment decay. Default 0.999.
      a: output scale (update bound ``a*pi/2``). Default ``4/pi``.
      b: denominator scale. Default 1.0.
      weight_decay: :math:`\lambda`; 0 disables decay. Default 0.0.
      independent_weight_decay: if True decay by :math:`\lambda s_t` per step,
        independent of the peak LR (Wortsman et al.); else coupled, by
        :math:`\eta_t \lambda`. Default False.
      peak_learning_rate: :math:`\eta_{\text{peak}}`, required when
        ``independent_weight_decay`` and ``learning_rate`` is a schedule.
        Default None.
      mask: which params decay: pytree of bools or callable ``params -> mask``;
        None decays only arrays with ``ndim >= 2`` (:func:`decay_mask_matrices`).
        Default None.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Everett et al., 2024, https://arxiv.org/abs/2407.05872;
      Wortsman et al., 2023, https://arxiv.org/abs/2309.14322 (independent decay).
    """
    return optax.chain(
        scale_by_adam_atan2(b1=b1, b2=b2, a=a, b=b),
        decay_and_scale_by_learning_rate(
            learning_rate,
            weight_decay=weight_decay,
            independent_weight_decay=independent_weight_decay,
            peak_learning_rate=peak_learning_rate,
            mask=mask,
        ),
    )
