"""Sequence log-probs of (prompt, completion) rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_align.align import sequence_logprobs
from lm_align.data.preference import ListwiseRecord, PairwiseRecord, to_batch
from lm_align.losses.lm import lm_loss
from lm_align.models import TransformerConfig
from lm_align.models.pure import PureModel

MODEL = PureModel(TransformerConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64))
PARAMS = MODEL.init(0)
PAIRS = [
    PairwiseRecord(prompt="12+3=", chosen="15", rejected="16"),
    PairwiseRecord(prompt="7*8=", chosen="56", rejected="5"),
]


def test_sum_of_masked_token_logprobs_matches_the_lm_loss():
    rows = to_batch(PAIRS, "byte", max_len=16)["chosen"]
    out = sequence_logprobs(MODEL, PARAMS, rows)
    # Completion "15" + eos: 3 targets; "56" + eos: 3.
    np.testing.assert_array_equal(out.lengths, [3.0, 3.0])
    for i in range(len(PAIRS)):
        row = {k: jnp.asarray(v[i : i + 1]) for k, v in rows.items()}
        logits = MODEL.apply(
            PARAMS, row["inputs"], positions_BL=row["positions"], segment_ids_BL=row["segment_ids"]
        )
        ce = lm_loss(logits, row["targets"], row["loss_mask"]).ce  # mean -log p over the mask
        np.testing.assert_allclose(out.logps[i], -float(ce) * 3, rtol=1e-5)
    assert np.all(np.asarray(out.logps) < 0)


def test_padding_length_does_not_change_the_logprobs():
    short = sequence_logprobs(MODEL, PARAMS, to_batch(PAIRS, "byte", max_len=12)["rejected"])
    long = sequence_logprobs(MODEL, PARAMS, to_batch(PAIRS, "byte", max_len=40)["rejected"])
    np.testing.assert_allclose(short.logps, long.logps, rtol=1e-5)
    np.testing.assert_array_equal(short.lengths, long.lengths)


def test_listwise_rows_keep_their_leading_shape():
    lists = [
        ListwiseRecord(prompt="1+1=", responses=["2", "3", "11"], labels=[1.0, 0.0, 0.0]),
        ListwiseRecord(prompt="2+2=", responses=["4", "5"], labels=[1.0, 0.0]),
    ]
    batch = to_batch(lists, "byte", max_len=12)
    out = sequence_logprobs(MODEL, PARAMS, batch["responses"])
    assert out.logps.shape == (2, 3)
    # The padding response of the second list has no targets.
    assert float(out.lengths[1, 2]) == 0.0 and float(out.logps[1, 2]) == 0.0
    single = sequence_logprobs(MODEL, PARAMS, to_batch(lists[:1], "byte", max_len=12)["responses"])
    np.testing.assert_allclose(out.logps[0], single.logps[0], rtol=1e-5)


def test_gradient_flows_to_the_params_only_through_masked_targets():
    rows = to_batch(PAIRS[:1], "byte", max_len=16)["chosen"]
    zero = dict(rows, loss_mask=np.zeros_like(rows["loss_mask"]))
    grads = jax.grad(lambda p: sequence_logprobs(MODEL, p, zero).logps.sum())(PARAMS)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    # With the completion's targets in the mask, every parameter gets a gradient.
    grads = jax.grad(lambda p: sequence_logprobs(MODEL, p, rows).logps.sum())(PARAMS)
    assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads))


def test_missing_keys_are_named():
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_logprobs(MODEL, PARAMS, {"inputs": np.zeros((1, 4), np.int32)})


@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_chunked_readout_equals_full_logits_in_value_and_gradient(softcap):
    """chunks=4 (rematerialised per chunk) vs chunks=1 (one [rows, L, V] logits array)."""
    model = PureModel(TransformerConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64,
                                        final_logit_softcap=softcap))  # fmt: skip
    params = model.init(1)
    rows = to_batch(PAIRS, "byte", max_len=16)["chosen"]
    weights = jnp.array([1.0, -2.0])  # a per-row cotangent, as a preference loss has

    def f(p, chunks):
        return jnp.sum(weights * sequence_logprobs(model, p, rows, chunks=chunks).logps)

    full, chunked = f(params, 1), f(params, 4)
    np.testing.assert_allclose(chunked, full, rtol=1e-6)
    g_full = jax.grad(f)(params, 1)
    g_chunked = jax.grad(f)(params, 4)
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
