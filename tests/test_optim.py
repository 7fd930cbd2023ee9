"""Tests for lm_align.optim: closed forms and properties, not echoes of the code.

Each test doubles as an example of how to call the API.
"""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import lm_align.optim as lo

A_DEFAULT = 4 / math.pi


def _random_grads(seed, steps, shapes=((8, 16), (5,))):
    """Heavy-tailed random gradients: a list of {"w": ..., "b": ...} per step."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        g = {}
        for name, shape in zip(("w", "b"), shapes):
            x = rng.standard_normal(shape) * rng.lognormal(0.0, 2.0, shape)
            g[name] = jnp.asarray(x, jnp.float32)
        out.append(g)
    return out


def _run(tx, grads_seq, params=None, scale=1.0):
    """Apply tx to a gradient sequence; return the stacked updates per leaf."""
    params = jax.tree.map(jnp.zeros_like, grads_seq[0]) if params is None else params
    state = tx.init(params)
    outs = []
    for g in grads_seq:
        u, state = tx.update(jax.tree.map(lambda x: x * scale, g), state, params)
        outs.append(jax.tree.map(np.asarray, u))
    return jax.tree.map(lambda *xs: np.stack(xs), *outs)


# ----------------------------------------------------------------------------
# Adam-atan2
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("c", [1e-8, 1e-4, 1.0, 1e4, 1e8])
def test_adam_atan2_invariant_to_gradient_scale(c):
    grads = _random_grads(0, steps=8)
    ref = _run(lo.scale_by_adam_atan2(), grads)
    got = _run(lo.scale_by_adam_atan2(), grads, scale=c)
    # Float32 rounding of c*g only: a couple of ulps of an O(1) update.
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("c", [2.0**-30, 2.0**30])
def test_adam_atan2_exactly_invariant_to_power_of_two_scale(c):
    grads = _random_grads(1, steps=5)
    ref = _run(lo.scale_by_adam_atan2(), grads)
    got = _run(lo.scale_by_adam_atan2(), grads, scale=c)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])


def test_adam_with_epsilon_is_not_scale_invariant():
    """The invariance check above has teeth: Adam (eps=1e-8) fails it."""
    grads = _random_grads(0, steps=3)
    ref = _run(optax.scale_by_adam(), grads)
    got = _run(optax.scale_by_adam(), grads, scale=1e-8)
    assert np.max(np.abs(got["w"] - ref["w"])) > 0.3


@pytest.mark.parametrize("a,b", [(A_DEFAULT, 1.0), (1.0, 2.0), (2.0, 0.5)])
def test_adam_atan2_first_step_is_scaled_sign(a, b):
    g = jnp.asarray([1e-12, -1e-6, 3.0, -4e5, 1e15, 0.0], jnp.float32)
    u, _ = lo.scale_by_adam_atan2(a=a, b=b).update(g, lo.scale_by_adam_atan2(a=a, b=b).init(g))
    expected = a * math.atan(1.0 / b) * np.sign(np.asarray(g))
    np.testing.assert_allclose(u, expected, rtol=1e-6, atol=0)
    if a == A_DEFAULT and b == 1.0:  # defaults: first step is exactly sign(g)
        np.testing.assert_allclose(u, np.sign(np.asarray(g)), rtol=1e-6)


@pytest.mark.parametrize("b", [1.0, 0.01])
def test_adam_atan2_update_is_bounded(b):
    a = A_DEFAULT
    grads = _random_grads(2, steps=40)
    u = _run(lo.scale_by_adam_atan2(b=b), grads)
    biggest = max(np.max(np.abs(x)) for x in u.values())
    assert biggest <= a * math.pi / 2 * (1 + 1e-6)
    if b == 0.01:  # small b pushes updates toward the bound: the check is tight
        assert biggest > 0.95 * a * math.pi / 2


def test_adam_atan2_reduces_to_adam_when_b_is_large():
    """|m_hat| << b sqrt(v_hat): atan2(x, y) -> x/y, i.e. Adam(eps=0) * a/b."""
    a, b = A_DEFAULT, 1000.0
    grads = _random_grads(3, steps=20)
    got = _run(lo.scale_by_adam_atan2(a=a, b=b), grads)
    adam = _run(optax.scale_by_adam(eps=0.0), grads)
    for k in got:
        np.testing.assert_allclose(got[k], a / b * adam[k], rtol=1e-3, atol=1e-12)


def test_adam_atan2_reduces_to_adam_for_alternating_gradients():
    """Alternating-sign gradients give |m_hat| ~ 0.005 sqrt(v_hat) with b1=0.99."""
    b1, b2 = 0.99, 0.999
    g0 = jnp.asarray(np.random.default_rng(4).uniform(0.5, 2.0, (6,)), jnp.float32)
    grads = [g0 * (-1.0) ** t for t in range(300)]
    got = _run(lo.scale_by_adam_atan2(b1=b1, b2=b2), grads)[-50:]
    adam = _run(optax.scale_by_adam(b1=b1, b2=b2, eps=0.0), grads)[-50:]
    assert np.max(np.abs(adam)) < 0.02  # we are in the small-ratio regime
    np.testing.assert_allclose(got, A_DEFAULT * adam, rtol=1e-3)


def test_adam_atan2_under_jit_and_chain():
    grads = _random_grads(5, steps=4)
    params = jax.tree.map(jnp.ones_like, grads[0])
    tx = optax.chain(optax.clip_by_global_norm(1.0), lo.scale_by_adam_atan2(), optax.scale(-0.1))
    eager = _run(tx, grads, params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t, g in enumerate(grads):
        u, state = update(g, state, params)
        for k in u:
            np.testing.assert_allclose(u[k], eager[k][t], rtol=1e-6, atol=1e-7)
    assert isinstance(state[1], lo.ScaleByAdamAtan2State)
    assert int(state[1].count) == len(grads)


def test_adam_atan2_alias_first_step_and_mu_dtype():
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones((3,))}
    grads = {"w": jnp.full((3, 3), -1e-9), "b": jnp.full((3,), 2.0)}
    tx = lo.adam_atan2(0.1)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(u["w"], 0.1, rtol=1e-6)  # -lr * sign(g)
    np.testing.assert_allclose(u["b"], -0.1, rtol=1e-6)
    state = lo.scale_by_adam_atan2(mu_dtype=jnp.bfloat16).init(params)
    assert state.mu["w"].dtype == jnp.bfloat16 and state.nu["w"].dtype == jnp.float32


# ----------------------------------------------------------------------------
# Weight decay
# ----------------------------------------------------------------------------

WD_STEPS, WD_WARMUP, WD_LAMBDA = 100, 10, 0.01


def _cosine_factor_closed_form(t):
    """s_t for warmup 10 then cosine to 0 at step 100 (float64, by hand)."""
    if t < WD_WARMUP:
        return t / WD_WARMUP
    return 0.5 * (1 + math.cos(math.pi * (t - WD_WARMUP) / (WD_STEPS - WD_WARMUP)))


def _decay_with_zero_grads(tx):
    params = {
        "w": jnp.asarray(np.random.default_rng(6).standard_normal((3, 4)), jnp.float32),
        "b": jnp.ones((4,), jnp.float32),
    }
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    step = jax.jit(tx.update)
    p = params
    for _ in range(WD_STEPS):
        u, state = step(zeros, state, p)
        p = optax.apply_updates(p, u)
    return params, p


@pytest.mark.parametrize(
    "make",
    [
        lambda sched, peak: lo.adamw(
            sched, weight_decay=WD_LAMBDA, independent_weight_decay=True, peak_learning_rate=peak
        ),
        lambda sched, peak: lo.adam_atan2(
            sched, weight_decay=WD_LAMBDA, independent_weight_decay=True, peak_learning_rate=peak
        ),
    ],
    ids=["adamw", "adam_atan2"],
)
def test_independent_decay_is_the_same_for_every_peak_lr(make):
    finals = {}
    for peak in (1e-3, 1e-1):
        sched = lo.warmup_then_decay(peak, WD_STEPS, warmup_steps=WD_WARMUP)
        p0, finals[peak] = _decay_with_zero_grads(make(sched, peak))
    factor = np.prod([1 - WD_LAMBDA * _cosine_factor_closed_form(t) for t in range(WD_STEPS)])
    assert factor < 0.7  # the decay is visible
    for peak, p in finals.items():
        np.testing.assert_allclose(p["w"], factor * p0["w"], rtol=1e-5)
        np.testing.assert_array_equal(p["b"], p0["b"])  # 1-D arrays never decay
    np.testing.assert_allclose(finals[1e-3]["w"], finals[1e-1]["w"], rtol=1e-5)


def test_coupled_decay_depends_on_peak_lr():
    finals = {}
    for peak in (1e-3, 1e-1):
        sched = lo.warmup_then_decay(peak, WD_STEPS, warmup_steps=WD_WARMUP)
        p0, finals[peak] = _decay_with_zero_grads(lo.adamw(sched, weight_decay=WD_LAMBDA))
        factor = np.prod(
            [1 - peak * WD_LAMBDA * _cosine_factor_closed_form(t) for t in range(WD_STEPS)]
        )
        np.testing.assert_allclose(finals[peak]["w"], factor * p0["w"], rtol=1e-5)
    ratio = np.asarray(finals[1e-1]["w"] / finals[1e-3]["w"])
    assert np.all(ratio < 0.99)


def test_independent_decay_equals_coupled_with_lambda_over_peak():
    """Wortsman et al.: independent lambda == coupled lambda / peak_lr."""
    peak, lam = 3e-2, 1e-3
    sched = lo.warmup_then_decay(peak, 30, warmup_steps=5, end_lr=1e-4)
    params = jax.tree.map(jnp.ones_like, _random_grads(7, 1)[0])
    grads = _random_grads(7, steps=30)
    indep = _run(
        lo.adamw(sched, weight_decay=lam, independent_weight_decay=True, peak_learning_rate=peak),
        grads,
        params,
    )
    coupled = _run(lo.adamw(sched, weight_decay=lam / peak), grads, params)
    for k in indep:
        np.testing.assert_allclose(indep[k], coupled[k], rtol=1e-5, atol=1e-10)


def test_independent_decay_with_schedule_needs_peak_lr():
    sched = lo.warmup_then_decay(1e-3, 100)
    with pytest.raises(ValueError, match="peak_learning_rate"):
        lo.adamw(sched, independent_weight_decay=True)
    with pytest.raises(ValueError, match="peak_learning_rate"):
        lo.adam_atan2(sched, weight_decay=1e-4, independent_weight_decay=True)


def test_add_independent_weight_decay_one_step_and_masks():
    params = {"w": jnp.full((2, 2), 2.0), "b": jnp.full((2,), 2.0)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    # Default mask: matrices only. s_t = 0.5 from schedule_factor.
    tx = lo.add_independent_weight_decay(0.1, schedule_factor=lambda t: 0.5)
    u, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(u["w"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(u["b"], 0.0)
    # Explicit pytree mask, and a callable mask.
    for mask in ({"w": False, "b": True}, lambda p: {"w": False, "b": True}):
        tx = lo.add_independent_weight_decay(0.1, mask=mask)
        u, _ = tx.update(zeros, tx.init(params), params)
        np.testing.assert_array_equal(u["w"], 0.0)
        np.testing.assert_allclose(u["b"], -0.1 * 2.0, rtol=1e-6)


def test_decay_mask_matrices():
    params = {
        "emb": jnp.ones((5, 3)),
        "kernel": jnp.ones((2, 3, 4)),
        "scale": jnp.ones((3,)),
        "scalar": jnp.ones(()),
    }
    assert lo.decay_mask_matrices(params) == {
        "emb": True,
        "kernel": True,
        "scale": False,
        "scalar": False,
    }


# ----------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------


def _values(schedule, steps):
    return np.asarray([float(schedule(t)) for t in steps])


def test_warmup_is_linear_from_zero():
    s = lo.warmup_then_decay(2.0, total_steps=100, warmup_steps=20)
    np.testing.assert_allclose(_values(s, [0, 5, 10, 19, 20]), [0.0, 0.5, 1.0, 1.9, 2.0], rtol=1e-6)


def test_cosine_midpoint_and_floor():
    peak, end = 1.0, 0.1
    s = lo.warmup_then_decay(peak, 110, warmup_steps=10, end_lr=end)
    assert float(s(60)) == pytest.approx((peak + end) / 2, rel=1e-6)
    assert float(s(35)) == pytest.approx(
        end + (peak - end) * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-6
    )
    np.testing.assert_allclose(_values(s, [110, 111, 500, 10**6]), end, rtol=1e-6)
    after = _values(s, range(10, 200))
    assert after.min() >= end and np.all(np.diff(after) <= 0)


def test_decay_steps_sets_where_end_lr_is_reached():
    s = lo.warmup_then_decay(1.0, 100, warmup_steps=0, decay="linear", end_lr=0.2, decay_steps=40)
    np.testing.assert_allclose(_values(s, [0, 20, 40, 99]), [1.0, 0.6, 0.2, 0.2], rtol=1e-6)


def test_linear_decay():
    s = lo.warmup_then_decay(1.0, 100, warmup_steps=20, decay="linear")
    np.testing.assert_allclose(_values(s, [20, 60, 100, 150]), [1.0, 0.5, 0.0, 0.0], atol=1e-6)


def test_rsqrt_formula():
    peak, warmup, end = 1e-2, 16, 1e-3
    s = lo.warmup_then_decay(peak, 10_000, warmup_steps=warmup, decay="rsqrt", end_lr=end)
    steps = np.array([16, 25, 64, 400, 1600, 5000])
    expected = np.maximum(peak * np.sqrt(warmup / steps), end)
    np.testing.assert_allclose(_values(s, steps), expected, rtol=1e-6)
    assert float(s(8)) == pytest.approx(peak / 2, rel=1e-6)  # still warming up
    s0 = lo.warmup_then_decay(1.0, 100, decay="rsqrt")  # no warmup: 1/sqrt(t+1)
    np.testing.assert_allclose(_values(s0, [0, 3, 8, 99]), [1.0, 0.5, 1 / 3, 0.1], rtol=1e-6)


def test_constant():
    s = lo.warmup_then_decay(3e-4, 50, warmup_steps=10, decay="constant", end_lr=1e-5)
    np.testing.assert_allclose(_values(s, [5, 10, 49, 1000]), [1.5e-4, 3e-4, 3e-4, 3e-4], rtol=1e-6)


def test_schedule_is_jittable():
    s = lo.warmup_then_decay(1.0, 100, warmup_steps=10, decay="rsqrt")
    np.testing.assert_allclose(jax.jit(s)(jnp.int32(40)), 0.5, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(warmup_steps=200), "warmup_steps=200"),
        (dict(end_lr=2.0), "end_lr=2.0"),
        (dict(decay="exponential"), "exponential"),
        (dict(warmup_steps=50, decay_steps=10), "decay_steps=10"),
        (dict(end_lr=-1.0), "end_lr"),
    ],
)
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lo.warmup_then_decay(1.0, total_steps=100, **kwargs)


# ----------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------


def _small_tree():
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
    grads = {"w": jnp.full((4, 3), 0.3), "b": jnp.full((3,), -0.2)}
    return params, grads


@pytest.mark.parametrize("name", lo.NAMES)
def test_every_optimizer_builds_and_steps(name):
    params, grads = _small_tree()
    opt = lo.make_optimizer({"name": name, "lr": 1e-2}, total_steps=10)
    state = opt.tx.init(params)
    u, state = jax.jit(opt.tx.update)(grads, state, params)
    assert jax.tree.structure(u) == jax.tree.structure(params)
    for k in u:  # descent: every coordinate moves against its gradient
        assert np.all(np.isfinite(u[k])) and np.all(np.sign(u[k]) == -np.sign(grads[k]))
    assert float(opt.schedule(0)) == pytest.approx(1e-2)


def test_sgd_matches_closed_form():
    params, grads = _small_tree()
    cfg = dict(name="sgd", lr=0.1, momentum=0.0, clip_norm=0, weight_decay=0.0, schedule="constant")
    opt = lo.make_optimizer(cfg, total_steps=5)
    u, _ = opt.tx.update(grads, opt.tx.init(params), params)
    for k in u:
        np.testing.assert_allclose(u[k], -0.1 * grads[k], rtol=1e-6)


def test_clip_norm_clips_global_norm():
    params, grads = _small_tree()
    gnorm = math.sqrt(12 * 0.3**2 + 3 * 0.2**2)
    cfg = dict(
        name="sgd", lr=1.0, momentum=0.0, clip_norm=0.25, weight_decay=0.0, schedule="constant"
    )
    opt = lo.make_optimizer(cfg, total_steps=5)
    u, _ = opt.tx.update(grads, opt.tx.init(params), params)
    norm = math.sqrt(sum(float(jnp.sum(x**2)) for x in u.values()))
    assert gnorm > 0.25 and norm == pytest.approx(0.25, rel=1e-5)
    np.testing.assert_allclose(u["w"], -0.25 * grads["w"] / gnorm, rtol=1e-5)


def test_clip_comes_before_momentum():
    """Clip each raw gradient, then accumulate: m_2 = clip(g_2) + 0.9 clip(g_1)."""
    params, grads = _small_tree()
    gnorm = math.sqrt(12 * 0.3**2 + 3 * 0.2**2)
    cfg = dict(
        name="sgd", lr=1.0, momentum=0.9, clip_norm=0.25, weight_decay=0.0, schedule="constant"
    )
    opt = lo.make_optimizer(cfg, total_steps=5)
    state = opt.tx.init(params)
    _, state = opt.tx.update(grads, state, params)
    u, _ = opt.tx.update(grads, state, params)
    np.testing.assert_allclose(u["w"], -1.9 * 0.25 * grads["w"] / gnorm, rtol=1e-5)


@pytest.mark.parametrize("independent", [False, True])
def test_factory_decay_order(independent):
    """Zero grads: only decay moves params, by lr_t*lam*p (coupled) or lam*s_t*p."""
    params = {"w": jnp.full((2, 2), 3.0), "b": jnp.full((2,), 3.0)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    lr, lam = 0.5, 0.1
    opt = lo.make_optimizer(
        dict(lr=lr, weight_decay=lam, warmup_steps=4, independent_weight_decay=independent),
        total_steps=20,
    )
    state = opt.tx.init(params)
    for t in range(3):  # during warmup: lr_t = lr * t / 4, s_t = t / 4
        u, state = opt.tx.update(zeros, state, params)
        per_step = lam * t / 4 if independent else lr * t / 4 * lam
        np.testing.assert_allclose(u["w"], -per_step * 3.0, rtol=1e-6, atol=1e-12)
        np.testing.assert_array_equal(u["b"], 0.0)


def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="lion") as e:
        lo.make_optimizer({"name": "lion"}, total_steps=10)
    assert "adam_atan2" in str(e.value)  # lists the valid names
    with pytest.raises(ValueError, match="learning_rate") as e:
        lo.make_optimizer({"learning_rate": 1e-3}, total_steps=10)
    assert "warmup_steps" in str(e.value)  # lists the valid keys


def test_defaults_build_and_work_with_config_dict_and_multisteps():
    opt = lo.make_optimizer(dict(lo.DEFAULTS), total_steps=100)
    params, grads = _small_tree()
    acc = optax.MultiSteps(opt.tx, every_k_schedule=2)
    state = acc.init(params)
    u, state = acc.update(grads, state, params)
    np.testing.assert_array_equal(u["w"], 0.0)  # first micro-step: no update
    u, state = acc.update(grads, state, params)
    assert np.all(np.asarray(u["w"]) < 0)
    cfg = ml_collections.ConfigDict(dict(lo.DEFAULTS))
    cfg.name, cfg.decay_steps = "adam_atan2", 50
    opt = lo.make_optimizer(cfg, total_steps=100)
    assert float(opt.schedule(50)) == pytest.approx(lo.DEFAULTS["end_lr"], rel=1e-5)


def test_import_is_pure_jax_optax_numpy():
    code = (
        "import sys, lm_align.optim; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'flax', 'ml_collections', 'orbax', 'grain', 'tensorflow'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "[]"


def test_wsd_schedule_worked_numbers_and_shared_prefix():
    """warmup 10, stable to step 70, cooldown 30 to end 0.1 (peak 1): hand-computed values."""
    lin = lo.warmup_then_decay(1.0, 100, warmup_steps=10, decay="wsd", end_lr=0.1, cooldown_steps=30)
    sqrt = lo.warmup_then_decay(
        1.0, 100, warmup_steps=10, decay="wsd", end_lr=0.1, cooldown_steps=30, cooldown="1-sqrt"
    )
    # step 5: warmup 0.5; step 40: stable 1.0; step 70 + 15: halfway through the cooldown.
    np.testing.assert_allclose([float(lin(t)) for t in (5, 40, 70, 85, 100, 150)],
                               [0.5, 1.0, 1.0, 0.55, 0.1, 0.1], rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(float(sqrt(85)), 0.1 + 0.9 * (1 - np.sqrt(0.5)), rtol=1e-6)
    # A longer run (cooldown 20% of 400 - 10 = 78 steps) is the same until its cooldown
    # starts: the shorter run branches off it.
    short = lo.warmup_then_decay(1.0, 100, warmup_steps=10, decay="wsd", cooldown_steps=18)
    long = lo.warmup_then_decay(1.0, 400, warmup_steps=10, decay="wsd", cooldown_steps=78)
    steps = np.arange(0, 82)
    np.testing.assert_array_equal([float(short(t)) for t in steps], [float(long(t)) for t in steps])
    assert float(short(90)) < float(long(90))
    with pytest.raises(ValueError, match="cooldown_steps=0 must be in \\[1, 90\\]"):
        lo.warmup_then_decay(1.0, 100, warmup_steps=10, decay="wsd")
    with pytest.raises(ValueError, match="Unknown cooldown 'cosine'"):
        lo.warmup_then_decay(1.0, 100, decay="wsd", cooldown_steps=5, cooldown="cosine")


def test_make_optimizer_wsd_uses_the_cooldown_fraction():
    opt = lo.make_optimizer(
        {"schedule": "wsd", "lr": 1.0, "warmup_steps": 10, "end_lr": 0.0, "cooldown_fraction": 0.5},
        total_steps=110,
    )
    # Stable until 10 + 50 = 60, then linear to 0 at 110.
    np.testing.assert_allclose([float(opt.schedule(t)) for t in (59, 60, 85, 110)], [1, 1, 0.5, 0])
    with pytest.raises(ValueError, match="cooldown_fraction=0 must be in"):
        lo.make_optimizer({"schedule": "wsd", "cooldown_fraction": 0}, total_steps=10)


def _muon_update(params, grads, dims, steps=2):
    opt = lo.make_optimizer(
        {"name": "muon", "lr": 0.1, "weight_decay": 0.0, "clip_norm": 0.0, "schedule": "constant"},
        total_steps=10, muon_dims=dims,
    )  # fmt: skip
    state = opt.tx.init(params)
    for g in grads:
        updates, state = opt.tx.update(g, state, params)
    return updates


def test_muon_orthogonalises_each_layer_and_each_of_q_k_v_on_its_own():
    """Scanned [N, D, F] weights and fused [D, 3, H, K] projections: every slice gets the
    update it would get as a matrix of its own; non-matrix parameters get Adam."""
    rng = np.random.default_rng(0)
    D, F, H, K, N = 8, 12, 2, 4, 2
    grads = [{"w": rng.normal(size=(N, D, F)), "qkv": rng.normal(size=(D, 3, H, K)),
              "scale": rng.normal(size=(D,))} for _ in range(2)]  # fmt: skip
    params = jax.tree.map(jnp.zeros_like, grads[0])
    dims = {"w": ((1,), (2,)), "qkv": ((0,), (2, 3)), "scale": None}
    together = _muon_update(params, grads, dims)
    for n in range(N):  # one layer as a plain matrix
        alone = _muon_update({"w": params["w"][n]}, [{"w": g["w"][n]} for g in grads],
                             {"w": ((0,), (1,))})  # fmt: skip
        np.testing.assert_allclose(together["w"][n], alone["w"], rtol=1e-5, atol=1e-6)
    k = _muon_update({"k": params["qkv"][:, 1].reshape(D, H * K)},
                     [{"k": g["qkv"][:, 1].reshape(D, H * K)} for g in grads], {"k": ((0,), (1,))})  # fmt: skip
    np.testing.assert_allclose(together["qkv"][:, 1].reshape(D, H * K), k["k"], rtol=1e-5, atol=1e-6)
    # Orthogonalised: the singular values of a layer's update are all close to one
    # value (Newton-Schulz drives them into roughly [0.7, 1.2]), unlike the gradient's.
    sv = np.linalg.svd(np.asarray(together["w"][0]), compute_uv=False)
    sv_grad = np.linalg.svd(grads[1]["w"][0], compute_uv=False)
    assert sv.max() / sv.min() < 2.0 < sv_grad.max() / sv_grad.min()
    adam = lo.make_optimizer({"name": "adam", "lr": 0.1, "weight_decay": 0.0, "clip_norm": 0.0,
                              "schedule": "constant"}, total_steps=10)  # fmt: skip
    state = adam.tx.init({"scale": params["scale"]})
    for g in grads:
        a, state = adam.tx.update({"scale": g["scale"]}, state)
    np.testing.assert_allclose(together["scale"], a["scale"], rtol=1e-6)
    # Without dims, 2-D parameters are matrices and the rest Adam's.
    plain = _muon_update({"w": params["w"][0], "scale": params["scale"]},
                         [{"w": g["w"][0], "scale": g["scale"]} for g in grads], None)  # fmt: skip
    np.testing.assert_allclose(plain["w"], together["w"][0], rtol=1e-5, atol=1e-6)
