"""Tests for lm_align.parameterization: the abc table, roles, closed forms, symmetry.

The expected numbers below are copied by hand from docs/scaling.md (exponent
tables; Everett et al. 2024, arXiv:2407.05872), not imported from the module,
so a typo in either place fails a test.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lm_align.optim as lo
from lm_align import parameterization as P
from lm_align.models import TransformerConfig
from lm_align.models.pure import PureModel

ROLES = ("embedding", "hidden", "readout")
NAMES = ("standard", "ntk", "mup", "mfp")

# docs/scaling.md (exponent tables; Everett et al. 2024, arXiv:2407.05872):
# (a, b) per parameterization, roles (embedding, hidden, readout).
SPEC_AB = {
    "standard": ((0, 0), (0, 0.5), (0, 0.5)),
    "ntk": ((0, 0), (0.5, 0), (0.5, 0)),
    "mup": ((-0.5, 0.5), (0, 0.5), (0.5, 0.5)),
    "mfp": ((0, 0), (0.5, 0), (1, 0)),
}
# docs/scaling.md: LR exponents c per (optimizer, alignment), columns SP, NTK, muP, MFP.
SPEC_C = {
    ("sgd", "full"): ((-0.5, 0.5, 1), (-0.5, -0.5, 0), (0, 0, 0), (-1, -1, -1)),
    ("adam", "full"): ((0, 1, 1), (0, 0.5, 0.5), (0.5, 1, 0.5), (0, 0.5, 0)),
    ("adam", "none"): ((0, 0.5, 0.5), (0, 0, 0), (0.5, 0.5, 0), (0, 0, -0.5)),
    ("adafactor", "full"): ((0, 0.5, 0.5), (0, 0.5, 0.5), (0, 0.5, 0), (0, 0.5, 0)),
    # Adafactor's update is normalised, so the constraints give c >= 0 for the embedding
    # and the readout (Everett et al. 2024, Table 1): no alignment -> readout 0 for muP/MFP.
    ("adafactor", "none"): ((0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)),
}
# docs/scaling.md: epsilon exponents g.
SPEC_G = {
    "standard": (0.5, 0.5, 0),
    "ntk": (0.5, 1, 0.5),
    "mup": (0.5, 1, 0.5),
    "mfp": (1, 1.5, 1),
}


def spec_c(optimizer, alignment, name):
    return dict(zip(ROLES, SPEC_C[(optimizer, alignment)][NAMES.index(name)]))


# ----------------------------------------------------------------------------
# The table, cell by cell
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer,alignment", sorted(SPEC_C))
@pytest.mark.parametrize("name", NAMES)
def test_table_matches_the_spec_cell_by_cell(name, optimizer, alignment):
    exps = P.table_exponents(name, optimizer, alignment)
    for i, role in enumerate(ROLES):
        e = exps.of(role)
        assert (e.a, e.b) == SPEC_AB[name][i], (name, role)
        assert e.c == spec_c(optimizer, alignment, name)[role], (name, optimizer, alignment, role)
        assert e.g == SPEC_G[name][i], (name, role)


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "adam_atan2"])
def test_adam_variants_use_the_adam_row(optimizer):
    assert P.Parameterization(name="mup", optimizer=optimizer).exponents == P.table_exponents(
        "mup", "adam", "full"
    )


@pytest.mark.parametrize("name", NAMES)
def test_global_lr_uses_the_hidden_exponent_everywhere(name):
    p = P.Parameterization(name=name, optimizer="adam", alignment="none", global_lr=True)
    assert [p.exponents.of(r).c for r in ROLES] == [spec_c("adam", "none", name)["hidden"]] * 3


def test_sgd_without_alignment_is_unsupported():
    with pytest.raises(ValueError, match="not supported"):
        P.Parameterization(name="mup", optimizer="sgd", alignment="none")
    with pytest.raises(ValueError, match="not supported"):
        P.Parameterization.from_config({"alignment": "none"}, optimizer="sgd", width=64)


def test_flagged_cells_are_the_documented_ones_and_exist():
    # settled from the paper's constraints (tests/test_abc_constraints.py derives them)
    assert ("AB", "mfp", "embedding") not in P.CHECK
    assert ("C", ("adafactor", "none", "mup"), "readout") not in P.CHECK  # settled: 0
    assert set(P.CHECK_TABLES) == {"G"}
    tables = {"AB": P.AB, "C": P.C, "G": P.G}
    for table, row, role in P.CHECK:
        assert role in tables[table][row]
    assert P.is_flagged("G", "standard", "hidden") and not P.is_flagged("AB", "mup", "readout")
    assert not P.is_flagged("C", ("sgd", "full", "standard"), "embedding")


@pytest.mark.parametrize("optimizer,alignment", sorted(SPEC_C))
@pytest.mark.parametrize("source,target", [("standard", "ntk"), ("mup", "mfp")])
def test_ntk_and_mfp_rows_are_the_symmetry_images_of_sp_and_mup(
    source, target, optimizer, alignment
):
    """The table's NTK/MFP rows follow from SP/muP by a -> a+t, b -> b-t, c -> c-k*t, g -> g+t."""
    src = P.Parameterization(name=source, optimizer=optimizer, alignment=alignment)
    t = {r: SPEC_AB[target][i][0] - SPEC_AB[source][i][0] for i, r in enumerate(ROLES)}
    image = src.shifted(t).exponents
    assert (
        image == P.Parameterization(name=target, optimizer=optimizer, alignment=alignment).exponents
    )


# ----------------------------------------------------------------------------
# Roles and fan-in of lm_align's Transformer
# ----------------------------------------------------------------------------

SMALL = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64}


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, (tuple, str))
    )[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in leaves}


def _expected_role(path):
    leaf = path.split("/")[-1]
    if (
        leaf in ("embed", "pos_embed")
        or leaf in ("scale", "bias")
        or leaf.endswith("_bias")
        or leaf.startswith("b_")
    ):
        return "embedding"
    if leaf == "readout":
        return "readout"
    assert leaf in ("qkv", "out", "w_in", "w_out"), path
    return "hidden"


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {
            "scan_layers": True,
            "qk_layernorm": True,
            "use_bias": True,
            "position": "learned",
            "max_len": 16,
            "activation": "swiglu",
        },
    ],
)
def test_roles_of_the_transformer_parameters(extra):
    model = PureModel(TransformerConfig(**SMALL, **extra))
    roles = _flat(P.Parameterization().roles(model.abstract_params, model.logical_axes))
    assert roles["embed"] == "embedding" and roles["readout"] == "readout"
    assert roles["final_norm/scale"] == "embedding"
    for path, role in roles.items():
        assert role == _expected_role(path), path
    assert sum(r == "hidden" for r in roles.values()) == (4 if extra else 8)


def test_fan_in_of_the_transformer_matrices():
    model = PureModel(
        TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, head_dim=4, d_ff=96)
    )
    shapes, axes = _flat(model.abstract_params), _flat(model.logical_axes)
    paths = (
        "blocks/0/attn/qkv",
        "blocks/0/attn/out",
        "blocks/0/mlp/w_in",
        "blocks/0/mlp/w_out",
        "readout",
    )
    got = {p: P.fan_in(p, shapes[p].shape, axes[p]) for p in paths}
    assert got == {
        "blocks/0/attn/qkv": 32,
        "blocks/0/attn/out": 16,
        "blocks/0/mlp/w_in": 32,
        "blocks/0/mlp/w_out": 96,
        "readout": 32,
    }


def test_unannotated_matrix_cannot_be_classified():
    with pytest.raises(ValueError, match="no axis that grows with width"):
        P.role_of("w", (None, None))
    assert P.role_of("embed", ("vocab", None)) == "embedding"  # model dim unsharded
    assert P.role_of("readout", (None, "vocab")) == "readout"


# ----------------------------------------------------------------------------
# Defaults leave training unchanged
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("width_mode", ["relative", "absolute"])
@pytest.mark.parametrize("base_width", [None, 8])
def test_standard_init_is_the_models_own_init(width_mode, base_width):
    """Constants 1: the Transformer's init (embedding 1, matrices 1/sqrt(fan_in), scales 1)."""
    model = PureModel(TransformerConfig(**SMALL))
    p = P.Parameterization.from_config(
        {"base_width": base_width, "width_mode": width_mode}, optimizer="adamw", width=32
    )
    stds = _flat(p.init_stds(model.abstract_params, model.logical_axes))
    params = _flat(model.init(0))
    for path, std in stds.items():
        x = np.asarray(params[path])
        if path.endswith("scale"):
            np.testing.assert_array_equal(x, std)  # norm scales start at std * 1
        else:
            expected = {
                "embed": 1.0,
                "qkv": 32**-0.5,
                "out": 32**-0.5,
                "w_in": 32**-0.5,
                "w_out": 64**-0.5,
                "readout": 32**-0.5,
            }[path.split("/")[-1]]
            assert std == pytest.approx(expected, rel=1e-12), path
            # The model really inits so: jax's truncated normal (matrices) keeps the
            # std of the untruncated one, times 0.8796 after truncation at 2 sigma.
            spread = 1.0 if path == "embed" else 0.87962566
            assert np.std(x) == pytest.approx(std * spread, rel=0.1), path


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("optimizer", ["adamw", "adam_atan2", "adafactor", "sgd"])
def test_default_config_gives_all_ones_at_any_width(name, optimizer):
    """base_width None (n_base = n): every multiplier, LR and eps scale is 1, init as SP."""
    model = PureModel(TransformerConfig(**SMALL))
    params, axes = model.abstract_params, model.logical_axes
    p = P.Parameterization.from_config({"name": name}, optimizer=optimizer, width=32)
    sp = P.Parameterization.from_config({}, optimizer=optimizer, width=32)
    for tree in (
        p.multipliers(params, axes),
        p.lr_scales(params, axes),
        p.eps_scales(params, axes),
    ):
        assert set(jax.tree.leaves(tree)) == {1.0}
    assert p.init_stds(params, axes) == sp.init_stds(params, axes)
    assert p.adam_eps(1e-8, params, axes) == 1e-8


@pytest.mark.parametrize("optimizer,c_hidden", [("adamw", 1.0), ("sgd", 0.5), ("adafactor", 0.5)])
def test_standard_global_lr_is_one_lr_for_all_layers(optimizer, c_hidden):
    model = PureModel(TransformerConfig(**SMALL))
    params, axes = model.abstract_params, model.logical_axes
    at_base = P.Parameterization.from_config(
        {"global_lr": True, "base_width": 32}, optimizer=optimizer, width=32
    )
    assert set(jax.tree.leaves(at_base.lr_scales(params, axes))) == {1.0}
    assert set(jax.tree.leaves(at_base.multipliers(params, axes))) == {1.0}
    wider = P.Parameterization.from_config(
        {"global_lr": True, "base_width": 8}, optimizer=optimizer, width=32
    )
    assert set(jax.tree.leaves(wider.lr_scales(params, axes))) == {4.0**-c_hidden}


@pytest.mark.parametrize("name", NAMES)
def test_relative_mode_base_model_is_the_same_for_every_name(name):
    """At n = n_base every parameterization is SP with the constants (muTransfer's base model)."""
    consts = {"init_scale_hidden": 0.5, "multiplier_readout": 3.0, "lr_scale_embedding": 10.0}
    p = P.Parameterization.from_config(
        {"name": name, "base_width": 64, **consts}, optimizer="adamw", width=64
    )
    sp = P.Parameterization.from_config({"base_width": 64, **consts}, optimizer="adamw", width=64)
    for role in ROLES:
        assert (p.init_std(role, 64), p.multiplier(role, 64), p.lr_scale(role)) == (
            sp.init_std(role, 64),
            sp.multiplier(role, 64),
            sp.lr_scale(role),
        )


# ----------------------------------------------------------------------------
# Config, reporting, tied embeddings
# ----------------------------------------------------------------------------


def test_config_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="standard, ntk, mup, mfp"):
        P.Parameterization.from_config({"name": "mu-p"}, optimizer="adamw", width=64)
    with pytest.raises(ValueError, match="valid keys"):
        P.Parameterization.from_config({"nmae": "mup"}, optimizer="adamw", width=64)
    with pytest.raises(ValueError, match="full, none"):
        P.Parameterization.from_config({"alignment": "partial"}, optimizer="adamw", width=64)
    with pytest.raises(ValueError, match="relative, absolute"):
        P.Parameterization.from_config({"width_mode": "log"}, optimizer="adamw", width=64)
    with pytest.raises(ValueError, match="no LR-exponent row"):
        P.Parameterization.from_config({}, optimizer="lion", width=64)
    with pytest.raises(ValueError, match="positive"):
        P.Parameterization.from_config({"base_width": 0}, optimizer="adamw", width=64)


def test_describe_prints_one_row_per_role():
    p = P.Parameterization.from_config(
        {"name": "mup", "base_width": 128}, optimizer="adamw", width=512
    )
    text = p.describe()
    assert "r=4" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:]}
    assert rows["embedding"][:4] == ["-1/2", "1/2", "1/2", "1/2"]
    assert rows["hidden"][:4] == ["0", "1/2", "1", "1"]
    assert [r["lr_scale"] for r in p.table_rows()] == [0.5, 0.25, 0.5]
    assert [r["multiplier"] for r in p.table_rows()] == [2.0, 1.0, 0.5]


def test_tied_embeddings_only_when_multipliers_agree():
    P.Parameterization(name="standard").check_tied_embeddings()
    for name in ("ntk", "mup", "mfp"):
        with pytest.raises(ValueError, match="tie_embeddings"):
            P.Parameterization(name=name).check_tied_embeddings()


# ----------------------------------------------------------------------------
# Step-1 closed form: |update_l| = eta * C_l * (n/n_base)^(-c_l)
# ----------------------------------------------------------------------------


def _adam_txs(eta):
    return {
        "optax.adam": optax.adam(eta, eps=1e-30),
        "adam_atan2": lo.adam_atan2(eta),
        "make_optimizer(adamw)": lo.make_optimizer(
            {
                "name": "adamw",
                "lr": eta,
                "eps": 1e-30,
                "weight_decay": 0.0,
                "clip_norm": 0.0,
                "schedule": "constant",
            },
            total_steps=10,
        ).tx,
    }


@pytest.mark.parametrize("alignment", ["full", "none"])
@pytest.mark.parametrize("name", NAMES)
def test_step_one_update_is_the_closed_form(name, alignment):
    eta, n, n_base, C = 1e-2, 32, 8, (2.0, 0.5, 3.0)
    model = PureModel(TransformerConfig(**SMALL))
    params, axes = model.abstract_params, model.logical_axes
    p = P.Parameterization.from_config(
        {
            "name": name,
            "alignment": alignment,
            "base_width": n_base,
            **{f"lr_scale_{r}": c for r, c in zip(ROLES, C)},
        },
        optimizer="adamw",
        width=n,
    )
    roles = _flat(p.roles(params, axes))
    c = spec_c("adam", alignment, name)
    expected = {
        path: eta * C[ROLES.index(r)] * (n / n_base) ** (-c[r]) for path, r in roles.items()
    }
    rng = np.random.default_rng(0)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    grads = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape) + 0.01, jnp.float32), params
    )
    for label, base in _adam_txs(eta).items():
        tx = lo.per_layer_lr(base, p.lr_scales(params, axes))
        updates, _ = tx.update(grads, tx.init(zeros), zeros)
        for path, u in _flat(updates).items():
            np.testing.assert_allclose(
                np.abs(u), expected[path], rtol=2e-5, err_msg=f"{label} {path}"
            )


# ----------------------------------------------------------------------------
# abc symmetry on a small MLP: a+t, b-t (and c shifted) trains identically
# ----------------------------------------------------------------------------

D_IN, WIDTH, BASE, D_OUT, BATCH, STEPS = 8, 48, 16, 4, 16, 5  # r = 3: no exact powers of two
MLP_AXES = {
    "embed": ("vocab", "embed"),
    "bias": ("embed",),
    "hidden": ("embed", "mlp"),
    "readout": ("mlp", "vocab"),
}
MLP_SHAPES = {
    k: jax.ShapeDtypeStruct(s, jnp.float32)
    for k, s in {
        "embed": (D_IN, WIDTH),
        "bias": (WIDTH,),
        "hidden": (WIDTH, WIDTH),
        "readout": (WIDTH, D_OUT),
    }.items()
}


def _mlp_data():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((BATCH, D_IN)) / math.sqrt(D_IN)
    return jnp.asarray(x, jnp.float32), jnp.asarray(
        rng.standard_normal((BATCH, D_OUT)), jnp.float32
    )


@jax.jit
def _mlp_out(w, mult, x):
    """An embedding-like input layer, one hidden layer and a readout; W = multiplier * w."""
    h = jnp.tanh(x @ (mult["embed"] * w["embed"]) + mult["bias"] * w["bias"])
    h = jnp.tanh(h @ (mult["hidden"] * w["hidden"]))
    return h @ (mult["readout"] * w["readout"])


@jax.jit
def _mlp_loss_and_grad(w, mult, x, y):
    return jax.value_and_grad(lambda w: jnp.mean((_mlp_out(w, mult, x) - y) ** 2))(w)


def _train_mlp(p, make_base):
    """Losses per step and final outputs of the MLP under parameterization p."""
    rng = np.random.default_rng(0)  # the same standard normals z for every p: w = std * z
    stds, mult = p.init_stds(MLP_SHAPES, MLP_AXES), p.multipliers(MLP_SHAPES, MLP_AXES)
    w = {
        k: jnp.asarray(stds[k] * rng.standard_normal(s.shape), jnp.float32)
        for k, s in MLP_SHAPES.items()
    }
    mult = jax.tree.map(jnp.float32, mult)
    tx = lo.per_layer_lr(make_base(p), p.lr_scales(MLP_SHAPES, MLP_AXES))
    state, (x, y), losses = tx.init(w), _mlp_data(), []
    for _ in range(STEPS):
        loss, g = _mlp_loss_and_grad(w, mult, x, y)
        u, state = tx.update(g, state, w)
        w = optax.apply_updates(w, u)
        losses.append(float(loss))
    return np.array(losses), np.asarray(_mlp_out(w, mult, x))


BASES = {
    "sgd": ("sgd", lambda p: optax.sgd(0.05)),
    "adam_atan2": ("adam_atan2", lambda p: lo.adam_atan2(1e-2)),
    # Adam with eps large enough to matter: per-layer eps keeps the symmetry exact.
    "adam_per_layer_eps": (
        "adam",
        lambda p: optax.chain(
            lo.scale_by_adam_per_param_eps(
                eps=jax.tree.map(lambda s: 1e-2 * s, p.eps_scales(MLP_SHAPES, MLP_AXES))
            ),
            optax.scale(-1e-2),
        ),
    ),
}


def _assert_same_training(p, q, make_base):
    loss_p, out_p = _train_mlp(p, make_base)
    loss_q, out_q = _train_mlp(q, make_base)
    assert loss_p[-1] < loss_p[0]  # it trains
    np.testing.assert_allclose(loss_q, loss_p, rtol=1e-4)
    np.testing.assert_allclose(out_q, out_p, rtol=1e-4, atol=1e-6)
    return loss_p, out_p


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("source,target", [("standard", "ntk"), ("mup", "mfp")])
def test_abc_symmetry_between_table_rows(base, source, target):
    optimizer, make_base = BASES[base]
    p = P.Parameterization(name=source, optimizer=optimizer, width=WIDTH, base_width=BASE)
    q = P.Parameterization(name=target, optimizer=optimizer, width=WIDTH, base_width=BASE)
    _assert_same_training(p, q, make_base)


@pytest.mark.parametrize("base", sorted(BASES))
def test_abc_symmetry_for_an_arbitrary_shift(base):
    optimizer, make_base = BASES[base]
    p = P.Parameterization.from_config(
        {
            "name": "mup",
            "base_width": BASE,
            "init_scale_hidden": 1.5,
            "multiplier_readout": 2.0,
            "lr_scale_embedding": 0.5,
        },
        optimizer=optimizer,
        width=WIDTH,
    )
    _assert_same_training(
        p, p.shifted({"embedding": 0.3, "hidden": -0.25, "readout": 0.75}), make_base
    )


@pytest.mark.parametrize("base", sorted(BASES))
def test_symmetry_needs_the_c_shift(base):
    """Teeth: shifting a and b without c (or with one global eps) changes training."""
    optimizer, make_base = BASES[base]
    p = P.Parameterization(name="standard", optimizer=optimizer, width=WIDTH, base_width=BASE)
    t = {"embedding": 0.0, "hidden": 0.5, "readout": 0.5}
    shifted = p.shifted(t)
    wrong_c = P.Parameterization(
        name="no-c-shift",
        optimizer=optimizer,
        width=WIDTH,
        base_width=BASE,
        exponents=P.RoleValues(
            *(e._replace(c=p.exponents.of(r).c) for r, e in zip(ROLES, shifted.exponents))
        ),
    )
    _, out = _train_mlp(p, make_base)
    _, out_wrong = _train_mlp(wrong_c, make_base)
    assert np.max(np.abs(out_wrong - out)) > 1e-2 * np.max(np.abs(out))
    if base == "adam_per_layer_eps":
        global_eps = lambda q: optax.chain(optax.scale_by_adam(eps=1e-2), optax.scale(-1e-2))
        _, out_p = _train_mlp(p, global_eps)
        _, out_q = _train_mlp(shifted, global_eps)
        assert np.max(np.abs(out_q - out_p)) > 1e-3 * np.max(np.abs(out_p))


@pytest.mark.parametrize("base", ["sgd", "adam_atan2"])
def test_absolute_width_mode_needs_rescaled_lr_constants_for_the_symmetry(base):
    """Why relative is the default: with n^(-a), n^(-b) but (n/n_base)^(-c), the shifted
    model matches only after C_l *= n_base^(k t_l) (k = 2 SGD, 1 Adam; fan_in = n here)."""
    optimizer, make_base = BASES[base]
    t = P.RoleValues(0.0, 0.5, 0.5)
    p = P.Parameterization(
        name="standard", optimizer=optimizer, width=WIDTH, base_width=BASE, width_mode="absolute"
    )
    k = 2.0 if optimizer == "sgd" else 1.0
    rescaled = dataclasses.replace(p.shifted(t), C=P.RoleValues(*(BASE ** (k * s) for s in t)))
    _assert_same_training(p, rescaled, make_base)
    _, out = _train_mlp(p, make_base)
    _, out_same_c = _train_mlp(p.shifted(t), make_base)
    assert np.max(np.abs(out_same_c - out)) > 1e-2 * np.max(np.abs(out))
