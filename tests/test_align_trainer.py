"""The preference trainer: objectives, batch order, sharding, resume, reward model, errors."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lm_align.align import batches, objectives, trainer
from lm_align.align import setup as align_setup
from lm_align.align.config import ALIGN_DEFAULTS, align_base_config
from lm_align.config import ConfigError
from tests.helpers import REPO, env_with_devices, sigterm_after_rows

EXPERIMENT = textwrap.dedent("""
    from lm_align.align.config import align_base_config

    def get_config(arg=None):
        cfg = align_base_config()
        cfg.align.loss = arg or "dpo"
        cfg.align.train_file = {train!r}
        cfg.align.eval_file = {eval!r}
        cfg.align.max_len = 16
        cfg.align.eval_prompts = 4
        cfg.align.eval_max_new_tokens = 3
        cfg.align.eval_scorer = "arithmetic_exact"
        cfg.model.d_model = 32
        cfg.model.n_layers = 2
        cfg.model.n_heads = 2
        cfg.model.d_ff = 64
        cfg.model.vocab_size = 260
        cfg.train.steps = 12
        cfg.train.batch_size = 8
        cfg.train.log_every = 1
        cfg.train.eval_every = 0
        cfg.train.checkpoint_every = 1000
        cfg.train.answer_eval_examples = 4
        cfg.train.answer_max_new_tokens = 3
        cfg.train.progress = False
        cfg.train.tensorboard = False
        cfg.optimizer.lr = 3e-3
        cfg.optimizer.warmup_steps = 2
        cfg.data.source = "arithmetic"
        return cfg
""")


def _write_data(root, n=40):
    rng = np.random.default_rng(0)
    pairs, lists, samples = [], [], []
    for i in range(n):
        a, b = int(rng.integers(10, 99)), int(rng.integers(10, 99))
        prompt, good = f"{a}+{b}=", str(a + b)
        pairs.append({"prompt": prompt, "chosen": good, "rejected": str(a + b + 1 + i % 3)})
        lists.append(
            {
                "prompt": prompt,
                "responses": [good, str(a + b + 1), str(a - b), "x"],
                "labels": [1.0, 0.6, 0.2, 0.0],
            }
        )
        # Sampled responses with verifier rewards (repeats kept), for policy-gradient losses.
        wrong = [str(a + b + 1), str(a + b - 10)]
        responses = [good if (i + k) % 3 == 0 else wrong[k % 2] for k in range(4)]
        samples.append({"prompt": prompt, "responses": responses,
                        "rewards": [float(r == good) for r in responses]})  # fmt: skip
    for name, records in (("pairs", pairs), ("lists", lists), ("samples", samples)):
        with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    _write_data(root)
    path = root / "exp.py"
    path.write_text(
        EXPERIMENT.format(train=str(root / "pairs.jsonl"), eval=str(root / "pairs.jsonl"))
    )
    lists = root / "exp_lists.py"
    lists.write_text(
        EXPERIMENT.format(train=str(root / "lists.jsonl"), eval=str(root / "lists.jsonl"))
    )
    samples = root / "exp_samples.py"
    samples.write_text(
        EXPERIMENT.format(train=str(root / "samples.jsonl"), eval=str(root / "samples.jsonl"))
    )
    return {"pairs": str(path), "lists": str(lists), "samples": str(samples), "root": root}


def _cli(config, workdir, overrides=(), devices=1, **kw):
    return subprocess.run(
        [
            sys.executable, "-m", "lm_align.cli", "align", "--config", config,
            "--workdir", str(workdir), *[f"--config.{o}" for o in overrides],
        ],
        env=env_with_devices(devices), capture_output=True, text=True, timeout=600, cwd=REPO, **kw,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Objectives against the loss functions and closed forms.


def _align(**kw):
    return ml_collections.ConfigDict({**ALIGN_DEFAULTS, **kw})


def _pair_batch(p=None):
    B = 3
    labels = np.stack([np.ones(B), np.zeros(B)], 1) if p is None else np.stack([p, 1 - p], 1)
    return {
        "labels": jnp.asarray(labels, jnp.float32),
        "mask": jnp.ones((B, 2), bool),
        "soft_label": jnp.asarray(np.ones(B) if p is None else p, jnp.float32),
        "lengths": jnp.asarray([[2.0, 3.0], [1.0, 1.0], [4.0, 2.0]]),
    }


POLICY = jnp.asarray([[-3.0, -5.0], [-2.0, -1.0], [-7.0, -7.5]])
REF = jnp.asarray([[-4.0, -4.0], [-2.5, -1.5], [-6.0, -8.0]])


def test_pairwise_objectives_are_the_losses():
    b = _pair_batch()
    loss, m = objectives.objective(_align(loss="dpo", beta=0.2), POLICY, REF, b)
    # h = rho_w - rho_l per pair: (1 - (-1)) = 2, (0.5 - 0.5) = 0, (-1 - 0.5) = -1.5;
    # DPO = -log sigmoid(beta * h) = log(1 + exp(-beta * h)).
    np.testing.assert_allclose(loss, np.log1p(np.exp(-0.2 * np.array([2.0, 0.0, -1.5]))), rtol=1e-6)
    np.testing.assert_allclose(m["reward_margin"], [0.4, 0.0, -0.3], atol=1e-6)
    np.testing.assert_allclose(m["reward_accuracy"], [1.0, 0.5, 0.0])  # a tie counts 0.5
    np.testing.assert_allclose(m["reward_chosen"], [0.2, 0.1, -0.2], atol=1e-6)

    loss, _ = objectives.objective(
        _align(loss="slic", margin=1.0, slic_reg_weight=0.5), POLICY, REF, b
    )
    # max(0, 1 - lp_w + lp_l) + 0.5 * -lp_w
    want = [max(0, 1 - 2) + 1.5, max(0, 1 - (-1)) + 1.0, max(0, 1 - 0.5) + 3.5]
    np.testing.assert_allclose(loss, want, rtol=1e-6)

    loss, _ = objectives.objective(
        _align(loss="ipo", beta=0.5, ipo_length_normalized=True), POLICY, REF, b
    )
    # rho / length: (1/2 - (-1)/3), (0.5/1 - 0.5/1), (-1/4 - 0.5/2); target 1/(2 beta) = 1
    h = np.array([0.5 + 1 / 3, 0.0, -0.25 - 0.25])
    np.testing.assert_allclose(loss, (h - 1.0) ** 2, rtol=1e-5)


def test_pair_logistic_on_pairs_equals_dpo_and_geometric_half_is_log2():
    b = _pair_batch()
    dpo, _ = objectives.objective(_align(loss="dpo", beta=0.1), POLICY, REF, b)
    pl, _ = objectives.objective(_align(loss="pair_logistic", beta=0.1), POLICY, REF, b)
    np.testing.assert_allclose(pl, dpo, rtol=1e-6)
    half = _pair_batch(p=np.full(3, 0.5))
    geo, _ = objectives.objective(_align(loss="geometric_dpo", beta=0.1), POLICY, REF, half)
    np.testing.assert_allclose(geo, np.log(2.0) * np.ones(3), rtol=1e-6)


def test_reward_loss_ignores_the_reference():
    b = _pair_batch()
    loss, m = objectives.objective(_align(loss="bradley_terry", reward_centering=0.1), POLICY, REF, b)
    r_w, r_l = np.asarray(POLICY[:, 0]), np.asarray(POLICY[:, 1])
    want = np.log1p(np.exp(-(r_w - r_l))) + 0.1 * (r_w + r_l) ** 2
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["reward_accuracy"], [1.0, 0.0, 1.0])


def test_listwise_metrics_count_label_ordered_pairs():
    s = jnp.asarray([[3.0, 1.0, 2.0]]) / 0.1  # beta 0.1 on rho = s
    b = {
        "labels": jnp.asarray([[1.0, 0.5, 0.0]]),
        "mask": jnp.asarray([[True, True, True]]),
    }
    _, m = objectives.objective(_align(loss="list_mle", beta=0.1), s, jnp.zeros_like(s), b)
    # Pairs (0>1): 3>1 yes, (0>2): 3>2 yes, (1>2): 1>2 no.
    np.testing.assert_allclose(m["reward_accuracy"], [2 / 3], rtol=1e-6)
    np.testing.assert_allclose(m["reward_margin"], [(2 + 1 - 1) / 3], rtol=1e-5)


# ---------------------------------------------------------------------------
# Batch order.


def test_batch_order_resumes_and_shards():
    whole = batches.BatchOrder(10, 4, seed=3, shard_index=0, shard_count=1)
    seq = [next(whole).tolist() for _ in range(5)]
    for batch in seq[:2]:  # one epoch = 2 batches, without repeats
        assert len(set(batch)) == 4
    assert not set(seq[0]) & set(seq[1])
    again = batches.BatchOrder(10, 4, seed=3, shard_index=0, shard_count=1)
    for _ in range(3):
        next(again)
    state = again.get_state()
    resumed = batches.BatchOrder(10, 4, seed=3, shard_index=0, shard_count=1)
    resumed.set_state(state)
    assert [next(resumed).tolist() for _ in range(2)] == seq[3:5]
    halves = [batches.BatchOrder(10, 4, seed=3, shard_index=i, shard_count=2) for i in (0, 1)]
    for batch in seq:
        assert np.concatenate([next(h) for h in halves]).tolist() == batch
    with pytest.raises(ConfigError, match="only 3 records"):
        batches.BatchOrder(3, 4, seed=0, shard_index=0, shard_count=1)


# ---------------------------------------------------------------------------
# Runs.


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir):
    """{step: training loss} (the step-0 row holds only the starting policy's eval)."""
    return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


SHARDING_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from lm_align import config as config_lib
    from lm_align.align.trainer import align
    config, root, names, *extra = sys.argv[1:]
    devs = jax.devices()
    assert len(devs) == 8, devs
    for loss in names.split(","):
        base = config_lib.load_config(config + ":" + loss)
        base = config_lib.apply_overrides(
            base, ["align.eval_prompts=0", "train.answer_eval_examples=0", "train.steps=8",
                   *extra])
        align(config_lib.apply_overrides(base, ["mesh.data=1"]), f"{root}/{loss}/one",
              devices=devs[:1])
        align(config_lib.apply_overrides(base, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
              f"{root}/{loss}/many", devices=devs)
""")


# Adam's first updates are lr * g / (|g| + eps): a gradient entry near 0 moves by up to lr
# whatever its size, so float noise between device layouts (1e-6 relative) grows over the
# steps. The policy-gradient run uses SGD, whose update is proportional to the gradient.
SGD = ["optimizer.name=sgd", "optimizer.lr=0.05"]


def _random_scores(kind: str, rng) -> objectives.Scores:
    B, K = 6, 2 if kind in ("pairwise", "reward") else 4
    mask = np.ones((B, K), bool)
    if K > 2:  # ragged lists
        mask[1, -1] = mask[4, -2:] = False
    if kind == "policy_gradient":
        labels = (rng.random((B, K)) > 0.5).astype(np.float32)
    else:
        labels = rng.random((B, K)).astype(np.float32)
    batch = {"labels": jnp.asarray(labels), "mask": jnp.asarray(mask),
             "lengths": jnp.asarray(rng.integers(1, 5, (B, K)).astype(np.float32)),
             "soft_label": jnp.asarray(rng.uniform(0.5, 1.0, B).astype(np.float32))}  # fmt: skip
    return objectives.Scores(
        policy=jnp.asarray(rng.normal(-3, 1, (B, K)).astype(np.float32)),
        reference=jnp.asarray(rng.normal(-3, 1, (B, K)).astype(np.float32)),
        batch=batch, beta=0.5,
    )  # fmt: skip


def _take(s: objectives.Scores, index) -> objectives.Scores:
    return objectives.Scores(s.policy[index], s.reference[index],
                             {k: v[index] for k, v in s.batch.items()}, s.beta)  # fmt: skip


@pytest.mark.parametrize("name", list(objectives.OBJECTIVES))
def test_every_objective_is_per_example(name):
    """Each record's loss depends on that record alone: sub-batches give the full batch's
    values. The trainer shards only the batch and averages the [B] losses, so with the
    1-vs-8-device runs below (one loss per data layout) this extends their check to every
    objective."""
    objective = objectives.OBJECTIVES[name]
    a = ml_collections.ConfigDict({**ALIGN_DEFAULTS, "reward_centering": 0.1,
                                   "ipo_length_normalized": True})  # fmt: skip
    s = _random_scores(objective.kind, np.random.default_rng(0))
    full = np.asarray(objective.fn(a, s))
    assert full.shape == (6,) and np.all(np.isfinite(full)), full
    for index in ([0], [5], [1, 4], [3, 0, 2], [5, 1, 4, 2]):
        part = np.asarray(objective.fn(a, _take(s, np.asarray(index))))
        np.testing.assert_allclose(part, full[index], rtol=1e-6, atol=1e-7, err_msg=str(index))


@pytest.mark.parametrize(
    "names,fmt,optimizer",
    [
        pytest.param("dpo", "pairs", [], id="dpo-pairs"),
        pytest.param("lipo_lambda", "lists", [], id="lipo_lambda-lists"),
        pytest.param("bon_rlb", "samples", SGD, id="bon_rlb-samples"),
    ],
)  # fmt: skip
def test_eight_devices_match_one(experiment, tmp_path, names, fmt, optimizer):
    """1 device and 8 (data 2 x fsdp 2 x tensor 2) train on the same batches to the same
    per-step losses, loss by loss (LiPO-lambda with every list's scores tied at
    initialisation, where float rounding must not reorder the list)."""
    proc = subprocess.run(
        [sys.executable, "-c", SHARDING_SCRIPT, experiment[fmt], str(tmp_path), names,
         *optimizer],
        env=env_with_devices(8), capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    for loss in names.split(","):
        one, many = losses(tmp_path / loss / "one"), losses(tmp_path / loss / "many")
        assert sorted(one) == sorted(many) == list(range(1, 9)), loss
        assert one[1] != one[8], loss  # it trained
        np.testing.assert_allclose(
            [many[s] for s in one], [one[s] for s in one], rtol=1e-5, err_msg=loss
        )


def test_sigterm_then_resume_is_exact(experiment, tmp_path):
    overrides = ["train.steps=40", "align.eval_prompts=0", "train.answer_eval_examples=0"]
    straight = _cli(experiment["pairs"], tmp_path / "straight", overrides)
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = losses(tmp_path / "straight")

    workdir = tmp_path / "interrupted"
    cmd = [
        sys.executable, "-m", "lm_align.cli", "align", "--config", experiment["pairs"],
        "--workdir", str(workdir), *[f"--config.{o}" for o in overrides],
    ]  # fmt: skip
    rc, out = sigterm_after_rows(cmd, workdir / "metrics.jsonl")
    assert rc == 0, out
    assert "SIGTERM: saved checkpoint at step" in out
    stopped_at = max(losses(workdir))
    assert 3 <= stopped_at < 40, f"stopped at {stopped_at}; make the run longer"

    resumed = _cli(experiment["pairs"], workdir, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert "reference log-probs: loaded" in resumed.stdout
    assert losses(workdir) == expected  # bitwise: JSON floats round-trip exactly


def test_dpo_from_checkpoint_logs_documented_metrics(experiment, tmp_path):
    """A policy from a checkpoint, DPO on it, the eval metrics; then a reward model on the pairs."""
    sft = tmp_path / "sft"
    proc = _cli(experiment["pairs"], sft, ["train.steps=6", "align.loss=slic"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _cli(
        experiment["pairs"], tmp_path / "dpo",
        [f"align.policy_checkpoint={sft}", "model.d_model=64"],  # ignored: taken from sft
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"starting from {sft}" in proc.stdout
    rows = _rows(tmp_path / "dpo")
    start = rows[0]
    assert start["step"] == 0
    assert abs(start["eval_kl"]) < 1e-4  # the policy is its reference
    assert start["eval_reward_accuracy"] == 0.5 and abs(start["eval_loss"] - np.log(2)) < 1e-5
    final = rows[-1]
    for key in (
        "loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected",
        "grad_norm", "lr", "eval_loss", "eval_reward_accuracy", "eval_kl",
        "eval_response_length", "eval_sample_reward", "eval_answer_exact_match",
    ):  # fmt: skip
        assert key in final, key
    assert final["eval_loss"] < start["eval_loss"]
    assert final["eval_reward_accuracy"] > 0.5

    # A reward model initialised from the same policy, trained on the pairs.
    proc = _cli(
        experiment["pairs"], tmp_path / "rm",
        [f"align.policy_checkpoint={sft}", "align.loss=bradley_terry", "train.steps=30"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "rm")
    assert rows[0]["eval_reward_accuracy"] == 0.5  # zero head: every pair ties
    assert rows[-1]["eval_reward_accuracy"] > 0.6
    from lm_align.align.reward import RewardModel

    model, params, _ = align_setup.load_model(str(tmp_path / "rm"))
    assert isinstance(model, RewardModel)

    # The reward model as eval's best-of-k selector: bon@k <= pass@k (a selected sample is
    # correct only where some sample is), and bon@k of the selector differs from pass@1's mean.
    from lm_align.cli import main

    out = tmp_path / "eval.json"
    argv = ["eval", "--policy", str(sft), "--selector", str(tmp_path / "rm"), "--num-prompts",
            "8", "--num-samples", "4", "--ks", "1,4", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert 0.0 <= report["bon@4"] <= report["pass@4"] + 1e-9


# ---------------------------------------------------------------------------
# Config errors.


def _cfg(**align):
    cfg = align_base_config()
    cfg.align.update(align)
    return cfg


@pytest.mark.parametrize(
    "align,message",
    [
        ({"loss": "kto", "train_file": "x"}, "align.loss='kto'"),
        ({"loss": "dpo", "format": "listwise", "train_file": "x"}, "is pairwise"),
        ({"loss": "dpo"}, "align.train_file is empty"),
        ({"train_file": "x", "beta": 0.0}, "align.beta=0.0 must be > 0"),
        ({"train_file": "x", "policy_checkpoint": "/nonexistent/run"}, "no checkpoint at"),
        ({"train_file": "x", "eval_scorer": "oracle"}, "align.eval_scorer='oracle'"),
    ],
)
def test_bad_align_config_is_rejected_early(align, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        align_setup.setup(_cfg(**align))


def test_reference_in_every_step_equals_precomputed(experiment, tmp_path):
    common = ["align.eval_prompts=0", "train.answer_eval_examples=0", "train.steps=8"]
    pre = _cli(experiment["pairs"], tmp_path / "pre", common)
    online = _cli(
        experiment["pairs"], tmp_path / "online", common + ["align.precompute_reference=false"]
    )
    assert pre.returncode == 0 and online.returncode == 0, online.stderr[-3000:]
    assert "reference log-probs: computed" in pre.stdout
    assert "reference log-probs" not in online.stdout
    a, b = losses(tmp_path / "pre"), losses(tmp_path / "online")
    assert abs(a[1] - np.log(2)) < 1e-4  # step 1: the policy is the reference
    np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)], rtol=1e-5)


@pytest.mark.slow  # the matmul-peak measurement takes a while on 2 cores
def test_bench_of_a_dpo_step_counts_the_reference_forward():
    from lm_align import config as config_lib
    from lm_align.bench import run_align_bench

    cfg = align_base_config()
    cfg.model.update(d_model=32, n_layers=1, n_heads=2, d_ff=64, vocab_size=260)
    cfg.train.batch_size = 4
    cfg.align.max_len = 16
    online = run_align_bench(
        config_lib.apply_overrides(cfg, ["align.precompute_reference=false"]), steps=1, warmup=1
    )
    stored = run_align_bench(cfg, steps=1, warmup=0)
    assert online["tokens_per_s"] == pytest.approx(4 * 2 * 16 / online["step_time_s"])
    assert online["flops_per_token"] == pytest.approx(stored["flops_per_token"] * 4 / 3)
    assert 0 < online["mfu"] and np.isfinite(online["loss"]) and np.isfinite(stored["loss"])


def test_nll_weight_adds_the_per_token_nll_of_the_best_response():
    b = _pair_batch()
    plain, _ = objectives.objective(_align(loss="dpo"), POLICY, REF, b)
    anchored, m = objectives.objective(_align(loss="dpo", nll_weight=0.5), POLICY, REF, b)
    nll = -np.asarray(POLICY[:, 0]) / np.asarray(b["lengths"][:, 0])  # chosen: column 0
    np.testing.assert_allclose(m["nll"], nll, rtol=1e-6)
    np.testing.assert_allclose(anchored, np.asarray(plain) + 0.5 * nll, rtol=1e-6)
    # Lists: the best-labelled response, wherever it stands.
    lists = {**b, "labels": jnp.asarray([[0.0, 1.0]] * 3)}
    _, m = objectives.objective(_align(loss="list_mle", nll_weight=1.0), POLICY, REF, lists)
    np.testing.assert_allclose(m["nll"], -np.asarray(POLICY[:, 1]) / np.asarray(b["lengths"][:, 1]))


def test_per_layer_eps_reaches_the_preference_optimizer():
    """`lm-align align` builds its optimizer like `lm-align train`: with eps >> |g|, Adam's
    step 1 moves each parameter by lr_l * g / (|g| + eps_l), eps_l from the parameterization."""
    from lm_align import parameterization as P

    from lm_align.config import apply_overrides

    width, base = 64, 16
    cfg = apply_overrides(_cfg(train_file="x"), [
        f"model.d_model={width}", "model.n_heads=8", f"model.d_ff={4 * width}",
        "model.n_layers=1", "optimizer.name=adam", "optimizer.lr=1.0", "optimizer.eps=1e3",
        "optimizer.warmup_steps=0", "optimizer.schedule=constant",
        "optimizer.weight_decay=0", "optimizer.clip_norm=0",
        "param.name=mup", f"param.base_width={base}", "param.per_layer_eps=true",
    ])  # fmt: skip
    s = align_setup.setup(cfg)
    params = s.init_params()
    g = 1e-3
    grads = jax.tree.map(lambda p: jnp.full(p.shape, g, p.dtype), params)
    updates, _ = s.tx.update(grads, s.tx.init(params), params)
    qkv = np.asarray(updates["blocks"]["attn"]["qkv"] if "attn" in updates["blocks"]
                     else updates["blocks"][0]["attn"]["qkv"])  # fmt: skip
    p = align_setup.make_parameterization(s.cfg, s.policy_model.cfg)
    eps_l = 1e3 * (width / base) ** (-P.table_exponents("mup", "adam", "full").hidden.g)
    assert eps_l != 1e3  # the per-layer epsilon differs from the global one
    np.testing.assert_allclose(-qkv, p.lr_scale("hidden") * g / (g + eps_l), rtol=1e-4)
