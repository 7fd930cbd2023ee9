"""`model.attention`: the fused kernels agree with the reference attention.

Splash runs in the Pallas interpreter here (the same kernel the TPU compiles);
the reference path computes the scores, the mask and the softmax explicitly.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_align.models import TransformerConfig
from lm_align.models import attention as kernels
from lm_align.models.pure import PureModel

L = 128  # splash works in blocks of 128 tokens

BASE = TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
    activation="swiglu", norm="rmsnorm", max_len=L,
)  # fmt: skip


def batch(copies=1):
    """Two rows (times `copies`): three packed documents (positions restart), and one document."""
    tokens = jax.random.randint(jax.random.key(1), (2, L), 0, 64)
    segments = np.ones((2, L), np.int32)
    segments[0, 50:90], segments[0, 90:] = 2, 3
    positions = np.concatenate(
        [np.r_[np.arange(50), np.arange(40), np.arange(38)][None], np.arange(L)[None]]
    ).astype(np.int32)
    return tuple(jnp.tile(jnp.asarray(x), (copies, 1)) for x in (tokens, positions, segments))


def outputs(cfg, params, copies=1):
    """Logits and the gradient of a scalar function of them with respect to every parameter."""
    model = PureModel(cfg)
    tokens, positions, segments = batch(copies)

    def f(p):
        logits = model.apply(p, tokens, positions_BL=positions, segment_ids_BL=segments)
        return jnp.sum(jnp.sin(logits)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return logits, grads


def assert_close(cfg, attention):
    params = PureModel(cfg).init(0)
    ref_logits, ref_grads = outputs(cfg, params)
    logits, grads = outputs(dataclasses.replace(cfg, attention=attention), params)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        scale = float(jnp.max(jnp.abs(r)))
        assert float(jnp.max(jnp.abs(g - r))) <= 1e-5 * max(scale, 1.0), jax.tree_util.keystr(path)


# Layer 0 local (window 16), layer 1 global (causal); GQA with 2 queries per key/value head.
WINDOWS = dataclasses.replace(BASE, sliding_window=16, attention_pattern=("local", "global"))


def test_splash_matches_reference():
    assert_close(WINDOWS, "splash")


def test_splash_with_softcap_under_scan_and_remat():
    """Multi-head (G = H), soft-capped; the window is traced inside scan and remat, so
    splash picks its kernel with lax.cond."""
    cfg = dataclasses.replace(
        WINDOWS, n_kv_heads=4, scan_layers=True, remat="full", attn_logit_softcap=5.0
    )
    assert_close(cfg, "splash")


def test_dot_product_matches_reference():
    assert_close(WINDOWS, "dot_product")


def test_the_window_changes_the_output():
    """Control: the checks above would see a kernel that ignores the window."""
    params = PureModel(BASE).init(0)
    local = dataclasses.replace(BASE, sliding_window=16, attention_pattern=("local",))
    a, _ = outputs(BASE, params)
    b, _ = outputs(dataclasses.replace(local, attention="splash"), params)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-2


def test_max_logit_bound_bounds_the_reference_max_logit():
    cfg = dataclasses.replace(BASE, qk_layernorm=False)
    model = PureModel(cfg)
    params = model.init(0)
    tokens, positions, segments = batch()
    kw = dict(positions_BL=positions, segment_ids_BL=segments, return_diagnostics=True)
    _, ref = model.apply(params, tokens, **kw)
    _, fused = PureModel(dataclasses.replace(cfg, attention="dot_product")).apply(params, tokens, **kw)
    assert np.all(np.asarray(fused["max_attn_logit"]) >= np.asarray(ref["max_attn_logit"]))
    assert np.all(np.asarray(fused["max_attn_logit"]) < 10 * np.asarray(ref["max_attn_logit"]))


def test_misuse_is_named():
    with pytest.raises(ValueError, match="dot_product' cannot soft-cap"):
        dataclasses.replace(BASE, attention="dot_product", attn_logit_softcap=5.0)
    with pytest.raises(ValueError, match="attention='flash' is not one of"):
        dataclasses.replace(BASE, attention="flash")
    q = jnp.zeros((1, 64, 4, 8))
    k = jnp.zeros((1, 64, 2, 8))
    with pytest.raises(ValueError, match="multiple of 128 \\(got 64\\)"):
        kernels.splash(q, k, k, jnp.ones((1, 64), jnp.int32), None)


SHARDED = """
import dataclasses, jax, jax.numpy as jnp, numpy as np
from lm_align import parallel
from lm_align.models.pure import PureModel
from tests.test_attention import WINDOWS, batch, outputs

mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
model = PureModel(dataclasses.replace(WINDOWS, attention="splash"))
params = PureModel(WINDOWS).init(0)
ref_logits, ref_grads = outputs(WINDOWS, params, copies=2)  # reference path, one device
sharded = jax.device_put(params, parallel.logical_to_sharding(model.logical_axes, params, mesh))
tokens, positions, segments = (jax.device_put(x, parallel.batch_sharding(mesh)) for x in batch(2))

def f(p):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the train steps trace
        logits = model.apply(p, tokens, positions_BL=positions, segment_ids_BL=segments)
    return jnp.sum(jnp.sin(logits)), logits

text = jax.jit(jax.value_and_grad(f, has_aux=True)).lower(sharded).as_text()
assert "manual" in text, "no shard_map around the kernel"
(_, logits), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(sharded)
np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert float(jnp.max(jnp.abs(g - r))) <= 1e-5 * max(float(jnp.max(jnp.abs(r))), 1.0)
print("ok")
"""


def test_splash_on_eight_devices_matches_one():
    """data 2 x fsdp 2 x tensor 2: the kernel runs per device on its rows and heads."""
    import subprocess
    import sys

    from tests.helpers import REPO, env_with_devices

    proc = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env_with_devices(8), cwd=REPO,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


ENGINE = """
import jax, numpy as np
from lm_align import config as config_lib
from lm_align.train.config import base_config
from lm_align.train.setup import build_experiment
from tests.helpers import TINY
from tests.test_mixed_precision import batch

losses = {}
for attention in ("reference", "splash"):
    cfg = config_lib.apply_overrides(base_config(), TINY + [
        "data.seq_len=128", "model.n_heads=4", "model.n_kv_heads=2", "model.scan_layers=true",
        f"model.attention={attention}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
    ])
    exp = build_experiment(cfg)
    state = exp.steps.init_state()
    b = jax.device_put(batch(cfg), exp.steps.batch_sharding)
    manual = "manual" in exp.steps.train_step.lower(state, b).as_text()
    assert manual == (attention == "splash"), (attention, manual)  # shard_map around the kernel
    for _ in range(2):
        state, m = exp.steps.train_step(state, b)
    losses[attention] = float(m["loss"])
assert abs(losses["splash"] - losses["reference"]) < 1e-5, losses
print("ok", losses)
"""


def test_train_step_with_splash_on_eight_devices_matches_reference():
    """The engine traces its steps under the mesh, so splash runs per device (shard_map)."""
    import subprocess
    import sys

    from tests.helpers import REPO, env_with_devices

    proc = subprocess.run(
        [sys.executable, "-c", ENGINE], env=env_with_devices(8), cwd=REPO,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-4000:]
