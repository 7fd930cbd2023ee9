"""Sampling: next-token selection, KV-cache decoding, the batched text sampler, rescoring."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_align.sampling import process_logits, sample_next


def _logits(probs):
    return jnp.log(jnp.asarray([probs], jnp.float32))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = _logits([0.05, 0.5, 0.15, 0.3])

    def kept(p):
        return set(np.flatnonzero(np.isfinite(process_logits(logits, top_p=p)[0])))

    assert kept(0.4) == {1}  # the top token alone has 0.5 >= 0.4
    assert kept(0.75) == {1, 3}  # 0.5 + 0.3 = 0.8 >= 0.75
    assert kept(0.85) == {1, 3, 2}  # 0.95 >= 0.85
    assert kept(1.0) == {0, 1, 2, 3}


def test_top_k_never_emits_a_token_outside_the_top_k():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(64, 50)), jnp.float32)
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    keys = jax.random.split(jax.random.key(0), 200)
    draws = jax.vmap(lambda k: sample_next(k, logits, top_k=3)[0])(keys)  # [200, 64]
    for b in range(64):
        assert set(np.asarray(draws[:, b]).tolist()) <= set(top3[b].tolist())
    # Each of the 3 is drawn (200 draws, renormalised probabilities all > 1%).
    assert all(len(set(np.asarray(draws[:, b]).tolist())) == 3 for b in range(8))


def test_frequencies_follow_the_tempered_distribution():
    probs = np.array([0.1, 0.2, 0.7])
    T = 2.0
    tempered = probs ** (1 / T) / np.sum(probs ** (1 / T))
    keys = jax.random.split(jax.random.key(1), 20000)
    logits = _logits(probs)
    draws = np.asarray(jax.vmap(lambda k: sample_next(k, logits, temperature=T)[0][0])(keys))
    freq = np.bincount(draws, minlength=3) / len(draws)
    # 4 standard errors of a binomial proportion.
    np.testing.assert_allclose(freq, tempered, atol=4 * math.sqrt(0.25 / len(draws)))


def test_greedy_and_logprobs_of_the_raw_model():
    logits = jnp.asarray([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    tokens, logps = sample_next(jax.random.key(0), logits, greedy=True)
    np.testing.assert_array_equal(tokens, [1, 2])
    want = [
        3.0 - math.log(math.e + math.e**3 + math.e**2),
        5.0 - math.log(1 + math.e**-1 + math.e**5),
    ]
    np.testing.assert_allclose(logps, want, atol=1e-6)
    # Sampled tokens get the model's log-prob at temperature 1, not the tempered one.
    t, lp = sample_next(jax.random.key(3), logits, temperature=0.3, top_k=2)
    full = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_allclose(lp, full[jnp.arange(2), t], rtol=1e-6)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="temperature"):
        process_logits(_logits([0.5, 0.5]), temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        process_logits(_logits([0.5, 0.5]), top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        process_logits(_logits([0.5, 0.5]), top_k=-1)


# ----------------------------------------------------------------------------
# generate: KV-cache decoding
# ----------------------------------------------------------------------------

from lm_align.models import TransformerConfig  # noqa: E402
from lm_align.models.pure import PureModel  # noqa: E402
from lm_align.sampling import generate  # noqa: E402

PROMPTS = [[1, 50, 51, 52, 53], [1, 60], [1, 70, 71]]


def _model(**kw):
    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, vocab_size=97, **kw)
    model = PureModel(cfg)
    # Larger weights than at init, so greedy decoding does not repeat one token.
    params = jax.tree.map(lambda x: x * 3.0, model.init(0))
    return model, params


def _logits_of(model, params, tokens, length=16):
    """Full-sequence logits without a cache; right padding (one compile) does
    not change the logits of earlier positions of a causal model."""
    padded = jnp.asarray([list(tokens) + [0] * (length - len(tokens))], jnp.int32)
    return jax.jit(model.apply)(params, padded)[0, : len(tokens)]


def _greedy_without_cache(model, params, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(jnp.argmax(_logits_of(model, params, tokens)[-1])))
    return tokens[len(prompt) :]


@pytest.mark.parametrize(
    "kw", [{}, {"scan_layers": True}, {"position": "learned", "qk_layernorm": True}]
)
def test_greedy_with_the_cache_equals_step_by_step_decoding(kw):
    model, params = _model(**kw)
    out = generate(model, params, PROMPTS, max_new_tokens=6, greedy=True)
    for i, prompt in enumerate(PROMPTS):
        want = _greedy_without_cache(model, params, prompt, 6)
        assert np.asarray(out.tokens[i]).tolist() == want, (i, kw)
    assert len({tuple(np.asarray(t).tolist()) for t in out.tokens}) > 1  # not degenerate


def test_sample_logprobs_equal_one_forward_rescoring():
    model, params = _model()
    out = generate(
        model, params, PROMPTS, max_new_tokens=5, num_samples=2, temperature=0.8, top_k=5, rng=3
    )
    assert out.tokens.shape == (6, 5)
    for row in range(6):
        prompt = PROMPTS[int(out.prompt_index[row])]
        completion = np.asarray(out.tokens[row]).tolist()
        logps = jax.nn.log_softmax(_logits_of(model, params, prompt + completion), axis=-1)
        want = [float(logps[len(prompt) - 1 + t, tok]) for t, tok in enumerate(completion)]
        np.testing.assert_allclose(out.logps[row], want, rtol=1e-4, atol=1e-5)


def test_top_k_sampling_stays_in_the_top_k_of_the_model():
    model, params = _model()
    out = generate(model, params, PROMPTS[:1], max_new_tokens=4, num_samples=16, top_k=3, rng=1)
    for row in range(16):
        seq = [*PROMPTS[0], *np.asarray(out.tokens[row]).tolist()]
        logits = _logits_of(model, params, seq)
        for t in range(4):
            top3 = np.argsort(-np.asarray(logits[len(PROMPTS[0]) - 1 + t]))[:3]
            assert int(out.tokens[row, t]) in top3


def test_stop_tokens_seeds_and_lengths():
    model, params = _model()
    free = generate(model, params, PROMPTS, max_new_tokens=6, greedy=True)
    stop = int(free.tokens[0, 2])  # the third token of row 0 becomes a stop token
    out = generate(model, params, PROMPTS, max_new_tokens=6, greedy=True, stop_tokens=[stop])
    first = np.asarray(free.tokens[0]).tolist().index(stop)
    assert int(out.lengths[0]) == first + 1
    assert np.all(np.asarray(out.tokens[0, first + 1 :]) == 0)
    assert np.all(np.asarray(out.logps[0, first + 1 :]) == 0)
    a = generate(model, params, PROMPTS, max_new_tokens=6, rng=7, temperature=1.0)
    b = generate(model, params, PROMPTS, max_new_tokens=6, rng=7, temperature=1.0)
    c = generate(model, params, PROMPTS, max_new_tokens=6, rng=8, temperature=1.0)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, params, [[]], max_new_tokens=2)


SHARDED_SCRIPT = """
import json, jax, numpy as np
from lm_align import parallel
from lm_align.models import TransformerConfig
from lm_align.models.pure import PureModel
from lm_align.sampling import generate
assert len(jax.devices()) == 8
model = PureModel(TransformerConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                    max_len=64, position="rope"))
params = model.init(0)
prompts = [[1, 50, 51, 52, 53], [1, 60], [1, 70, 71], [1, 9]]
mesh = parallel.make_mesh({"data": 4, "fsdp": 2, "tensor": 1}, jax.devices())
sharded = jax.device_put(params, parallel.logical_to_sharding(
    model.logical_axes, model.abstract_params, mesh))
out = {}
for name, kw in (("greedy", dict(greedy=True)), ("sampled", dict(temperature=0.9, top_k=20))):
    a = generate(model, params, prompts, max_new_tokens=6, num_samples=2, rng=3, **kw)
    b = generate(model, sharded, prompts, max_new_tokens=6, num_samples=2, rng=3, mesh=mesh, **kw)
    out[name] = {
        "same_tokens": bool(np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))),
        "logp_diff": float(np.max(np.abs(np.asarray(a.logps) - np.asarray(b.logps)))),
        "replicated": bool(b.tokens.sharding.is_fully_replicated),
        "rows_per_device": {s.data.shape[0] for s in b.tokens.addressable_shards}.pop(),
    }
try:
    generate(model, sharded, prompts[:3], max_new_tokens=2, mesh=mesh)
except ValueError as e:
    out["error"] = str(e)
# sample_texts fills a batch of 3 prompts x 2 samples up to 4 prompts (8 rows) with a
# copy of its first prompt: the same draws as 4 prompts whose 4th is that copy.
from lm_align.data.tokenizers import make_tokenizer
from lm_align.sampling import sample_texts
tok = make_tokenizer("byte")
bm = PureModel(TransformerConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=2, d_ff=64))
bp = bm.init(0)
bs = jax.device_put(bp, parallel.logical_to_sharding(bm.logical_axes, bm.abstract_params, mesh))
texts = ["1+2=", "33+4=", "5+6="]
kw = dict(num_samples=2, max_new_tokens=5, seed=4)
on_mesh = sample_texts(bm, bs, tok, texts, mesh=mesh, **kw)
filled = sample_texts(bm, bp, tok, texts + texts[:1], **kw)
out["texts_equal"] = on_mesh.responses == filled.responses[:3]
out["texts_shape"] = [len(on_mesh.responses), len(on_mesh.responses[0])]
print(json.dumps(out))
"""


def test_decoding_sharded_over_a_mesh_gives_the_same_tokens():
    import json
    import subprocess
    import sys

    from tests.helpers import REPO, env_with_devices

    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT],
        env=env_with_devices(8), capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("greedy", "sampled"):
        assert out[name]["same_tokens"], out
        assert out[name]["logp_diff"] < 1e-4, out
        assert not out[name]["replicated"] and out[name]["rows_per_device"] == 1, out
    assert "3 rows" in out["error"] and "multiple of 8" in out["error"]
    assert out["texts_equal"] and out["texts_shape"] == [3, 2], out


# ----------------------------------------------------------------------------
# sample_texts and rescore: text in, text out
# ----------------------------------------------------------------------------

from lm_align.data.tokenizers import ByteTokenizer, make_tokenizer  # noqa: E402
from lm_align.sampling import (  # noqa: E402
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    decode_response,
    rescore,
    sample_texts,
)

TEXTS = ["1+2=", "3+4=", "55+6=", "7+8=", "9+1="]  # 5 prompts: not a multiple of 2


@pytest.fixture(scope="module")
def byte_model():
    model = PureModel(TransformerConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, vocab_size=259))
    return model, model.init(0), make_tokenizer("byte")


class _EosIs(ByteTokenizer):
    """A byte tokenizer whose eos is an ordinary byte the tiny model does emit."""

    def __init__(self, eos_id):
        self._eos = eos_id

    @property
    def eos_id(self):
        return self._eos


def test_the_default_is_the_models_own_distribution():
    assert (DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P) == (1.0, 0, 1.0)
    logits = _logits([0.1, 0.2, 0.7])
    np.testing.assert_allclose(  # the defaults leave the logits unchanged
        process_logits(logits, temperature=DEFAULT_TEMPERATURE, top_k=DEFAULT_TOP_K,
                       top_p=DEFAULT_TOP_P), logits, rtol=1e-6,
    )  # fmt: skip


def test_sample_texts_shapes_seeds_and_the_key_of_each_batch(byte_model):
    model, params, tok = byte_model
    kw = {"num_samples": 3, "max_new_tokens": 6, "batch_size": 2}
    a = sample_texts(model, params, tok, TEXTS, seed=0, **kw)
    assert len(a.responses) == 5 and all(len(r) == 3 for r in a.responses)
    assert a.logps.shape == a.lengths.shape == a.response_lengths.shape == (5, 3)
    assert a.responses == sample_texts(model, params, tok, TEXTS, seed=0, **kw).responses
    assert a.responses != sample_texts(model, params, tok, TEXTS, seed=1, **kw).responses
    # Batch b = prompts [2b, 2b + 2) samples with fold_in(key(seed), b): batch 1 is
    # prompts 2 and 3, decoded by generate with that key.
    ids = [[tok.bos_id] + tok.encode(t) for t in TEXTS[2:4]]
    out = generate(
        model, params, ids, max_new_tokens=6, num_samples=3, stop_tokens=[tok.eos_id],
        rng=jax.random.fold_in(jax.random.key(0), 1),
    )  # fmt: skip
    rows = [np.asarray(out.tokens[r, : int(out.lengths[r])]).tolist() for r in range(6)]
    assert a.token_ids[2] == rows[:3] and a.token_ids[3] == rows[3:]
    np.testing.assert_allclose(a.logps[2:4].ravel(), np.asarray(out.logps).sum(-1), rtol=1e-6)


def test_responses_stop_before_eos_and_the_filler_prompts_are_dropped(byte_model):
    model, params, tok = byte_model
    ids = [[tok.bos_id] + tok.encode(p) for p in TEXTS]
    greedy = np.asarray(generate(model, params, ids, max_new_tokens=6, greedy=True).tokens)
    eos = int(greedy[3, 1])  # prompt 3's second greedy token becomes eos
    tok_eos = _EosIs(eos)
    # top_k = 1 makes sampling greedy, so every sample is the greedy response.
    # Batches of 2: the last batch holds prompt 4 and a filler copy, dropped.
    s = sample_texts(model, params, tok_eos, TEXTS, num_samples=2, max_new_tokens=6, top_k=1,
                     batch_size=2)  # fmt: skip
    for i, row in enumerate(greedy.tolist()):
        cut = row.index(eos) if eos in row else len(row)
        want_ids = row[: cut + 1] if eos in row else row
        assert s.token_ids[i] == [want_ids, want_ids]
        assert s.responses[i] == [tok.decode(row[:cut])] * 2
        assert s.lengths[i].tolist() == [len(want_ids)] * 2
        assert s.response_lengths[i].tolist() == [cut] * 2
    assert s.token_ids[3][0] == greedy[3, :2].tolist()  # stopped at the eos, which it keeps
    eos_char = bytes([eos - 3]).decode("latin-1")
    assert all(eos_char not in r for rs in s.responses for r in rs)


def test_decode_response_cuts_at_the_first_eos():
    tok = make_tokenizer("byte")
    hi = tok.encode("hi")
    assert decode_response(tok, hi + [tok.eos_id]) == "hi"
    assert decode_response(tok, hi) == "hi"  # cut at max_new_tokens: kept whole
    assert decode_response(tok, [tok.eos_id] + hi) == ""


def test_rescore_equals_the_decoders_logps_and_a_hand_sum(byte_model):
    model, params, tok = byte_model
    s = sample_texts(model, params, tok, TEXTS, num_samples=2, max_new_tokens=5, seed=3,
                     temperature=0.8, top_k=20)  # fmt: skip
    # Full forward passes (no cache), 3 rows per call: the cached decoder's sums.
    np.testing.assert_allclose(
        rescore(model, params, tok, TEXTS, s.token_ids, batch_size=3), s.logps, atol=1e-4
    )
    other = jax.tree.map(lambda x: x * 1.5, params)
    got = rescore(model, other, tok, TEXTS[:1], [s.token_ids[0]])
    doc = [tok.bos_id] + tok.encode(TEXTS[0])
    for j, ids in enumerate(s.token_ids[0]):
        logp = jax.nn.log_softmax(_logits_of(model, other, doc + ids), axis=-1)
        want = sum(float(logp[len(doc) - 1 + t, tok_id]) for t, tok_id in enumerate(ids))
        assert got[0, j] == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="same number of responses"):
        rescore(model, params, tok, TEXTS[:2], [[[5]], [[5], [6]]])


def test_greedy_sample_texts_is_step_by_step_greedy(byte_model):
    model, params, tok = byte_model
    s = sample_texts(model, params, tok, TEXTS[:2], max_new_tokens=4, greedy=True, seed=9)
    for i, text in enumerate(TEXTS[:2]):
        prompt = [tok.bos_id] + tok.encode(text)
        want = _greedy_without_cache(model, params, prompt, 4)
        assert s.token_ids[i][0] == want[: len(s.token_ids[i][0])]


def test_ids_past_the_tokenizers_vocabulary_are_never_generated():
    """A model whose vocabulary is padded past the tokenizer's: the padded ids get all the
    mass, yet the sampler picks only tokenizer ids; the log-probs stay the model's own."""
    vocab = 5
    logits = jnp.asarray([[0.0, 0.0, 0.0, 0.0, 1.0, 9.0, 9.0, 9.0]] * 64)
    for greedy in (True, False):
        tok, logp = sample_next(jax.random.key(0), logits, greedy=greedy, vocab_size=vocab)
        assert int(jnp.max(tok)) < vocab
        want = logits[0, tok] - jax.scipy.special.logsumexp(logits[0])
        np.testing.assert_allclose(logp, want, rtol=1e-6)
    # Without the limit the padded ids are chosen: the check above can fail.
    tok, _ = sample_next(jax.random.key(0), logits, greedy=True)
    assert int(tok[0]) >= vocab
