"""The `param` config group drives the Transformer and the trainer's optimizer.

Closed forms from docs/scaling.md (exponent tables; Everett et al. 2024,
arXiv:2407.05872): step-1 Adam updates of size
eta * C_l * r^(-c_l), effective init stds scaling as r^(-(a+b)) (relative
width mode), and the abc symmetry holding for the whole train step.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_align import parameterization as P
from lm_align.config import apply_overrides, load_config
from lm_align.models import TransformerConfig
from lm_align.models.pure import PureModel
from lm_align.train.setup import build_experiment
from lm_align.train.step import init_state, make_train_step
from tests.helpers import DEFAULT_EXPERIMENT

WIDTH, BASE = 64, 16
# Adam's LR exponents c per (alignment, name), roles (embedding, hidden, readout),
# copied by hand from docs/scaling.md (test_parameterization checks the module's table).
ADAM_C = {
    ("full", "standard"): (0, 1, 1),
    ("full", "ntk"): (0, 0.5, 0.5),
    ("full", "mup"): (0.5, 1, 0.5),
    ("full", "mfp"): (0, 0.5, 0),
    ("none", "standard"): (0, 0.5, 0.5),
    ("none", "ntk"): (0, 0, 0),
    ("none", "mup"): (0.5, 0.5, 0),
    ("none", "mfp"): (0, 0, -0.5),
}
ROLES = ("embedding", "hidden", "readout")


def _cfg(overrides):
    base = [
        "model.n_layers=2",
        "model.head_dim=8",
        "data.seq_len=16",
        "train.batch_size=4",
        "train.steps=10",
        "optimizer.warmup_steps=0",
        "optimizer.schedule=constant",
        "optimizer.weight_decay=0",
        "optimizer.clip_norm=0",
    ]
    return apply_overrides(load_config(DEFAULT_EXPERIMENT), base + list(overrides))


def _width_overrides(width):
    return [f"model.d_model={width}", f"model.n_heads={width // 8}", f"model.d_ff={4 * width}"]


def _batch(vocab=259, B=4, L=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(B, L + 1))
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "loss_mask": jnp.ones((B, L), jnp.float32),
        "segment_ids": jnp.ones((B, L), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)),
    }


def _paths(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): x
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.mark.parametrize("name", P.NAMES)
@pytest.mark.parametrize("alignment", P.ALIGNMENTS)
def test_trainer_step_one_update_is_eta_C_r_to_the_minus_c(name, alignment):
    """Adam, step 1: |delta w| = eta * C_l * (n/n_base)^(-c_l) for every entry."""
    eta = 1e-3
    C = {"embedding": 0.5, "hidden": 2.0, "readout": 3.0}
    cfg = _cfg(
        _width_overrides(WIDTH)
        + [
            "optimizer.name=adam",
            f"optimizer.lr={eta}",
            "optimizer.eps=1e-30",
            f"param.name={name}",
            f"param.alignment={alignment}",
            f"param.base_width={BASE}",
        ]
        + [f"param.lr_scale_{role}={c}" for role, c in C.items()]
    )
    exp = build_experiment(cfg, jax.devices()[:1])
    step = jax.jit(make_train_step(exp.model, exp.optimizer.tx, exp.optimizer.schedule))
    state = init_state(exp.model, exp.optimizer.tx, seed=0)
    before = jax.tree.map(np.asarray, state.params)
    new, _ = step(state, _batch())
    r = WIDTH / BASE
    c = dict(zip(ROLES, ADAM_C[(alignment, name)]))
    roles = _paths(
        P.Parameterization(width=WIDTH, base_width=BASE).roles(before, exp.model.logical_axes)
    )
    for path, delta in _paths(
        jax.tree.map(lambda a, b: np.asarray(a) - b, new.params, before)
    ).items():
        role = roles[path]
        want = eta * C[role] * r ** (-c[role])
        moved = np.abs(delta)[np.abs(delta) > 0]
        # Embedding rows of tokens absent from the batch get no gradient.
        assert moved.size, path
        np.testing.assert_allclose(moved, want, rtol=2e-3, err_msg=f"{path} ({role})")


def _effective_std(name, width, base):
    """Std of multiplier * w per parameter (a model at `width` with n_base = `base`)."""
    cfg = TransformerConfig(
        d_model=width, n_layers=1, n_heads=width // 8, d_ff=4 * width, vocab_size=512
    )
    param = P.Parameterization(name=name, width=width, base_width=base)
    model = PureModel(cfg, param)
    params = _paths(model.init(0))
    mults = _paths(param.multipliers(model.abstract_params, model.logical_axes))
    return {k: float(np.std(v)) * mults[k] for k, v in params.items() if v.ndim >= 2}


@pytest.mark.parametrize(
    "name, slopes",
    [
        # slope of log(effective std) vs log(width), base width fixed (docs/scaling.md, a and b):
        # embedding stays O(1) everywhere; hidden 1/sqrt(n); readout 1/sqrt(n) (SP, NTK)
        # or 1/n (muP, MFP).
        ("standard", {"embedding": 0.0, "hidden": -0.5, "readout": -0.5}),
        ("ntk", {"embedding": 0.0, "hidden": -0.5, "readout": -0.5}),
        ("mup", {"embedding": 0.0, "hidden": -0.5, "readout": -1.0}),
        ("mfp", {"embedding": 0.0, "hidden": -0.5, "readout": -1.0}),
    ],
)
def test_effective_init_scales_with_width_as_the_table_says(name, slopes):
    small, large = _effective_std(name, 32, 32), _effective_std(name, 128, 32)
    role = {"embed": "embedding", "readout": "readout"}
    for path in small:
        got = math.log(large[path] / small[path]) / math.log(4)
        want = slopes[role.get(path, "hidden")]
        assert abs(got - want) < 0.06, (name, path, got, want)


@pytest.mark.parametrize("name", P.NAMES)
def test_at_the_base_width_every_parameterization_is_the_standard_model(name):
    cfg = TransformerConfig(d_model=32, n_layers=1, n_heads=4, d_ff=64)
    std = PureModel(cfg)
    other = PureModel(cfg, P.Parameterization(name=name, width=32, base_width=32))
    tokens = _batch()["inputs"]
    a, b = std.init(0), other.init(0)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_array_equal(std.apply(a, tokens), other.apply(b, tokens))


def _train_losses(model_cfg, param, opt_cfg, steps=5):
    from lm_align import optim

    model = PureModel(model_cfg, param)
    axes, abstract = model.logical_axes, model.abstract_params
    opt = optim.make_optimizer(
        opt_cfg, total_steps=steps, lr_scales=param.lr_scales(abstract, axes)
    )
    step = jax.jit(make_train_step(model, opt.tx, opt.schedule))
    state = init_state(model, opt.tx, seed=0)
    losses = []
    for i in range(steps):
        state, m = step(state, _batch(seed=i))
        losses.append(float(m["loss"]))
    return np.array(losses)


@pytest.mark.parametrize("optimizer", ["sgd", "adam_atan2"])
def test_abc_symmetry_of_the_whole_train_step(optimizer):
    """a+t, b-t and the matching c shift leave training of the Transformer unchanged."""
    model_cfg = TransformerConfig(d_model=64, n_layers=2, n_heads=8, d_ff=128)
    opt = {
        "name": optimizer,
        "lr": 0.5 if optimizer == "sgd" else 1e-2,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "clip_norm": 0.0,
        "schedule": "constant",
    }
    p = P.Parameterization(name="mup", optimizer=optimizer, width=64, base_width=16)
    q = p.shifted({"embedding": 0.25, "hidden": -0.5, "readout": 0.5})
    base, shifted = _train_losses(model_cfg, p, opt), _train_losses(model_cfg, q, opt)
    assert base[-1] < base[0] - 0.05  # it trains
    np.testing.assert_allclose(shifted, base, rtol=1e-4)
    # Without the c shift the runs differ: the test can fail.
    wrong = P.Parameterization(
        name="x",
        optimizer=optimizer,
        width=64,
        base_width=16,
        exponents=P.RoleValues(
            *(P.Exponents(e.a, e.b, e_p.c, e.g) for e, e_p in zip(q.exponents, p.exponents))
        ),
    )
    wrong_losses = _train_losses(model_cfg, wrong, opt)
    assert np.max(np.abs(wrong_losses - base) / base) > 1e-3, (wrong_losses, base)


def test_param_config_errors_are_reported_before_compiling():
    from lm_align.config import ConfigError

    cfg = _cfg(["param.name=mupp", "param.base_width=0"])
    with pytest.raises(ConfigError, match="param.name='mupp'"):
        build_experiment(cfg, jax.devices()[:1])
    cfg = _cfg(["param.per_layer_eps=true", "optimizer.name=adam_atan2"])
    with pytest.raises(ConfigError, match="per_layer_eps"):
        build_experiment(cfg, jax.devices()[:1])
    cfg = _cfg(["param.name=mup", "param.base_width=32", "model.tie_embeddings=true"])
    with pytest.raises(ConfigError, match="tied embeddings"):
        build_experiment(cfg, jax.devices()[:1])


def test_per_layer_eps_reaches_the_optimizer():
    """With eps >> |g|, Adam's step 1 is lr * |g| / eps_l: a per-role epsilon shows up."""
    cfg = _cfg(
        _width_overrides(WIDTH)
        + [
            "optimizer.name=adam",
            "optimizer.lr=1e4",  # large steps, so float32 params resolve them
            "optimizer.eps=1e3",
            "param.name=mup",
            f"param.base_width={BASE}",
            "param.per_layer_eps=true",
            "param.lr_scale_hidden=1.0",
        ]
    )
    exp = build_experiment(cfg, jax.devices()[:1])
    step = jax.jit(make_train_step(exp.model, exp.optimizer.tx, exp.optimizer.schedule))
    state = init_state(exp.model, exp.optimizer.tx, seed=0)
    before = jax.tree.map(np.asarray, state.params)
    grads = jax.grad(lambda p: _loss(exp.model, p, _batch()))(state.params)
    new, _ = step(state, _batch())
    qkv = "blocks/0/attn/qkv"
    delta = _paths(jax.tree.map(lambda a, b: np.asarray(a) - b, new.params, before))[qkv]
    g = np.asarray(_paths(grads)[qkv])
    # Adam step 1: m_hat = g, sqrt(v_hat) = |g|: update = lr_l * g / (|g| + eps_l) ~ lr_l * g / eps_l.
    # muP with Adam, hidden role, r = 64/16 = 4: LR exponent c = 1 and epsilon exponent
    # g = 1 (docs/scaling.md), so lr_l = 4^-1 and eps_l = 1e3 * 4^-1.
    lr_l, eps_l = 0.25, 250.0
    np.testing.assert_allclose(-delta, 1e4 * lr_l * g / (np.abs(g) + eps_l), rtol=1e-3, atol=1e-7)


def _loss(model, params, batch):
    from lm_align.losses.lm import lm_loss

    logits = model.apply(params, batch["inputs"])
    return lm_loss(
        logits, batch["targets"], batch["loss_mask"]
    ).loss  # as make_train_step: no z-loss
