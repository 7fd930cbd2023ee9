"""Mixed precision: `model.dtype=bfloat16` computes in bfloat16 on float32 master state.

The policy (docs/training.md, "Mixed precision"): parameters, gradients and
optimizer moments in float32 (`model.param_dtype`), matmuls in bfloat16, and
the attention scores, the output logits, the log-sum-exp and the loss in float32.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm_align import config as config_lib
from lm_align.train import train
from lm_align.train.config import base_config
from lm_align.train.setup import build_experiment
from tests.helpers import TINY

BF16 = ["model.dtype=bfloat16"]


def tiny(*overrides):
    return config_lib.apply_overrides(base_config(), TINY + list(overrides))


def batch(cfg):
    B, L = cfg.train.batch_size, cfg.data.seq_len
    tokens = jax.random.randint(jax.random.key(0), (B, L + 1), 0, cfg.model.vocab_size)
    return {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "loss_mask": jnp.ones((B, L), jnp.float32),
        "segment_ids": jnp.ones((B, L), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)),
    }  # fmt: skip


def test_state_is_float32_and_compute_bfloat16():
    """Dtypes of the real train state and step (traced abstractly: nothing is compiled)."""
    cfg = tiny(*BF16)
    exp = build_experiment(cfg, jax.devices()[:1])
    state = exp.steps.abstract_state
    f32 = {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state.params)} == f32
    moments = [x for x in jax.tree.leaves(state.opt_state) if len(x.shape) >= 1]
    assert moments and {x.dtype for x in moments} == f32
    b = batch(cfg)
    apply = lambda p, **kw: exp.model.apply(p, b["inputs"], **kw)
    assert jax.eval_shape(lambda p: apply(p, return_hidden=True), state.params).dtype == jnp.bfloat16
    assert jax.eval_shape(apply, state.params).dtype == jnp.float32  # logits
    grads = jax.eval_shape(jax.grad(lambda p: jnp.mean(apply(p))), state.params)
    assert {x.dtype for x in jax.tree.leaves(grads)} == f32
    new_state, metrics = jax.eval_shape(exp.steps.train_step, state, b)
    assert metrics["loss"].dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(new_state.params)} == f32


def test_a_tiny_update_survives_in_float32_master_weights():
    """1.0 + 1e-4 is 1.0001 in float32 but rounds back to 1.0 in bfloat16 (spacing 2^-7)."""
    sgd = optax.sgd(1.0)
    for dtype, survives in ((jnp.float32, True), (jnp.bfloat16, False)):
        params = {"w": jnp.ones((4,), dtype)}
        updates, _ = sgd.update({"w": jnp.full((4,), -1e-4, dtype)}, sgd.init(params), params)
        new = optax.apply_updates(params, updates)
        assert bool(jnp.all(new["w"] > 1.0)) == survives, dtype


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return np.array([r["loss"] for r in rows if "loss" in r])


def test_bfloat16_and_float32_loss_curves_agree(tmp_path):
    """100 steps from the same init and data: the curves differ by bfloat16 rounding only.

    Tolerance: 0.03 nats on the mean over each 10-step window, against a curve
    that itself falls by more than 0.5 nats over the run."""
    runs = {}
    for name, extra in (("f32", []), ("bf16", BF16)):
        cfg = tiny("train.steps=100", "optimizer.lr=1e-3", *extra)
        train(cfg, str(tmp_path / name), devices=jax.devices()[:1])
        runs[name] = losses(str(tmp_path / name)).reshape(10, 10).mean(axis=1)
    assert runs["f32"][-1] < runs["f32"][0] - 0.5  # it learns
    assert np.max(np.abs(runs["bf16"] - runs["f32"])) < 0.03, runs
