"""The training engine end to end: sharding, resume, non-finite handling, metrics."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.helpers import REPO, TINY, cli_args, env_with_devices, losses, read_rows, run_cli

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
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)) /
                                                  (np.abs(np.asarray(b)) + 1e-6))),
                         many.state.params, one.state.params)
    print(json.dumps({"specs": specs, "n_shards": n_shards, "max_rel_diff": max(jax.tree.leaves(diffs))}))
""")


def test_sharded_run_matches_one_device(tmp_path):
    """8 simulated devices, mesh data=2 fsdp=2 tensor=2, vs 1 device: same losses and params."""
    overrides = TINY + ["train.steps=6", "optimizer.lr=3e-3", "model.vocab_size=260"]  # 260: even, so vocab shards
    proc = subprocess.run(
        [sys.executable, "-c", SHARDING_SCRIPT, json.dumps(overrides), str(tmp_path),
         os.path.join(REPO, "experiments", "default.py")],
        env=env_with_devices(8), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    one, many = losses(tmp_path / "one"), losses(tmp_path / "many")
    assert sorted(one) == list(range(1, 7))
    np.testing.assert_allclose([many[s] for s in one], [one[s] for s in one], rtol=1e-4)
    assert report["max_rel_diff"] < 1e-3  # elementwise relative, after 6 Adam steps
    # Parameters really are split across devices by the logical-axis rules.
    assert report["specs"]["['embed']"] == "P('tensor', 'fsdp')"
    assert report["n_shards"]["['embed']"] == 4
    assert report["specs"]["['blocks'][0]['mlp']['w_in']"] == "P('fsdp', None, 'tensor')"


def _tiny_run(steps):
    return TINY + [f"train.steps={steps}", "train.checkpoint_every=1000", "train.async_checkpointing=true"]


def test_sigterm_then_resume_is_bitwise_identical(tmp_path):
    steps = 40
    run_cli(tmp_path / "straight", _tiny_run(steps))
    expected = losses(tmp_path / "straight")

    workdir = tmp_path / "interrupted"
    proc = subprocess.Popen(cli_args(workdir, _tiny_run(steps) + ["train.log_every=1"]),
                            env=env_with_devices(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved checkpoint at step" in out
    stopped_at = max(losses(workdir))
    assert 5 <= stopped_at < steps, f"stopped at {stopped_at}; make the run longer"

    resumed = run_cli(workdir, _tiny_run(steps))
    assert f"resumed from" in resumed.stdout
    got = losses(workdir)
    assert sorted(got) == sorted(expected)
    assert got == expected  # bitwise: JSON floats round-trip exactly


def test_nonfinite_loss_halts_and_keeps_last_finite_checkpoint(tmp_path):
    # Plain SGD with an absurd LR and no clipping overflows within a few steps.
    overrides = _tiny_run(20) + ["optimizer.name=sgd", "optimizer.lr=1e12", "optimizer.clip_norm=0.0",
                                 "optimizer.momentum=0.0", "optimizer.warmup_steps=0",
                                 "optimizer.schedule=constant", "train.checkpoint_every=1",
                                 "train.async_checkpointing=false"]
    proc = run_cli(tmp_path, overrides, check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    rows = read_rows(tmp_path)
    bad_step = len(rows) + 1  # rows are written for finite steps only
    assert f"non-finite loss at step {bad_step}" in proc.stderr
    assert all(np.isfinite(r["loss"]) for r in rows)
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps and steps[-1] == bad_step - 1, (steps, bad_step)


def test_nonfinite_skip_mode_drops_updates(tmp_path):
    overrides = _tiny_run(8) + ["optimizer.name=sgd", "optimizer.lr=1e12", "optimizer.clip_norm=0.0",
                                "optimizer.momentum=0.0", "optimizer.schedule=constant",
                                "optimizer.warmup_steps=0", "train.nonfinite=skip"]
    run_cli(tmp_path, overrides)
    rows = read_rows(tmp_path)
    assert len(rows) == 8
    assert rows[-1]["skipped"] > 0
    # Every step whose loss or gradient norm was non-finite is counted, and only those.
    bad = [r["step"] for r in rows if not (np.isfinite(float(r["loss"])) and np.isfinite(float(r["grad_norm"])))]
    assert bad and rows[-1]["skipped"] == len(bad)
    assert [r["skipped"] for r in rows] == [sum(1 for b in bad if b <= r["step"]) for r in rows]
    # Dropped updates leave the parameters finite: the held-out loss is finite.
    assert np.isfinite(json.load(open(tmp_path / "final.json"))["eval_loss"])


def test_metrics_jsonl_documented_keys(tmp_path):
    run_cli(tmp_path, _tiny_run(4) + ["train.log_every=2", "train.eval_every=2"])
    rows = read_rows(tmp_path)
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        for key in ("step", "loss", "lr", "tokens_per_s", "eval_loss", "eval_accuracy", "z_loss",
                    "accuracy", "grad_norm", "max_attn_logit", "output_logit_mean", "log_z_mean"):
            assert key in r, key
        assert len(r["max_attn_logit"]) == 2  # one per layer
    assert os.path.exists(tmp_path / "config.json")
