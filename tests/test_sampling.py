"""Next-token selection: greedy, temperature, top-k, top-p."""

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
