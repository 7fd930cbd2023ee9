"""Muon through the engine (`optimizer.name=muon`): matrices from the model's logical axes."""

import jax
import jax.numpy as jnp
import numpy as np

from lm_align import config as config_lib
from lm_align.models import TransformerConfig
from lm_align.models.pure import PureModel
from lm_align.parameterization import Parameterization, muon_dims
from lm_align.train.config import base_config
from lm_align.train.setup import make_optimizer

MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
             activation="swiglu", norm="rmsnorm")  # fmt: skip


def test_dims_follow_the_layout():
    model = PureModel(TransformerConfig(**MODEL, scan_layers=True))
    dims = muon_dims(model.abstract_params, model.logical_axes)
    blocks = dims["blocks"]
    assert blocks["attn"]["q"] == ((1,), (3, 4))  # [N, D, 1, H, K]: per layer, q on its own
    assert blocks["attn"]["kv"] == ((1,), (3, 4))  # [N, D, 2, G, K]: k and v each on their own
    assert blocks["attn"]["out"] == ((1, 2), (3,))  # [N, H, K, D]
    assert blocks["mlp"]["w_in"] == ((1,), (3,)) and blocks["mlp"]["w_out"] == ((1,), (2,))
    assert dims["embed"] is None and dims["readout"] is None
    assert blocks["attn_norm"]["scale"] is None


def _update(scan: bool, grads_unscanned):
    cfg = config_lib.apply_overrides(
        base_config(), ["optimizer.name=muon", "optimizer.lr=0.02", "optimizer.clip_norm=0"]
    )
    model = PureModel(TransformerConfig(**MODEL, scan_layers=scan))
    param = Parameterization(name="mup", width=32, base_width=16)
    tx = make_optimizer(cfg, param, model).tx
    grads = grads_unscanned
    if scan:  # the same gradients, stacked over layers
        blocks = grads["blocks"]
        grads = {**grads, "blocks": jax.tree.map(lambda *x: jnp.stack(x), *[blocks[i] for i in sorted(blocks)])}
    params = jax.tree.map(jnp.zeros_like, grads)
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
    return updates


def test_scanned_and_unscanned_models_get_the_same_update():
    model = PureModel(TransformerConfig(**MODEL))
    keys = iter(jax.random.split(jax.random.key(0), 100))
    grads = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), model.abstract_params)
    layers, scanned = _update(False, grads), _update(True, grads)
    for i in (0, 1):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b[i], rtol=1e-5, atol=1e-7),
            layers["blocks"][i], scanned["blocks"],
        )  # fmt: skip
    np.testing.assert_allclose(layers["embed"], scanned["embed"], rtol=1e-6)
    # Control: a layer's update is not its gradient's direction (orthogonalised).
    u, g = layers["blocks"][0]["mlp"]["w_out"], grads["blocks"][0]["mlp"]["w_out"]
    sv = np.linalg.svd(np.asarray(u), compute_uv=False)
    sv_g = np.linalg.svd(np.asarray(g), compute_uv=False)
    assert sv.max() / sv.min() < 2.0 < sv_g.max() / sv_g.min()


def test_the_engine_trains_with_muon():
    """The real train step: state shardings of the partitioned optimizer, one update."""
    from lm_align.train.setup import build_experiment
    from tests.helpers import TINY
    from tests.test_mixed_precision import batch

    cfg = config_lib.apply_overrides(
        base_config(), TINY + ["optimizer.name=muon", "optimizer.warmup_steps=0", "model.scan_layers=true"]
    )
    exp = build_experiment(cfg, jax.devices()[:1])
    state = exp.steps.init_state()
    before = np.asarray(state.params["blocks"]["mlp"]["w_out"])
    state, metrics = exp.steps.train_step(state, batch(cfg))
    assert np.isfinite(float(metrics["loss"]))
    assert not np.allclose(np.asarray(state.params["blocks"]["mlp"]["w_out"]), before)
