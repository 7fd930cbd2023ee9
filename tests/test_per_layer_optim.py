"""Tests for lm_align.optim.per_layer: per-parameter LR scales and Adam epsilons.

Plain dicts of arrays, no lm_align model: this is how any JAX code uses them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lm_align.optim as lo


def _params():
    return {"embed": jnp.zeros((10, 4)), "hidden": jnp.zeros((4, 4)), "readout": jnp.zeros((4, 3))}


def _grads(seed, steps, like):
    rng = np.random.default_rng(seed)

    def draw(p):
        return jnp.asarray(rng.standard_normal(p.shape) * rng.lognormal(0, 1, p.shape), jnp.float32)

    return [jax.tree.map(draw, like) for _ in range(steps)]


def _run(tx, grads_seq, params):
    state = tx.init(params)
    outs = []
    for g in grads_seq:
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        outs.append(jax.tree.map(np.asarray, u))
    return outs, params


def test_module_docstring_example():
    params = _params()
    lr_scales = {"embed": 1.0, "hidden": 0.25, "readout": 0.5}
    eps = {"embed": 1e-8, "hidden": 1e-8 / 16, "readout": 1e-8 / 4}
    tx = lo.per_layer_lr(
        optax.chain(lo.scale_by_adam_per_param_eps(eps=eps), optax.scale(-1e-3)), lr_scales
    )
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    for k, s in lr_scales.items():  # rtol: optax forms 1 - b2**t in float32
        np.testing.assert_allclose(updates[k], -1e-3 * s, rtol=1e-5)


@pytest.mark.parametrize(
    "make_base",
    [
        lambda: lo.adamw(1e-2, weight_decay=1e-3, independent_weight_decay=True),
        lambda: lo.adam_atan2(1e-2, weight_decay=0.1),
        lambda: optax.sgd(1e-2, momentum=0.9),
    ],
)
@pytest.mark.parametrize("ones", [1.0, None])
def test_per_layer_lr_with_unit_scales_equals_base_exactly(make_base, ones):
    params = jax.tree.map(lambda p: p + 0.5, _params())
    grads = _grads(0, 4, params)
    ref, ref_params = _run(make_base(), grads, params)
    scales = jax.tree.map(lambda _: ones, params)
    got, got_params = _run(lo.per_layer_lr(make_base(), scales), grads, params)
    for r, g in zip(ref, got):
        for k in r:
            np.testing.assert_array_equal(g[k], r[k])
    for k in ref_params:
        np.testing.assert_array_equal(got_params[k], ref_params[k])


def test_per_layer_lr_scales_each_update():
    params = _params()
    scales = {"embed": 2.0, "hidden": 0.125, "readout": None}
    grads = _grads(1, 3, params)
    ref, _ = _run(optax.adam(1e-3), grads, params)
    got, _ = _run(lo.per_layer_lr(optax.adam(1e-3), scales), grads, params)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g["embed"], 2.0 * r["embed"], rtol=1e-7)
        np.testing.assert_allclose(g["hidden"], 0.125 * r["hidden"], rtol=1e-7)
        np.testing.assert_array_equal(g["readout"], r["readout"])


def test_labels_give_what_multi_transform_gives():
    """Labels -> scales tree; the same as one optax.sgd per label via multi_transform."""
    params = _params()
    labels = {"embed": "embedding", "hidden": "hidden", "readout": "readout"}
    lr_by_label = {"embedding": 1.0, "hidden": 0.25, "readout": 0.5}
    scales = jax.tree.map(lambda label: lr_by_label[label], labels)
    grads = _grads(2, 3, params)
    got, _ = _run(lo.per_layer_lr(optax.sgd(0.1, momentum=0.9), scales), grads, params)
    ref, _ = _run(
        optax.multi_transform(
            {l: optax.sgd(0.1 * s, momentum=0.9) for l, s in lr_by_label.items()}, labels
        ),
        grads,
        params,
    )
    for r, g in zip(ref, got):
        for k in r:
            np.testing.assert_allclose(g[k], r[k], rtol=1e-6)


def test_scale_by_tree_keeps_dtype_and_accepts_arrays_and_jit():
    params = {"w": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.ones(3)}
    tx = lo.scale_by_tree({"w": 0.5, "b": np.array([1.0, 2.0, 3.0])})
    state = tx.init(params)
    u, _ = jax.jit(tx.update)(params, state)
    assert u["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(u["w"], jnp.full((2, 3), 0.5, jnp.bfloat16))
    np.testing.assert_array_equal(u["b"], [1.0, 2.0, 3.0])


def test_scale_by_tree_rejects_a_tree_of_the_wrong_structure():
    with pytest.raises(ValueError, match="structure of the params"):
        lo.scale_by_tree({"w": 1.0}).init({"w": jnp.ones(2), "b": jnp.ones(2)})


def test_independent_decay_is_scaled_too_unless_scaled_before_the_tail():
    """What per_layer_lr means for weight decay (documented in its docstring)."""
    params = {"w": jnp.full((2, 2), 3.0)}
    zero = {"w": jnp.zeros((2, 2))}  # Adam direction 0: only the decay moves params.
    lam, s = 1e-2, 0.25
    wrapped = lo.per_layer_lr(
        lo.adamw(1e-3, weight_decay=lam, independent_weight_decay=True), {"w": s}
    )
    u, _ = wrapped.update(zero, wrapped.init(params), params)
    np.testing.assert_allclose(u["w"], -s * lam * 3.0, rtol=1e-6)
    inner = optax.chain(
        optax.scale_by_adam(),
        lo.scale_by_tree({"w": s}),
        lo.decay_and_scale_by_learning_rate(1e-3, weight_decay=lam, independent_weight_decay=True),
    )
    u, _ = inner.update(zero, inner.init(params), params)
    np.testing.assert_allclose(u["w"], -lam * 3.0, rtol=1e-6)


def test_adam_per_param_eps_with_one_eps_is_optax_adam():
    params = _params()
    grads = _grads(3, 5, params)
    ref, _ = _run(optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-3), grads, params)
    for eps in (1e-3, jax.tree.map(lambda _: 1e-3, params)):
        tx = lo.scale_by_adam_per_param_eps(b1=0.9, b2=0.95, eps=eps)
        assert isinstance(tx.init(params), optax.ScaleByAdamState)
        got, _ = _run(tx, grads, params)
        for r, g in zip(ref, got):
            for k in r:
                np.testing.assert_array_equal(g[k], r[k])


def test_adam_per_param_eps_uses_each_leafs_eps():
    params = _params()
    eps = {"embed": 1e-1, "hidden": 1e-4, "readout": 10.0}
    grads = _grads(4, 4, params)
    got, _ = _run(lo.scale_by_adam_per_param_eps(eps=eps), grads, params)
    for k, e in eps.items():
        ref, _ = _run(optax.scale_by_adam(eps=e), [g[k] for g in grads], params[k])
        for r, g in zip(ref, got):
            np.testing.assert_allclose(g[k], r, rtol=1e-6)


def test_adam_per_param_eps_step_one_closed_form():
    """Step 1: m_hat = g, sqrt(v_hat) = |g|, so u = g / (|g| + eps_l)."""
    g = {"a": jnp.asarray([1e-6, -2e-6, 3.0]), "b": jnp.asarray([1e-6, -1e-6])}
    eps = {"a": 1e-6, "b": 1e-12}
    tx = lo.scale_by_adam_per_param_eps(eps=eps)
    u, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(u["a"], [0.5, -2 / 3, 3 / (3 + 1e-6)], rtol=1e-5)
    np.testing.assert_allclose(u["b"], [1.0, -1.0], rtol=1e-5)
