"""The online-RL trainer (`lm-align rl`): sampler/trainer agreement, exact accumulation,
on-policy ratios, dynamic sampling, resume, sharding, LoRA, config errors."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_align.align import rl as rl_lib
from lm_align.align.logprobs import masked_token_logprobs
from lm_align.align.setup import initial_state, setup
from lm_align.config import ConfigError
from lm_align.data.tokenizers import ByteTokenizer
from lm_align.losses import rl as rl_losses
from lm_align.sampling import generate, prompt_ids
from tests.helpers import (
    REPO,
    TINY,
    env_with_devices,
    losses,
    read_rows,
    run_cli,
    sigterm_after_rows,
)

EXPERIMENT = textwrap.dedent("""
    from lm_align.align.rl_config import rl_base_config

    def get_config(arg=None):
        cfg = rl_base_config(arg or "grpo")
        cfg.rl.policy_checkpoint = {policy!r}
        cfg.rl.scorer = "arithmetic_graded"
        cfg.rl.group_size = 4
        cfg.rl.max_new_tokens = 4
        cfg.rl.max_len = 16
        cfg.rl.eval_prompts = 0
        cfg.data.source = "arithmetic"
        cfg.train.steps = 8
        cfg.train.batch_size = 4
        cfg.train.log_every = 1
        cfg.train.eval_every = 0
        cfg.train.checkpoint_every = 1000
        cfg.train.answer_eval_examples = 0
        cfg.train.progress = False
        cfg.train.tensorboard = False
        cfg.optimizer.name = "sgd"
        cfg.optimizer.lr = 0.1
        cfg.optimizer.schedule = "constant"
        cfg.optimizer.warmup_steps = 0
        cfg.optimizer.clip_norm = 0.0  # updates proportional to the gradient
        cfg.optimizer.weight_decay = 0.0
        return cfg
""")


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny arithmetic policy (150 steps): its answers are digits, often wrong, so the
    graded verifier's rewards differ within a group."""
    root = tmp_path_factory.mktemp("rl")
    run_cli(root / "sft", [*TINY, "train.steps=150", "optimizer.lr=3e-3"])
    path = root / "exp.py"
    path.write_text(EXPERIMENT.format(policy=str(root / "sft")))
    return {"root": root, "experiment": str(path), "sft": str(root / "sft")}


def _cfg(policy, algorithm="grpo", **overrides):
    from lm_align import config as config_lib

    cfg = config_lib.load_config(f"{policy['experiment']}:{algorithm}")
    return config_lib.apply_overrides(cfg, {k: str(v) for k, v in overrides.items()})


def _rl_cli(policy, workdir, overrides=(), devices=1, algorithm="grpo"):
    return subprocess.run(
        [sys.executable, "-m", "lm_align.cli", "rl", "--config",
         f"{policy['experiment']}:{algorithm}", "--workdir", str(workdir),
         *[f"--config.{o}" for o in overrides]],
        env=env_with_devices(devices), capture_output=True, text=True, timeout=600, cwd=REPO,
        check=False,
    )  # fmt: skip


def test_sampler_and_trainer_logprobs_of_the_same_tokens_agree(policy):
    """The KV-cache decoder's log-prob of each sampled token (left-padded prompts of
    different lengths) equals the training forward pass's on the right-padded row."""
    s = setup(_cfg(policy), jax.devices()[:1], group="rl")
    params = s.init_params()
    tok = ByteTokenizer()
    prompts = ["7+5=", "31+48=", "2+99="]
    out = generate(
        s.policy_model, params, [prompt_ids(tok, p) for p in prompts], max_new_tokens=6,
        num_samples=2, rng=3, stop_tokens=[tok.eos_id], pad_id=tok.pad_id,
    )  # fmt: skip
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    ids = [[tokens[2 * b + g, : lengths[2 * b + g]].tolist() for g in range(2)] for b in range(3)]
    rows = rl_lib.response_rows(tok, prompts, ids, max_len=16)
    trainer = np.asarray(masked_token_logprobs(s.policy_model, params, rows).logps)
    sampler = np.asarray(out.logps)
    for r in range(6):
        start = len(prompt_ids(tok, prompts[r // 2])) - 1
        n = lengths[r]
        assert rows["loss_mask"][r].sum() == n
        np.testing.assert_allclose(trainer[r, start : start + n], sampler[r, :n], atol=1e-5)
        assert np.all(trainer[r, start + n :] == 0) and np.all(trainer[r, :start] == 0)


def _minibatch(s, params, seed=0, R=16, L=16):
    """Rows of random tokens with ragged response masks, rewards by group, and old log-probs
    moved away from the policy's so that ratios differ from 1 and some clip."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, R)
    start = rng.integers(2, 6, R)
    rows = {
        "inputs": rng.integers(3, 200, (R, L)).astype(np.int32),
        "targets": rng.integers(3, 200, (R, L)).astype(np.int32),
        "loss_mask": np.zeros((R, L), np.float32),
        "segment_ids": np.ones((R, L), np.int32),
        "positions": np.tile(np.arange(L, dtype=np.int32), (R, 1)),
    }
    for r in range(R):
        rows["loss_mask"][r, start[r] : start[r] + lengths[r]] = 1.0
    logp = np.asarray(masked_token_logprobs(s.policy_model, params, rows).logps)
    old = (logp + rng.normal(0, 0.3, logp.shape) * rows["loss_mask"]).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, logp.shape) * rows["loss_mask"]).astype(np.float32)
    rewards = rng.integers(0, 2, (R // 4, 4)).astype(np.float32)
    return {
        "rows": rows, "old_logp": old, "ref_logp": ref, "mask": rows["loss_mask"],
        "adv": np.asarray(rl_losses.advantages(rewards)).reshape(-1),
    }  # fmt: skip


@pytest.mark.parametrize("aggregation", rl_losses.AGGREGATIONS)
def test_gradient_accumulation_over_four_micro_batches_is_exact(policy, aggregation):
    """The same minibatch in 1 and in 4 micro-batches gives the same loss and the same
    SGD update (so the same gradient) to 1e-6, for every aggregation."""
    out = {}
    for k in (1, 4):
        cfg = _cfg(policy, **{"train.grad_accum_steps": k, "rl.aggregation": aggregation})
        s = setup(cfg, jax.devices()[:1], group="rl")
        params = s.init_params()
        mb = _minibatch(s, params)
        state = initial_state(s, params, 0)
        before = jax.tree.map(np.asarray, state.params)
        new, metrics = jax.jit(rl_lib.make_rl_step(s))(state, mb)
        out[k] = (metrics, jax.tree.map(lambda a, b: np.asarray(a) - b, new.params, before))
    (m1, d1), (m4, d4) = out[1], out[4]
    assert float(m1["clip_fraction"]) > 0  # the clip is exercised
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=0, atol=1e-6)
    for name in ("clip_fraction", "kl", "ratio_mean"):
        np.testing.assert_allclose(float(m4[name]), float(m1[name]), rtol=0, atol=1e-6)
    assert float(m1["kl"]) > 0  # the KL term (GRPO's, k3) is in the loss
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), d4, d1)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(d1)) > 1e-4  # it moved


def test_first_update_on_fresh_samples_is_reinforce_with_group_advantages(policy):
    """One update per rollout: the trainer's old log-probs are its own, every ratio is 1,
    nothing clips, and the gradient is REINFORCE's: -mean_i A_i mean_t grad log pi."""
    s = setup(_cfg(policy, **{"rl.kl_coef": 0.0}), jax.devices()[:1], group="rl")
    params = s.init_params()
    mb = _minibatch(s, params)
    prepared = jax.jit(rl_lib.make_prepare(s))(
        params, params, mb["rows"], np.asarray([[1, 0, 0, 1], [0, 0, 0, 1], [1, 1, 1, 1],
                                              [0, 1, 0, 0]], np.float32),
        np.ones(4, bool),
    )  # fmt: skip
    batch = {**{k: prepared[k] for k in ("old_logp", "adv", "mask")}, "rows": mb["rows"]}
    state = initial_state(s, params, 0)
    new, metrics = jax.jit(rl_lib.make_rl_step(s))(state, batch)
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics["clip_fraction"]) == 0.0
    # Group-normalised advantages of those rewards, by hand: (r - mean) / (std + 1e-6).
    by_hand = []
    for group in ([1, 0, 0, 1], [0, 0, 0, 1], [1, 1, 1, 1], [0, 1, 0, 0]):
        r = np.asarray(group, float)
        by_hand += list((r - r.mean()) / (r.std() + 1e-6))
    np.testing.assert_allclose(np.asarray(prepared["adv"]), by_hand, rtol=1e-5, atol=1e-6)
    m = mb["rows"]["loss_mask"]

    def reinforce(p):
        logp = masked_token_logprobs(s.policy_model, p, mb["rows"]).logps
        per_resp = jnp.sum(logp * m, -1) / m.sum(-1)
        return -jnp.mean(jnp.asarray(by_hand, jnp.float32) * per_resp)

    grads = jax.grad(reinforce)(params)
    lr = s.cfg.optimizer.lr  # SGD: the update is -lr * grad
    # atol: new - old in float32 is exact to about 1e-7 on weights of size about 1.
    jax.tree.map(
        lambda n, o, g: np.testing.assert_allclose(np.asarray(n) - np.asarray(o), -lr * g,
                                                   rtol=1e-4, atol=3e-7),
        new.params, params, grads,
    )  # fmt: skip


def test_dynamic_sampling_keeps_groups_whose_rewards_differ_and_shapes_overlong(policy):
    cfg = _cfg(policy, "dapo", **{"rl.max_sampling_rounds": 3, "rl.overlong_buffer": 2})
    s = setup(cfg, jax.devices()[:1], group="rl")
    from lm_align import data as data_lib

    src = data_lib.make_source(s.cfg.data, "train")
    tok = ByteTokenizer()
    # A verifier under which some groups agree: reward 1 iff the response has a "1".
    scorer = lambda prompts, responses: np.asarray([float("1" in r) for r in responses])
    sampler = rl_lib.Sampler(s, tok, scorer, src, rl_lib.PromptOrder(len(src), 4, 0))
    out = sampler.rollout(s.init_params(), 0)
    raw = np.asarray(scorer([], [r for g in out.responses for r in g])).reshape(4, 4)
    differ = raw.max(1) > raw.min(1)
    assert np.array_equal(out.valid, differ) or (out.valid.sum() == 4 and differ.all())
    assert out.stats["sampling_rounds"] >= 1
    lengths = out.rows["loss_mask"].sum(-1).reshape(4, 4)
    # Overlong shaping (max 4 tokens, buffer 2): -0 at <= 2 tokens, -0.5 at 3, -1 at 4.
    penalty = np.where(lengths <= 2, 0.0, np.where(lengths == 3, -0.5, -1.0))
    np.testing.assert_allclose(out.rewards, raw + penalty)


def test_prompt_order_resumes_and_draws_from_huge_sources():
    a = rl_lib.PromptOrder(40, 8, seed=1)
    first = [next(a) for _ in range(7)]
    assert sorted(np.concatenate(first[:5]).tolist()) == list(range(40))  # one epoch
    b = rl_lib.PromptOrder(40, 8, seed=1)
    b.set_state({"dealt": 3})
    assert np.array_equal(next(b), first[3])
    huge = rl_lib.PromptOrder(2**31 - 1, 8, seed=1)
    x = next(huge)
    assert x.shape == (8,) and x.max() < 2**31 - 1 and len(set(x.tolist())) == 8


def test_resume_inside_a_rollout_and_after_sigterm_repeats_the_losses(policy, tmp_path):
    """2 updates per rollout (2 epochs): a run stopped after step 5 (inside rollout 3) and
    resumed, and a run stopped by SIGTERM and resumed, log the uninterrupted run's losses."""
    over = ["rl.epochs=2", "train.steps=10", "train.checkpoint_every=1000"]
    straight = _rl_cli(policy, tmp_path / "straight", over)
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = losses(tmp_path / "straight")
    assert sorted(expected) == list(range(1, 11)) and len(set(expected.values())) > 5

    part = _rl_cli(policy, tmp_path / "part", [*over, "train.steps=5"])
    assert part.returncode == 0, part.stderr[-3000:]
    resumed = _rl_cli(policy, tmp_path / "part", over)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert losses(tmp_path / "part") == expected

    workdir = tmp_path / "sigterm"
    cmd = [sys.executable, "-m", "lm_align.cli", "rl", "--config",
           f"{policy['experiment']}:grpo", "--workdir", str(workdir),
           *[f"--config.{o}" for o in [*over, "train.steps=400"]]]  # fmt: skip
    rc, out = sigterm_after_rows(cmd, workdir / "metrics.jsonl", rows=3)
    assert rc == 0 and "SIGTERM: saved checkpoint at step" in out, out[-3000:]
    stopped = max(losses(workdir))
    assert stopped < 400
    again = _rl_cli(policy, workdir, [*over, "train.steps=400"][:-1] + ["train.steps=12"])
    assert again.returncode == 0, again.stderr[-3000:]
    got = losses(workdir)
    assert {k: got[k] for k in expected} == expected


SHARDING_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    from lm_align import config as config_lib
    from lm_align.align.rl import rl
    exp, root = sys.argv[1:3]
    for name, devs, mesh in (("one", jax.devices()[:1], ()),
                             ("many", jax.devices(), ("mesh.data=2", "mesh.fsdp=2",
                                                      "mesh.tensor=2"))):
        cfg = config_lib.apply_overrides(config_lib.load_config(exp),
                                         list(mesh))
        rl(cfg, f"{root}/{name}", devices=devs)
""")


def test_eight_devices_match_one(policy, tmp_path):
    """data 2 x fsdp 2 x tensor 2: the same samples (sharded decoding) and the same losses."""
    proc = subprocess.run(
        [sys.executable, "-c", SHARDING_SCRIPT, f"{policy['experiment']}:grpo", str(tmp_path)],
        env=env_with_devices(8), capture_output=True, text=True, timeout=900, cwd=REPO,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, many = losses(tmp_path / "one"), losses(tmp_path / "many")
    assert sorted(one) == sorted(many) == list(range(1, 9))
    assert len(set(one.values())) > 3  # it trained on rollouts that differ
    np.testing.assert_allclose([many[s] for s in one], [one[s] for s in one], rtol=1e-4,
                               atol=1e-6)  # fmt: skip


def test_lora_trains_adapters_against_the_base_as_reference(policy, tmp_path):
    cfg = _cfg(policy, **{"lora.rank": 4, "rl.kl_coef": 0.1, "train.steps": 3,
                          "optimizer.name": "adamw", "optimizer.lr": 1e-2})  # fmt: skip
    result = rl_lib.rl(cfg, str(tmp_path / "lora"), devices=jax.devices()[:1])
    rows = read_rows(tmp_path / "lora")
    first = next(r for r in rows if r["step"] == 1)
    assert first["kl"] == 0.0  # adapters start at B = 0: the policy is its reference
    assert any(r["kl"] > 0 for r in rows if r["step"] > 1)
    # The state holds the adapters only: an A and a B per target (rank 4), nothing else.
    leaves = jax.tree_util.tree_leaves_with_path(result.state.params)
    names = {jax.tree_util.keystr(p) for p, _ in leaves}
    assert names and all(n.endswith(("['A']", "['B']")) for n in names), sorted(names)[:5]
    assert all(4 in x.shape for _, x in leaves)
    # The finished run loads as its policy: the adapters merged into the base it trained on.
    from lm_align.align.setup import load_model

    model, loaded, _ = load_model(str(tmp_path / "lora"))
    s = setup(cfg, jax.devices()[:1], group="rl")
    merged = s.lora.merge(s.reference_params(), result.state.params)
    tokens = np.asarray([[1, 55, 43, 54, 61]], np.int32)
    np.testing.assert_allclose(
        np.asarray(model.apply(loaded, tokens)), np.asarray(model.apply(merged, tokens)),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"rl.advantage": "ppo"}, "rl.advantage='ppo'"),
        ({"rl.group_size": 1}, "rl.group_size=1"),
        ({"rl.minibatches": 3}, "rl.minibatches=3"),
        ({"train.grad_accum_steps": 3}, "train.grad_accum_steps=3"),
        ({"rl.scorer": "nope"}, "rl.scorer='nope'"),
        ({"rl.overlong_buffer": 4}, "rl.overlong_buffer=4"),
        ({"rl.max_len": 5}, "rl.max_len=5"),
        ({"rl.policy_checkpoint": "/nonexistent/run"}, "rl.policy_checkpoint"),
    ],
)
def test_bad_rl_config_is_rejected_early(policy, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        setup(_cfg(policy, **overrides), jax.devices()[:1], group="rl")


def test_recipes_log_the_documented_metrics(policy, tmp_path):
    """DAPO (dynamic sampling, token mean, clip-higher) and Dr. GRPO (constant normaliser):
    the recipes whose paths the other tests here (all GRPO) do not take; RLOO differs
    from GRPO by its advantage only (tests/test_rl_losses.py)."""
    for algorithm in ("dapo", "dr_grpo"):
        cfg = _cfg(policy, algorithm, **{"train.steps": 2})
        rl_lib.rl(cfg, str(tmp_path / algorithm), devices=jax.devices()[:1])
        row = read_rows(tmp_path / algorithm)[-1]
        for key in (
            "loss",
            "reward",
            "pass_rate",
            "clip_fraction",
            "kl",
            "entropy",
            "ratio_mean",
            "response_length",
            "degenerate_groups",
            "grad_norm",
            "lr",
        ):
            assert key in row and np.isfinite(row[key]), (algorithm, key, row)
        assert 0 < row["entropy"] < np.log(259) and 1 <= row["response_length"] <= 4
        assert row["kl"] > 0  # measured after an update, with or without a KL term
