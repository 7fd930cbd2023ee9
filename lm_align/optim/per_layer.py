"""Per-parameter learning rates and Adam epsilons for any optax optimizer.

Scaling laws for hyperparameters (muP, Everett et al.'s per-layer exponents)
give each parameter its own LR factor ``C_l * (n/n_base)^(-c_l)`` and its own
Adam epsilon. Both are static pytrees of floats with the structure of the
params, so they work with any JAX model; ``lm_align.parameterization`` builds
them for lm_align's Transformer, but nothing here depends on it.

    >>> import jax, jax.numpy as jnp, optax
    >>> import lm_align.optim as lo
    >>> params = {"embed": jnp.zeros((10, 4)), "hidden": jnp.zeros((4, 4)),
    ...           "readout": jnp.zeros((4, 3))}
    >>> lr_scales = {"embed": 1.0, "hidden": 0.25, "readout": 0.5}  # e.g. (n/n_base)^(-c_l)
    >>> eps = {"embed": 1e-8, "hidden": 1e-8 / 16, "readout": 1e-8 / 4}
    >>> tx = lo.per_layer_lr(
    ...     optax.chain(lo.scale_by_adam_per_param_eps(eps=eps), optax.scale(-1e-3)),
    ...     lr_scales)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> # step 1: update = -1e-3 * scale (to 1e-5: optax's float32 1 - b2**t)
    >>> {name: round(float(u.max()), 6) for name, u in updates.items()}
    {'embed': -0.001, 'hidden': -0.00025, 'readout': -0.0005}

Labels instead of a tree of numbers: ``scales = jax.tree.map(lambda l:
{"embedding": 1.0, "hidden": 0.25}[l], labels)``. This is what
``optax.multi_transform(..., labels)`` with one ``optax.scale`` per label
computes, without one optimizer state per label.

Contents:
- :func:`scale_by_tree`: multiply updates leafwise by a static tree.
- :func:`per_layer_lr`: ``chain(base_tx, scale_by_tree(lr_scales))``.
- :func:`scale_by_adam_per_param_eps`: ``optax.scale_by_adam`` with an epsilon
  per parameter (same state, so checkpoints are interchangeable).
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax


def _as_static(scales: Any) -> Any:
    """Python floats for scalar leaves (weakly typed: keep the update's dtype)."""

    def conv(s):
        if s is None:
            return None
        if jnp.ndim(s) == 0:
            return float(s)
        return jnp.asarray(s)

    return jax.tree.map(conv, scales, is_leaf=lambda x: x is None)


def _check_structure(name: str, tree: Any, params: Any) -> None:
    """Raise a readable error unless ``tree`` has a leaf (or None) per param.

    ``params`` without leaves (optax.tree_utils.tree_map_params initialises
    with a placeholder) is not checked.
    """
    if not jax.tree.leaves(params):
        return
    try:
        jax.tree.map(lambda p, s: None, params, tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{name} must have the structure of the params (one float or None per "
            f"array); params: {jax.tree.structure(params)}, {name}: "
            f"{jax.tree.structure(tree, is_leaf=lambda x: x is None)}"
        ) from e


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    r"""Multiply each update leaf by its own static factor.

    .. math::

      u_l \leftarrow s_l\, u_l

    Args:
      scales: pytree with the structure of the params whose leaves are floats
        (or arrays broadcastable to the leaf), or ``None`` for 1.

    Returns:
      A stateless ``optax.GradientTransformation``.
    """
    scales = _as_static(scales)

    def init_fn(params):
        _check_structure("scales", scales, params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        _check_structure("scales", scales, updates)

        def mul(u, s):
            if u is None or s is None:
                return u
            return (u * s).astype(u.dtype)

        return jax.tree.map(mul, updates, scales, is_leaf=lambda x: x is None), state

    return optax.GradientTransformation(init_fn, update_fn)


def per_layer_lr(
    base_tx: optax.GradientTransformation, lr_scales: Any
) -> optax.GradientTransformation:
    r"""Give every parameter its own learning rate ``eta * lr_scales[l]``.

    ``base_tx`` already ends with ``-eta_t`` (``optax.adam(eta)``,
    :func:`~lm_align.optim.adam_atan2`, ``make_optimizer(...).tx``), so scaling
    its output by ``s_l`` is the same as running it with learning rate
    ``eta_t * s_l`` on parameter ``l``:

    .. math::

      \Delta\theta_l = s_l \cdot \text{base\_tx}(g)_l

    Weight decay inside ``base_tx`` is scaled too, exactly as with PyTorch
    parameter groups or ``mup.MuAdamW``: coupled decay becomes
    ``eta_t s_l lambda theta`` (the usual per-layer-LR AdamW), and independent
    decay becomes ``lambda s_t s_l theta``, i.e. no longer independent of the
    layer's LR. To keep decay unscaled, put :func:`scale_by_tree` between the
    direction and the decay/LR tail instead:
    ``chain(direction, scale_by_tree(lr_scales), decay_and_scale_by_learning_rate(...))``.
    Gradient clipping at the start of ``base_tx`` is unaffected either way.

    Args:
      base_tx: any optax transformation producing parameter changes.
      lr_scales: pytree of floats (or None for 1) with the params' structure.

    Returns:
      ``optax.chain(base_tx, scale_by_tree(lr_scales))``; its state is
      ``(base_state, EmptyState())``.
    """
    return optax.chain(base_tx, scale_by_tree(lr_scales))


def scale_by_adam_per_param_eps(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: Any = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformation:
    r"""``optax.scale_by_adam`` with a separate epsilon for each parameter.

    .. math::

      u_l = \hat m_l / (\sqrt{\hat v_l + \epsilon_{root}} + \epsilon_l)

    with :math:`\hat m, \hat v` exactly as in ``optax.scale_by_adam`` (same
    state type, ``optax.ScaleByAdamState``). Per-layer epsilons
    ``eps_l = eps * (n/n_base)^(-g_l)`` track how each layer's gradient shrinks
    with width, so that epsilon neither swamps small gradients (the update
    collapse of wide models) nor breaks the abc symmetry. Adam-atan2 has no
    epsilon and needs none of this.

    Args:
      b1: first-moment decay. Default 0.9.
      b2: second-moment decay. Default 0.999.
      eps: a float (then this is ``optax.scale_by_adam``) or a pytree of floats
        with the params' structure. Default 1e-8.
      eps_root: added inside the square root. Default 0.0.
      mu_dtype: dtype of the first moment; None infers it. Default None.

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAdamState``.

    References:
      Kingma & Ba, 2015, https://arxiv.org/abs/1412.6980;
      Everett et al., 2024, https://arxiv.org/abs/2407.05872 (per-layer epsilon).
    """
    eps = _as_static(eps)
    per_param = not isinstance(eps, float)
    if mu_dtype is not None:
        mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype)

    def init_fn(params):
        if per_param:
            _check_structure("eps", eps, params)
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count_inc = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
        nu_hat = optax.tree.bias_correction(nu, b2, count_inc)

        def direction(m, v, e):
            return None if m is None else m / (jnp.sqrt(v + eps_root) + e)

        if per_param:
            updates = jax.tree.map(direction, mu_hat, nu_hat, eps, is_leaf=lambda x: x is None)
        else:
            updates = jax.tree.map(
                lambda m, v: direction(m, v, eps), mu_hat, nu_hat, is_leaf=lambda x: x is None
            )
        mu = optax.tree.cast(mu, mu_dtype)
        nu = optax.tree.cast_like(nu, state.nu)
        return updates, optax.ScaleByAdamState(count=count_inc, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)
