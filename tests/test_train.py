"""The training engine end to end: sharding, resume, non-finite handling, metrics."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np

from tests.helpers import (
    REPO,
    TINY,
    cli_args,
    env_with_devices,
    losses,
    read_rows,
    run_cli,
    sigterm_after_rows,
)

SHARDING_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from lm_align import config as config_lib
    from lm_align.train import train
    overrides = json.loads(sys.argv[1]); root = sys.argv[2]
    base = config_lib.apply_overrides(config_lib.load_config(sys.argv[3]), overrides)
    devs = jax.devices()
    assert len(devs) == 8, devs
    one = train(config_lib.apply_overrides(base, ["mesh.data=1"]), root + "/one", devices=devs[:1])
    many = train(config_lib.apply_overrides(base, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
                 root + "/many", devices=devs)
    specs = {jax.tree_util.keystr(p): str(x.sharding.spec)
             for p, x in jax.tree_util.tree_flatten_with_path(many.state.params)[0]}
    n_shards = {jax.tree_util.keystr(p): len({str(s.index) for s in x.addressable_shards})
                for p, x in jax.tree_util.tree_flatten_with_path(many.state.params)[0]}
    # Each tensor's largest difference relative to its largest entry: a sharding bug
    # moves whole slices by O(1); float reassociation moves entries by ulps that Adam's
    # first steps, lr * g / (|g| + eps), amplify only up to lr.
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))) /
                                            np.max(np.abs(np.asarray(b)))),
                         many.state.params, one.state.params)
    print(json.dumps({"specs": specs, "n_shards": n_shards, "max_rel_diff": max(jax.tree.leaves(diffs))}))
""")


def test_sharded_run_matches_one_device(tmp_path):
    """8 simulated devices, mesh data=2 fsdp=2 tensor=2, vs 1 device: same losses and params."""
    overrides = TINY + [
        "train.steps=6",
        "optimizer.lr=3e-3",
        "model.vocab_size=260",
    ]  # 260: even, so vocab shards
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SHARDING_SCRIPT,
            json.dumps(overrides),
            str(tmp_path),
            os.path.join(REPO, "experiments", "default.py"),
        ],
        env=env_with_devices(8),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    one, many = losses(tmp_path / "one"), losses(tmp_path / "many")
    assert sorted(one) == list(range(1, 7))
    np.testing.assert_allclose([many[s] for s in one], [one[s] for s in one], rtol=1e-4)
    assert report["max_rel_diff"] < 1e-5  # relative to each tensor's scale (measured 2e-7)
    # Parameters really are split across devices by the logical-axis rules.
    assert report["specs"]["['embed']"] == "P(('tensor', 'fsdp'), None)"  # rows split 4 ways
    assert report["n_shards"]["['embed']"] == 4
    assert report["specs"]["['blocks'][0]['mlp']['w_in']"] == "P('fsdp', None, 'tensor')"


def _tiny_run(steps):
    return TINY + [
        f"train.steps={steps}",
        "train.checkpoint_every=1000",
        "train.async_checkpointing=true",
    ]


def test_sigterm_then_resume_is_bitwise_identical(tmp_path):
    steps = 40
    run_cli(tmp_path / "straight", _tiny_run(steps))
    expected = losses(tmp_path / "straight")

    workdir = tmp_path / "interrupted"
    cmd = cli_args(workdir, _tiny_run(steps) + ["train.log_every=1"])
    rc, out = sigterm_after_rows(cmd, workdir / "metrics.jsonl")
    assert rc == 0, out
    assert "SIGTERM: saved checkpoint at step" in out
    stopped_at = max(losses(workdir))
    assert 5 <= stopped_at < steps, f"stopped at {stopped_at}; make the run longer"

    resumed = run_cli(workdir, _tiny_run(steps))
    assert "resumed from" in resumed.stdout
    got = losses(workdir)
    assert sorted(got) == sorted(expected)
    assert got == expected  # bitwise: JSON floats round-trip exactly


def test_nonfinite_loss_halts_and_keeps_last_finite_checkpoint(tmp_path):
    # Plain SGD with an absurd LR and no clipping overflows within a few steps.
    overrides = _tiny_run(20) + [
        "optimizer.name=sgd",
        "optimizer.lr=1e12",
        "optimizer.clip_norm=0.0",
        "optimizer.momentum=0.0",
        "optimizer.warmup_steps=0",
        "optimizer.schedule=constant",
        "train.checkpoint_every=1",
        "train.async_checkpointing=false",
    ]
    proc = run_cli(tmp_path, overrides, check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    rows = read_rows(tmp_path)
    bad_step = len(rows) + 1  # rows are written for finite steps only
    assert f"non-finite loss or gradient at step {bad_step}" in proc.stderr
    assert all(np.isfinite(r["loss"]) for r in rows)
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps and steps[-1] == bad_step - 1, (steps, bad_step)


def test_nonfinite_skip_mode_drops_updates(tmp_path):
    overrides = _tiny_run(8) + [
        "optimizer.name=sgd",
        "optimizer.lr=1e12",
        "optimizer.clip_norm=0.0",
        "optimizer.momentum=0.0",
        "optimizer.schedule=constant",
        "optimizer.warmup_steps=0",
        "train.nonfinite=skip",
    ]
    run_cli(tmp_path, overrides)
    rows = read_rows(tmp_path)
    assert len(rows) == 8
    assert rows[-1]["skipped"] > 0
    # Every step whose loss or gradient norm was non-finite is counted, and only those.
    bad = [
        r["step"]
        for r in rows
        if not (np.isfinite(float(r["loss"])) and np.isfinite(float(r["grad_norm"])))
    ]
    assert bad and rows[-1]["skipped"] == len(bad)
    assert [r["skipped"] for r in rows] == [sum(1 for b in bad if b <= r["step"]) for r in rows]
    # Dropped updates leave the parameters finite: the held-out loss is finite.
    assert np.isfinite(json.load(open(tmp_path / "final.json"))["eval_loss"])


def test_metrics_jsonl_documented_keys(tmp_path):
    run_cli(
        tmp_path,
        _tiny_run(4) + ["train.log_every=2", "train.eval_every=2", "train.tensorboard=true"],
    )
    rows = read_rows(tmp_path)
    events = [f for f in os.listdir(tmp_path / "tb") if f.startswith("events.out.tfevents")]
    assert events and os.path.getsize(tmp_path / "tb" / events[0]) > 0
    # Step 1 is always logged (the loss at initialisation), then every log_every steps.
    assert [r["step"] for r in rows] == [1, 2, 4]
    # At init every output logit is small, so the first loss is near log(vocab_size).
    assert abs(rows[0]["ce"] - math.log(259)) < 0.5, rows[0]["ce"]
    for r in rows[1:]:
        for key in (
            "step",
            "loss",
            "lr",
            "tokens_per_s",
            "eval_loss",
            "eval_accuracy",
            "z_loss",
            "accuracy",
            "grad_norm",
            "max_attn_logit",
            "output_logit_mean",
            "log_z_mean",
        ):
            assert key in r, key
        assert len(r["max_attn_logit"]) == 2  # one per layer
        for key in ("param_rms", "grad_rms", "update_rms"):
            per_layer = r[f"{key}/blocks.attn.qkv"]
            assert len(per_layer) == 2 and all(v > 0 for v in per_layer), (key, per_layer)
            assert r[f"{key}/readout"] > 0
    assert os.path.exists(tmp_path / "config.json")


def test_grad_accumulation_matches_full_batch():
    """k micro-batches weighted by their token counts give the full-batch gradient."""
    import jax
    import jax.numpy as jnp
    import optax

    from lm_align.models import TransformerConfig
    from lm_align.models.pure import PureModel
    from lm_align.train.step import init_state, make_train_step

    model = PureModel(TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    tx = optax.sgd(0.1)
    rng = np.random.default_rng(0)
    B, L = 4, 8
    tokens = rng.integers(0, 32, size=(B, L + 1)).astype(np.int32)
    mask = (rng.random((B, L)) < 0.7).astype(np.float32)  # ragged: micro-batches differ in tokens
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": mask,
        "segment_ids": np.ones((B, L), np.int32),
        "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
    }
    results = []
    for k in (1, 2, 4):
        step = jax.jit(
            make_train_step(model, tx, lambda s: 0.1, z_loss_coef=1e-3, grad_accum_steps=k)
        )
        new_state, metrics = step(init_state(model, tx, seed=0), batch)
        results.append((new_state.params, metrics))
    (p1, m1), *others = results
    for pk, mk in others:
        np.testing.assert_allclose(float(mk["loss"]), float(m1["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(mk["accuracy"]), float(m1["accuracy"]), rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), pk, p1)
    # The update is not trivially zero.
    p0 = init_state(model, tx, seed=0).params
    assert (
        max(
            float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0))
        )
        > 1e-4
    )


def test_rerun_of_finished_run_keeps_results_and_reports_config_changes(tmp_path):
    run_cli(tmp_path, _tiny_run(3) + ["train.eval_every=3"])
    final = json.load(open(tmp_path / "final.json"))
    assert "eval_loss" in final
    assert all(r["tokens_per_s"] > 0 for r in read_rows(tmp_path))
    again = run_cli(tmp_path, _tiny_run(3) + ["train.eval_every=3", "optimizer.lr=0.5"])
    assert "already finished 3 steps" in again.stdout
    assert "config changed since the checkpoint: optimizer.lr: 0.003 -> 0.5" in again.stdout
    assert json.load(open(tmp_path / "final.json")) == final
