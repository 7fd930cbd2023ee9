"""Reward model: a Transformer backbone with a scalar head on the last real token.

    rm = RewardModel(TransformerConfig(...))
    params = rm.from_policy(policy_params)          # or rm.init(seed); head w = 0, b = 0
    r_B = rm.rewards(params, to_batch(pairs, "byte", max_len)["chosen"])
    pairwise_accuracy(rm, params, batch)            # rm_accuracy, rm_margin, rm_loss
    score(rm, params, "byte", prompts, responses, max_len=32)   # np.ndarray [N]

Shape suffixes: B rows, L tokens per row, D model dim.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm_align import parallel
from lm_align.align.reward import (
    RewardModel,
    pairwise_accuracy,
    reward_model_scorer,
    score,
)
from lm_align.data.preference import ListwiseRecord, PairwiseRecord, to_batch
from lm_align.losses.preference import bradley_terry
from lm_align.models import TransformerConfig
from lm_align.models.pure import PureModel

CFG = TransformerConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=2, d_ff=64)
RM = RewardModel(CFG)
PARAMS = RM.init(0)
rewards = jax.jit(RM.rewards)  # one compile per row shape; most tests share [3, 16]
metrics = jax.jit(lambda params, batch: pairwise_accuracy(RM, params, batch))
PAIRS = [
    PairwiseRecord(prompt="12+3=", chosen="15", rejected="16"),
    PairwiseRecord(prompt="7*8=", chosen="56", rejected="5"),
    PairwiseRecord(prompt="Colour:", chosen="blue", rejected="a dog"),
]


def with_head(params, seed=1, bias=0.3):
    """`params` with a random non-zero head w ~ N(0, 1) [D] and b = `bias`."""
    w_D = np.random.default_rng(seed).standard_normal(CFG.d_model).astype(np.float32)
    return {"backbone": params["backbone"], "head": {"w": jnp.asarray(w_D), "b": jnp.float32(bias)}}


HEADED = with_head(PARAMS)


def test_reward_does_not_depend_on_padding_or_on_the_other_rows():
    short = rewards(HEADED, to_batch(PAIRS, "byte", max_len=16)["chosen"])
    long = rewards(HEADED, to_batch(PAIRS, "byte", max_len=32)["chosen"])
    assert short.shape == (3,) and short.dtype == jnp.float32
    np.testing.assert_allclose(long, short, rtol=1e-5)
    others = [PairwiseRecord("9-9=", "0", "1"), PAIRS[1], PairwiseRecord("Hi", "hello", "no")]
    mixed = rewards(HEADED, to_batch(others, "byte", max_len=16)["chosen"])
    np.testing.assert_allclose(mixed[1], short[1], rtol=1e-5)
    # Listwise rows [B, K, L] keep their leading shape; a padding response scores 0.
    lists = [ListwiseRecord("12+3=", ["15", "16"], np.array([1.0, 0.0]))]
    listwise = rewards(HEADED, to_batch(lists, "byte", max_len=16, num_responses=3)["responses"])
    assert listwise.shape == (1, 3)
    np.testing.assert_allclose(listwise[0, 0], short[0], rtol=1e-5)
    assert float(listwise[0, 2]) == 0.0


def test_reward_reads_the_last_real_token():
    rows = to_batch(PAIRS, "byte", max_len=16)["chosen"]
    base = np.asarray(rewards(HEADED, rows))
    last_B = rows["segment_ids"].sum(-1) - 1  # right padding: last real input position
    in_padding = dict(rows, inputs=rows["inputs"].copy())
    in_padding["inputs"][np.arange(3), last_B + 1] = 77  # tokens after the last real one
    np.testing.assert_allclose(rewards(HEADED, in_padding), base, rtol=1e-6)
    last_changed = dict(rows, inputs=rows["inputs"].copy())
    last_changed["inputs"][np.arange(3), last_B] = 77
    changed = np.asarray(rewards(HEADED, last_changed))
    assert np.all(np.abs(changed - base) > 1e-4), (changed, base)


def test_reward_is_the_last_hidden_state_dotted_with_the_head():
    rows = to_batch(PAIRS, "byte", max_len=16)["rejected"]
    backbone = PureModel(CFG)  # the backbone alone, built independently of RM
    hidden_BLD = jax.jit(
        lambda params, rows: backbone.apply(
            params,
            rows["inputs"],
            positions_BL=rows["positions"],
            segment_ids_BL=rows["segment_ids"],
            return_hidden=True,
        )
    )(PARAMS["backbone"], rows)
    hidden_BLD = np.asarray(hidden_BLD, np.float64)
    w_D, b = np.asarray(HEADED["head"]["w"], np.float64), 0.3
    # Rows are [bos] + prompt + response: the last input is the response's last token.
    lengths_B = [1 + len(r.prompt) + len(r.rejected) for r in PAIRS]
    expected_B = [hidden_BLD[i, n - 1] @ w_D + b for i, n in enumerate(lengths_B)]
    np.testing.assert_allclose(rewards(HEADED, rows), expected_B, rtol=1e-5, atol=1e-6)


def test_from_policy_keeps_the_backbone_and_starts_every_reward_at_zero():
    policy = jax.tree.map(lambda x: 1.5 * np.asarray(x), PARAMS["backbone"])  # any policy
    params = RM.from_policy(policy)
    jax.tree.map(np.testing.assert_array_equal, params["backbone"], policy)
    batch = to_batch(PAIRS, "byte", max_len=16)
    np.testing.assert_array_equal(rewards(params, batch["chosen"]), np.zeros(3))
    np.testing.assert_array_equal(rewards(params, batch["rejected"]), np.zeros(3))
    wider = PureModel(TransformerConfig(d_model=64, n_layers=2, n_heads=2, d_ff=64))
    with pytest.raises(ValueError, match="TransformerConfig"):
        RM.from_policy(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), wider.abstract_params))


def test_parameter_trees_match_the_params():
    assert jax.tree.structure(PARAMS) == jax.tree.structure(RM.abstract_params)
    for p, a in zip(jax.tree.leaves(PARAMS), jax.tree.leaves(RM.abstract_params), strict=True):
        assert p.shape == a.shape and p.dtype == a.dtype
    assert RM.logical_axes["head"] == {"w": ("embed",), "b": ()}
    assert RM.num_params() == sum(x.size for x in jax.tree.leaves(PARAMS))
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    shardings = parallel.logical_to_sharding(RM.logical_axes, RM.abstract_params, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(PARAMS)


WORDS = ["cat", "dog", "sun", "tree", "fish", "bird", "cake", "rock", "milk", "moon", "star"]


def feature_pairs(seed, n):
    """Pairs that differ only in "good" (chosen) vs "bad" (rejected) mid-response;
    both end with the same word, so the last token alone cannot tell them apart."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        prompt = f"{rng.choice(WORDS)} {rng.choice(WORDS)}?"
        subject, tail = rng.choice(WORDS), rng.choice(WORDS)
        pairs.append(
            PairwiseRecord(prompt, f"{subject} is good, {tail}", f"{subject} is bad, {tail}")
        )
    return pairs


def test_bradley_terry_training_learns_a_preference_that_generalises():
    train = to_batch(feature_pairs(0, 64), "byte", max_len=32)
    held_out = to_batch(feature_pairs(1, 64), "byte", max_len=32)
    train = {k: train[k] for k in ("chosen", "rejected")}
    held_out = {k: held_out[k] for k in ("chosen", "rejected")}
    tx = optax.adam(3e-3)

    def loss_fn(params, batch):
        r_w_B = RM.rewards(params, batch["chosen"])
        r_l_B = RM.rewards(params, batch["rejected"])
        return jnp.mean(bradley_terry(r_w_B, r_l_B))

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = PARAMS
    before = metrics(params, held_out)
    assert float(before["rm_accuracy"]) == 0.5  # zero head: every pair a tie, a coin flip each
    np.testing.assert_allclose(before["rm_loss"], np.log(2.0), rtol=1e-6)
    opt_state = tx.init(params)
    for _ in range(30):
        params, opt_state = step(params, opt_state, train)
    after = metrics(params, held_out)
    assert float(after["rm_accuracy"]) > 0.9, after
    assert float(after["rm_margin"]) > 1.0
    assert float(after["rm_loss"]) < 0.5 * np.log(2.0)
    # The metrics agree with their definitions on the rewards.
    r_w_B = np.asarray(rewards(params, held_out["chosen"]), np.float64)
    r_l_B = np.asarray(rewards(params, held_out["rejected"]), np.float64)
    np.testing.assert_allclose(after["rm_accuracy"], np.mean(r_w_B > r_l_B), rtol=1e-6)
    np.testing.assert_allclose(after["rm_margin"], np.mean(r_w_B - r_l_B), rtol=1e-4)
    np.testing.assert_allclose(
        after["rm_loss"], np.mean(np.log1p(np.exp(-(r_w_B - r_l_B)))), rtol=1e-4, atol=1e-6
    )


def test_score_matches_rewards_on_the_same_rows_for_any_n():
    prompts = [p.prompt for p in PAIRS]
    responses = [p.chosen for p in PAIRS]
    expected = np.asarray(rewards(HEADED, to_batch(PAIRS, "byte", max_len=16)["chosen"]))
    # 3 pairs in batches of 2: the second batch is filled with a padding row.
    scores = score(RM, HEADED, "byte", prompts, responses, max_len=16, batch_size=2)
    assert scores.shape == (3,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    scorer = reward_model_scorer(RM, HEADED, "byte", max_len=16, batch_size=2)
    np.testing.assert_allclose(scorer(prompts[::-1], responses[::-1]), expected[::-1], rtol=1e-5)
    assert score(RM, HEADED, "byte", [], [], max_len=16).shape == (0,)


def test_bad_inputs_raise_naming_the_problem():
    with pytest.raises(ValueError, match="2 prompts and 1 responses"):
        score(RM, PARAMS, "byte", ["a", "b"], ["x"], max_len=16)
    rows = to_batch(PAIRS, "byte", max_len=16)["chosen"]
    no_segments = {k: v for k, v in rows.items() if k != "segment_ids"}
    with pytest.raises(ValueError, match="segment_ids"):
        RM.rewards(PARAMS, no_segments)
    with pytest.raises(ValueError, match="rejected"):
        pairwise_accuracy(RM, PARAMS, {"chosen": rows})
