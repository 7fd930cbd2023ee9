"""Tests for the decoder (lm_align.models): invariances and hand computations.

Each test doubles as an example of how to build, initialise and call the model:

    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64)
    model = PureModel(cfg)
    params = model.init(0)                                  # nested dict of arrays
    logits_BLV = model.apply(params, tokens_BL)             # float32 [B, L, V]
    logits_BLV, diag = model.apply(params, tokens_BL, return_diagnostics=True)
    diag["max_attn_logit"]                                  # [n_layers]

Shape suffixes: B batch, L length, V vocab, D model dim, H heads, K head dim.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_align.models.pure import PureModel
from lm_align.models.transformer import TransformerConfig, rope

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64)


def tiny(**overrides) -> TransformerConfig:
    """A 2-layer, width-32 model; `overrides` change any TransformerConfig field."""
    return TransformerConfig(**{**TINY, **overrides})


def random_tokens(seed, shape=(4, 12), vocab=TINY["vocab_size"]):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def stack_layers(params, n_layers):
    """Unscanned params (blocks {0: tree, 1: tree}) -> scanned layout (one tree, leading layer axis)."""
    blocks = [params["blocks"][i] for i in range(n_layers)]
    return {**params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


# --- causality and packing -------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("position", ["rope", "learned"])
def test_changing_token_t_never_changes_earlier_logits(position, scan_layers):
    cfg = tiny(position=position, scan_layers=scan_layers, max_len=16)
    model = PureModel(cfg)
    params = model.init(0)
    changed = (1, 5, 11)
    base_L = random_tokens(0, (12,))
    # Row 0: the base sequence; row i: the base with token changed[i-1] replaced.
    rows = [base_L] + [base_L.at[t].set((base_L[t] + 17) % cfg.vocab_size) for t in changed]
    logits_BLV = np.asarray(model.apply(params, jnp.stack(rows)))

    for i, t in enumerate(changed, start=1):
        np.testing.assert_allclose(
            logits_BLV[i, :t],
            logits_BLV[0, :t],
            atol=1e-6,
            err_msg=f"changing token {t} changed logits before it",
        )
        # ...while the logits from t on do change (the check above is not vacuous).
        assert np.max(np.abs(logits_BLV[i, t:] - logits_BLV[0, t:])) > 1e-2, t


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_packed_document_logits_equal_document_alone(position):
    """Documents packed in one row (segment ids, positions restarting at 0) see only themselves."""
    cfg = tiny(position=position, max_len=16)
    model = PureModel(cfg)
    params = model.init(1)
    doc_a, doc_b = random_tokens(1, (5,)), random_tokens(2, (7,))
    a_then_b, b_then_a = jnp.concatenate([doc_a, doc_b]), jnp.concatenate([doc_b, doc_a])
    restarting = list(range(5)) + list(range(7))

    # Row 0: a and b packed. Rows 1, 2: each document alone at the start of an unpacked row
    # (what follows a causal prefix cannot change it). Row 3: packed positions, no segment ids.
    tokens_BL = jnp.stack([a_then_b, a_then_b, b_then_a, a_then_b])
    positions_BL = jnp.asarray(
        [restarting, list(range(12)), list(range(12)), restarting], jnp.int32
    )
    segment_ids_BL = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12, [1] * 12, [1] * 12], jnp.int32)
    logits_BLV = model.apply(
        params, tokens_BL, positions_BL=positions_BL, segment_ids_BL=segment_ids_BL
    )

    np.testing.assert_allclose(logits_BLV[0, :5], logits_BLV[1, :5], atol=1e-5)
    np.testing.assert_allclose(logits_BLV[0, 5:], logits_BLV[2, :7], atol=1e-5)
    # Without segment ids, document b attends to document a and its logits change.
    assert np.max(np.abs(logits_BLV[3, 5:] - logits_BLV[2, :7])) > 1e-2


# --- attention-logit diagnostics -------------------------------------------------------


def _with_qk_scales(params, scale_q_NK, scale_k_NK):
    for n, (sq_K, sk_K) in enumerate(zip(scale_q_NK, scale_k_NK)):
        params["blocks"][n]["attn"]["q_norm"]["scale"] = jnp.asarray(sq_K)
        params["blocks"][n]["attn"]["k_norm"]["scale"] = jnp.asarray(sk_K)
    return params


def test_qk_layernorm_bounds_attention_logits_by_sqrt_head_dim_times_scales():
    """qk-layernorm (Wortsman et al. 2023, arXiv:2309.14322; docs/scaling.md, Study 1):
    q.k/sqrt(K) <= sqrt(K) * max|scale_q| * max|scale_k| under qk-layernorm,
    however large the weights; without qk-layernorm the same weights give far larger logits."""
    N, K = TINY["n_layers"], TINY["d_model"] // TINY["n_heads"]
    tokens_BL = random_tokens(3)
    rng = np.random.default_rng(0)
    scale_q_NK = rng.uniform(-1.5, 1.5, (N, K)).astype(np.float32)
    scale_k_NK = rng.uniform(-0.7, 0.7, (N, K)).astype(np.float32)
    bound_N = math.sqrt(K) * np.abs(scale_q_NK).max(-1) * np.abs(scale_k_NK).max(-1)

    model = PureModel(tiny(qk_layernorm=True))
    params = _with_qk_scales(
        jax.tree.map(lambda w: 1000.0 * w, model.init(0)), scale_q_NK, scale_k_NK
    )
    _, diag = model.apply(params, tokens_BL, return_diagnostics=True)
    max_logit_N = np.asarray(diag["max_attn_logit"])
    assert max_logit_N.shape == (N,) and np.all(np.isfinite(max_logit_N))
    assert np.all(max_logit_N <= bound_N * (1 + 1e-5)), (max_logit_N, bound_N)

    plain = PureModel(tiny(qk_layernorm=False))
    _, plain_diag = plain.apply(
        jax.tree.map(lambda w: 1000.0 * w, plain.init(0)), tokens_BL, return_diagnostics=True
    )
    assert np.all(np.asarray(plain_diag["max_attn_logit"]) > 1e3 * bound_N)


def test_qk_layernorm_bound_is_attained_when_q_equals_k():
    """With the q and k projections equal and |scale| constant (same sign pattern), a token's
    logit with itself is |q|^2/sqrt(K) = sqrt(K) * s_q * s_k: the bound holds with equality."""
    N, K = TINY["n_layers"], TINY["d_model"] // TINY["n_heads"]
    s_q, s_k = 1.3, 0.6
    signs_NK = np.random.default_rng(1).choice([-1.0, 1.0], (N, K)).astype(np.float32)

    model = PureModel(tiny(qk_layernorm=True))
    params = jax.tree.map(lambda w: 1000.0 * w, model.init(2))
    for n in range(N):
        qkv = params["blocks"][n]["attn"]["qkv"]  # [D, 3, H, K]: q, k, v
        params["blocks"][n]["attn"]["qkv"] = qkv.at[:, 1].set(qkv[:, 0])
    params = _with_qk_scales(params, s_q * signs_NK, s_k * signs_NK)
    _, diag = model.apply(params, random_tokens(3), return_diagnostics=True)
    np.testing.assert_allclose(diag["max_attn_logit"], [math.sqrt(K) * s_q * s_k] * N, rtol=1e-4)


def _layer_norm(x, scale, eps):
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def _attention_logits_by_hand(params, cfg, tokens_BL, positions_BL):
    """Layer-0 pre-softmax logits q.k/sqrt(K) [B, H, L, M] for all pairs, mask not applied."""
    p = jax.tree.map(np.asarray, params)
    x_BLD = p["embed"][np.asarray(tokens_BL)]
    h_BLD = _layer_norm(x_BLD, p["blocks"][0]["attn_norm"]["scale"], cfg.norm_eps)
    qkv_BL3HK = np.einsum("bld,dthk->blthk", h_BLD, p["blocks"][0]["attn"]["qkv"])
    q_BLHK = np.asarray(rope(jnp.asarray(qkv_BL3HK[:, :, 0]), positions_BL, cfg.rope_theta))
    k_BLHK = np.asarray(rope(jnp.asarray(qkv_BL3HK[:, :, 1]), positions_BL, cfg.rope_theta))
    return np.einsum("blhk,bmhk->bhlm", q_BLHK, k_BLHK) / math.sqrt(cfg.resolved_head_dim)


def test_max_attn_logit_is_the_masked_maximum_recomputed_by_hand():
    """1 layer, RoPE, packed segments: the diagnostic equals max over causal, same-segment
    (query, key) pairs of q.k/sqrt(K), with q, k recomputed from the params in numpy."""
    cfg = tiny(n_layers=1, position="rope")
    model = PureModel(cfg)
    params = model.init(4)
    lengths = [[4, 8], [12], [6, 6], [3, 3, 6]]  # documents packed in each of 4 rows of 12
    segment_ids_BL = jnp.asarray(
        [sum(([i + 1] * n for i, n in enumerate(row)), []) for row in lengths]
    )
    positions_BL = jnp.asarray([sum((list(range(n)) for n in row), []) for row in lengths])
    L = 12
    seg = np.asarray(segment_ids_BL)
    allowed_B1LM = (np.tril(np.ones((L, L), bool))[None] & (seg[:, :, None] == seg[:, None, :]))[
        :, None
    ]

    # Pick a sequence whose largest logit overall sits at a masked pair (in the future or in
    # the other document), so a diagnostic that ignored the mask would fail.
    for seed in range(50):
        tokens_BL = random_tokens(seed)
        logits_BHLM = _attention_logits_by_hand(params, cfg, tokens_BL, positions_BL)
        expected = logits_BHLM[np.broadcast_to(allowed_B1LM, logits_BHLM.shape)].max()
        if logits_BHLM.max() > expected + 0.2:
            break
    else:
        raise AssertionError("no sequence among 50 has its largest attention logit masked")

    _, diag = model.apply(
        params,
        tokens_BL,
        positions_BL=positions_BL,
        segment_ids_BL=segment_ids_BL,
        return_diagnostics=True,
    )
    np.testing.assert_allclose(np.asarray(diag["max_attn_logit"]), [expected], rtol=1e-4)


# --- layouts, remat, tied embeddings ---------------------------------------------------


def test_scanned_and_unscanned_layers_agree_on_the_same_params():
    unscanned = PureModel(tiny(scan_layers=False))
    scanned = PureModel(tiny(scan_layers=True))
    params = unscanned.init(6)
    stacked = stack_layers(params, TINY["n_layers"])
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, scanned.abstract_params)

    tokens_BL = random_tokens(6)
    np.testing.assert_allclose(
        scanned.apply(stacked, tokens_BL), unscanned.apply(params, tokens_BL), atol=1e-5
    )


def test_full_remat_gives_the_same_logits_and_gradients():
    """remat="full" recomputes activations in the backward pass; the numbers must not change."""
    plain, remat = (PureModel(tiny(scan_layers=True, remat=r)) for r in ("none", "full"))
    params = plain.init(7)
    tokens_BL = random_tokens(7)

    def loss_and_logits(model):
        def fn(p):
            logits_BLV = model.apply(p, tokens_BL)
            return jnp.mean(jax.nn.log_softmax(logits_BLV)[..., 3]), logits_BLV

        return jax.jit(jax.value_and_grad(fn, has_aux=True))

    (loss_a, logits_a), grads_a = loss_and_logits(plain)(params)
    (loss_b, logits_b), grads_b = loss_and_logits(remat)(params)
    np.testing.assert_allclose(logits_b, logits_a, atol=1e-6)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7), grads_a, grads_b
    )
    assert float(jnp.max(jnp.abs(grads_a["blocks"]["attn"]["qkv"]))) > 0


def test_tied_embeddings_read_out_with_the_embedding_transpose():
    tied, untied = PureModel(tiny(tie_embeddings=True)), PureModel(tiny(tie_embeddings=False))
    params = tied.init(8)
    assert "readout" not in params
    # The untied model with readout := embed^T computes x @ embed^T by its own path.
    untied_params = {**params, "readout": params["embed"].T}
    tokens_BL = random_tokens(8)
    np.testing.assert_allclose(
        tied.apply(params, tokens_BL), untied.apply(untied_params, tokens_BL), atol=1e-5
    )


# --- parameter count, FLOPs, logical axes ----------------------------------------------

COUNT_CONFIGS = [
    dict(),
    dict(activation="swiglu"),
    dict(use_bias=True),
    dict(use_bias=True, activation="swiglu"),
    dict(position="learned", max_len=40),
    dict(qk_layernorm=True),
    dict(tie_embeddings=True),
    dict(head_dim=8, n_heads=3),
    dict(
        scan_layers=True,
        qk_layernorm=True,
        use_bias=True,
        activation="swiglu",
        position="learned",
        max_len=24,
        tie_embeddings=True,
    ),
]


@pytest.mark.parametrize("overrides", COUNT_CONFIGS, ids=lambda o: ",".join(o) or "default")
def test_num_params_equals_the_models_leaf_count(overrides):
    cfg = tiny(**overrides)
    leaves = jax.tree.leaves(PureModel(cfg).abstract_params)
    assert cfg.num_params() == sum(math.prod(x.shape) for x in leaves)


def test_matmul_params_and_flops_per_token_by_hand():
    cfg = tiny()  # D=32, N=2 layers, H=2, K=16, F=64, V=64, GeLU, untied
    D, N, F, V, L = 32, 2, 64, 64, 16
    per_layer = 3 * D * D + D * D + D * F + F * D  # qkv, out, mlp in, mlp out
    n_matmul = N * per_layer + D * V  # + readout; the embedding lookup is no matmul
    assert n_matmul == 18432
    assert cfg.num_params(matmul_only=True) == n_matmul
    assert cfg.flops_per_token(L) == 6 * n_matmul + 12 * N * D * L == 122_880
    # With an explicit head_dim the attention term uses H*K (PaLM's 12*N*H*K*L), not D.
    cfg_hk = tiny(n_heads=3, head_dim=8)
    HK = 24
    n_matmul_hk = N * (3 * D * HK + HK * D + D * F + F * D) + D * V
    assert cfg_hk.flops_per_token(L) == 6 * n_matmul_hk + 12 * N * HK * L


LOGICAL_NAMES = {"embed", "vocab", "heads", "head_dim", "mlp", "layers", None}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_param_has_logical_axis_names_of_its_rank(scan_layers):
    cfg = tiny(
        scan_layers=scan_layers,
        qk_layernorm=True,
        use_bias=True,
        activation="swiglu",
        position="learned",
        max_len=24,
    )
    model = PureModel(cfg)
    sizes = dict(embed=32, vocab=64, heads=2, head_dim=16, mlp=64, layers=2)
    shapes = jax.tree.map(lambda x: x.shape, model.abstract_params)
    is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)
    names_with_paths = jax.tree_util.tree_flatten_with_path(model.logical_axes, is_leaf=is_names)[0]
    shapes_with_paths = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple)
    )[0]
    assert [p for p, _ in names_with_paths] == [p for p, _ in shapes_with_paths]
    for (path, names), (_, shape) in zip(names_with_paths, shapes_with_paths):
        where = jax.tree_util.keystr(path)
        assert len(names) == len(shape), (where, names, shape)
        assert set(names) <= LOGICAL_NAMES, (where, names)
        for name, size in zip(names, shape):  # a logical name always labels the same size
            assert name is None or size == sizes[name], (where, names, shape)
        assert ("layers" in names) == (scan_layers and where.startswith("['blocks']")), (
            where,
            names,
        )
    # The table is split by rows only, so lookups keep activations batch-sharded.
    assert model.logical_axes["embed"] == ("vocab", None)
    assert model.logical_axes["readout"] == ("embed", "vocab")


# --- invalid configs -------------------------------------------------------------------


def test_invalid_configs_raise_naming_the_field():
    with pytest.raises(ValueError, match=r"model\.n_heads=3 does not divide model\.d_model=32"):
        TransformerConfig(d_model=32, n_heads=3)
    with pytest.raises(ValueError, match=r"model\.activation='relu'"):
        TransformerConfig(activation="relu")
    with pytest.raises(ValueError, match=r"model\.position='alibi'"):
        TransformerConfig(position="alibi")
    TransformerConfig(
        d_model=32, n_heads=3, head_dim=8
    )  # an explicit head_dim lifts the divisibility rule
