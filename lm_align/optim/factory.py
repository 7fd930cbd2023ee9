"""Build an optax optimizer and its LR schedule from a flat config.

    opt = make_optimizer({"name": "adam_atan2", "lr": 3e-3}, total_steps=10_000)
    state = opt.tx.init(params)
    updates, state = opt.tx.update(grads, state, params)

``config`` is any mapping with ``.get(key, default)`` and ``keys()`` (a dict or
an ``ml_collections.ConfigDict``); missing fields take their value from
:data:`DEFAULTS`, unknown fields raise. The chain is

    clip_by_global_norm -> direction -> coupled decay -> per-layer LR scales -> -lr_t
        -> independent decay

where the direction is Adam, Adam-atan2, Adafactor, SGD momentum or Muon
(Newton-Schulz-orthogonalised momentum on the matrices given by
``muon_dims``, Adam on every other parameter). Weight
decay is the same orthogonal knob for every optimizer (``weight_decay=0`` turns
it off), so ``adam`` and ``adamw`` build the same chain.

Gradient accumulation: lm_align's trainer accumulates micro-batches inside the
train step itself. Standalone users who want k-step accumulation can wrap the
result: ``optax.MultiSteps(make_optimizer(cfg, total_steps=n).tx, k)`` (then
``total_steps`` counts optimizer updates, i.e. micro-steps / k).
"""

import math
from typing import Any, NamedTuple

import jax
import optax

from lm_align.optim.adam_atan2 import scale_by_adam_atan2
from lm_align.optim.per_layer import scale_by_adam_per_param_eps
from lm_align.optim.schedules import warmup_then_decay
from lm_align.optim.weight_decay import decay_and_scale_by_learning_rate

NAMES = ("adamw", "adam", "adam_atan2", "adafactor", "sgd", "muon")

# Defaults follow the small-scale-proxy setup of Wortsman et al. 2023
# (AdamW, b2 0.95, clip 1, independent decay 1e-4, cosine to 1e-5).
DEFAULTS = {
    "name": "adamw",  # adamw | adam | adam_atan2 | adafactor | sgd
    "lr": 1e-3,  # peak learning rate, reached at the end of warmup
    "b1": 0.9,  # first-moment decay (adam, adamw, adam_atan2)
    "b2": 0.95,  # second-moment decay (adam, adamw, adam_atan2)
    "eps": 1e-8,  # Adam epsilon added to sqrt(v_hat) (adam, adamw)
    "weight_decay": 1e-4,  # lambda; 0 = off; only ndim >= 2 arrays decay
    "independent_weight_decay": True,  # True: decay lambda*lr_t/lr per step; False: lr_t*lambda
    "momentum": 0.9,  # sgd momentum (0 or None = plain SGD); muon momentum
    "nesterov": False,  # sgd Nesterov momentum
    "clip_norm": 1.0,  # global-norm gradient clipping; 0 or None = off
    "schedule": "cosine",  # cosine | linear | rsqrt | constant | wsd (after warmup)
    "warmup_steps": 0,  # linear warmup from 0 to lr, in optimizer steps
    "end_lr": 1e-5,  # absolute LR floor after warmup (cosine/linear target)
    "decay_steps": None,  # absolute step where cosine/linear/wsd reach end_lr; None = total_steps
    "cooldown_fraction": 0.2,  # wsd: the final cooldown, as a fraction of the steps after warmup
    "cooldown": "linear",  # wsd cooldown shape: linear | 1-sqrt
    "atan2_a": 4 / math.pi,  # adam_atan2 output scale (update bound a*pi/2)
    "atan2_b": 1.0,  # adam_atan2 denominator scale
    "adafactor_factored": True,  # adafactor: factor the second moment of matrices
    "adafactor_decay_rate": 0.8,  # adafactor: b2_t = 1 - t^(-decay_rate)
}


class Optimizer(NamedTuple):
    """What :func:`make_optimizer` returns.

    Attributes:
      tx: the optax transformation; its ``update`` needs ``params``.
      schedule: the learning rate schedule ``step -> lr`` (for logging).
    """

    tx: optax.GradientTransformation
    schedule: optax.Schedule


def _resolve(config: Any) -> dict[str, Any]:
    unknown = sorted(set(config.keys()) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"Unknown optimizer config key(s) {unknown}; valid keys are {sorted(DEFAULTS)}."
        )
    c = {k: config.get(k, v) for k, v in DEFAULTS.items()}
    if c["name"] not in NAMES:
        raise ValueError(f"Unknown optimizer name {c['name']!r}; use one of {', '.join(NAMES)}.")
    return c


def _muon(c: dict[str, Any], muon_dims: Any) -> optax.GradientTransformation:
    """Muon on the parameters whose `muon_dims` entry is (reduction axes, output
    axes) and Adam(b1, b2, eps) on those whose entry is None.

    Axes in neither group (a scan's layer axis, the q/k/v axis of a fused
    projection) are batch axes: each slice is orthogonalised on its own.
    Without `muon_dims`, 2-D parameters are [in, out] matrices. The
    orthogonalised update is scaled by sqrt(max(1, fan_out / fan_in)) (optax's
    width-transfer scaling), so its RMS does not change with width.
    """
    from optax.contrib import MuonDimensionNumbers, scale_by_muon
    from optax.contrib._muon import scale_by_shape

    is_dims = lambda x: x is None or (isinstance(x, tuple) and len(x) == 2)

    def dims_of(params):  # default: 2-D arrays are [in, out] matrices
        if muon_dims is not None:
            return muon_dims
        return jax.tree.map(lambda p: ((0,), (1,)) if p.ndim == 2 else None, params)

    def labels(params):
        return jax.tree.map(lambda d: "adam" if d is None else "muon", dims_of(params), is_leaf=is_dims)

    def masked_dims(updates):  # muon's state and updates hold its own leaves only
        return jax.tree.map(
            lambda d: optax.MaskedNode() if d is None else MuonDimensionNumbers(*d),
            dims_of(updates), is_leaf=is_dims,
        )  # fmt: skip

    return optax.partition(
        {
            "muon": optax.chain(
                scale_by_muon(beta=c["momentum"], nesterov=True, weight_dimension_numbers=masked_dims),
                scale_by_shape(weight_dimension_numbers=masked_dims),
            ),
            "adam": optax.scale_by_adam(b1=c["b1"], b2=c["b2"], eps=c["eps"]),
        },
        labels,
    )


def _direction(c: dict[str, Any], eps: Any = None, muon_dims: Any = None) -> optax.GradientTransformation:
    """The update direction (before decay and learning rate) for ``c['name']``."""
    name = c["name"]
    if eps is not None and name not in ("adamw", "adam"):
        raise ValueError(
            f"a per-parameter epsilon applies to adam/adamw only, not {name!r} "
            "(set param.per_layer_eps=false)."
        )
    if name == "muon":
        return _muon(c, muon_dims)
    if name in ("adamw", "adam"):
        if eps is not None:
            return scale_by_adam_per_param_eps(b1=c["b1"], b2=c["b2"], eps=eps)
        return optax.scale_by_adam(b1=c["b1"], b2=c["b2"], eps=c["eps"])
    elif name == "adam_atan2":
        return scale_by_adam_atan2(b1=c["b1"], b2=c["b2"], a=c["atan2_a"], b=c["atan2_b"])
    elif name == "adafactor":
        # optax.adafactor's direction (factored RMS, update clipping at block RMS
        # 1, relative step size) without its LR scaling and weight decay.
        return optax.chain(
            optax.scale_by_factored_rms(
                factored=c["adafactor_factored"], decay_rate=c["adafactor_decay_rate"]
            ),
            optax.clip_by_block_rms(1.0),
            optax.scale_by_param_block_rms(),
        )
    elif name == "sgd":
        if not c["momentum"]:
            return optax.identity()
        return optax.trace(decay=c["momentum"], nesterov=c["nesterov"])
    raise ValueError(f"Unknown optimizer name {name!r}; use one of {NAMES}.")


def _cooldown_steps(c: dict[str, Any], total_steps: int) -> int:
    """wsd: round(cooldown_fraction x the steps after warmup), at least 1."""
    if c["schedule"] != "wsd":
        return 0
    if not 0 < c["cooldown_fraction"] <= 1:
        raise ValueError(f"cooldown_fraction={c['cooldown_fraction']} must be in (0, 1].")
    decay_steps = total_steps if c["decay_steps"] is None else c["decay_steps"]
    return max(1, round(c["cooldown_fraction"] * (decay_steps - c["warmup_steps"])))


def make_optimizer(
    config: Any, *, total_steps: int, lr_scales: Any = None, eps: Any = None,
    muon_dims: Any = None,
) -> Optimizer:
    """Build ``Optimizer(tx, schedule)`` from a flat config (see :data:`DEFAULTS`).

    Args:
      config: mapping with ``.get`` and ``keys()``; fields as in ``DEFAULTS``.
      total_steps: number of optimizer updates; sets the default decay length.
      lr_scales: optional pytree of floats with the params' structure: each
        parameter's LR is ``lr_t * lr_scales[l]`` (e.g.
        :meth:`lm_align.parameterization.Parameterization.lr_scales`). Coupled
        decay follows it, independent decay does not.
      eps: optional pytree of per-parameter Adam epsilons replacing
        ``config['eps']`` (adam/adamw only).
      muon_dims: for ``name='muon'``, a pytree with the params' structure of
        (reduction axes, output axes) tuples for the matrices Muon updates and
        None for the parameters Adam updates.

    Returns:
      ``Optimizer(tx, schedule)``.

    Raises:
      ValueError: unknown ``name``, unknown config keys, or invalid schedule or
        clipping values.
    """
    c = _resolve(config)
    schedule = warmup_then_decay(
        c["lr"],
        total_steps,
        warmup_steps=c["warmup_steps"],
        decay=c["schedule"],
        end_lr=c["end_lr"],
        decay_steps=c["decay_steps"],
        cooldown_steps=_cooldown_steps(c, total_steps),
        cooldown=c["cooldown"],
    )
    parts = []
    if c["clip_norm"] is not None and c["clip_norm"] < 0:
        raise ValueError(f"clip_norm must be >= 0 (0 or None = off), got {c['clip_norm']}.")
    if c["clip_norm"]:
        parts.append(optax.clip_by_global_norm(c["clip_norm"]))
    parts.append(_direction(c, eps, muon_dims))
    parts.append(
        decay_and_scale_by_learning_rate(
            schedule,
            weight_decay=c["weight_decay"],
            independent_weight_decay=c["independent_weight_decay"],
            peak_learning_rate=c["lr"],
            lr_scales=lr_scales,
        )
    )
    return Optimizer(tx=optax.chain(*parts), schedule=schedule)
