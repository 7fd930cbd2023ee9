"""Hugging Face checkpoints (`lm_align.models.hf`), checked against outputs of `transformers`.

The fixtures (../shared/fixtures/hf and tests/data/hf) hold random models that
`transformers` wrote together with its own logits and greedy continuations.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_align import sampling
from lm_align.models import TransformerConfig, hf
from lm_align.models.pure import PureModel
from lm_align.parameterization import Parameterization
from tests.helpers import REPO, env_with_devices

FIXTURES = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "hf")
MODELS = ("llama", "qwen3", "gemma2", "gpt2")
# Other shapes and options of these families (tests/data/hf/README.md), also written by transformers.
OTHER_SHAPES = os.path.join(REPO, "tests", "data", "hf")
OTHERS = (
    "llama_mqa_tied", "llama_linear_rope", "qwen2_bias", "qwen3_wide_head",
    "gemma2_small_window", "gemma_v1", "mistral_window", "gpt2_odd",
)  # fmt: skip


def fixture(name):
    return os.path.join(OTHER_SHAPES if name in OTHERS else FIXTURES, name)


def relative_error(logits, reference):
    return float(np.max(np.abs(np.asarray(logits) - reference)) / np.max(np.abs(reference)))


def assert_matches_reference(path, *, scan_layers):
    ref = np.load(os.path.join(path, "reference.npz"))
    model, params = hf.load(path, scan_layers=scan_layers)
    assert relative_error(model.apply(params, ref["input_ids"]), ref["logits"]) < 1e-4
    return model, params, ref


@pytest.mark.parametrize("scan_layers", [False, True], ids=["layers", "scan"])
@pytest.mark.parametrize("name", MODELS + OTHERS)
def test_logits_match_transformers(name, scan_layers):
    assert_matches_reference(fixture(name), scan_layers=scan_layers)


def greedy(model, params, prompt_ids, n):
    gen = sampling.generate(model, params, [list(p) for p in prompt_ids], max_new_tokens=n, greedy=True)
    return np.asarray(gen.tokens)


@pytest.mark.parametrize("name", MODELS + OTHERS)
def test_kv_cache_greedy_decoding_reproduces_transformers(name):
    """mistral_window's window (6) is shorter than prompt + continuation: the cache masks by it."""
    ref = np.load(os.path.join(fixture(name), "reference.npz"))
    model, params = hf.load(fixture(name), scan_layers=name in ("gemma2", "mistral_window"))
    prompt, expected = ref["prompt_ids"], ref["gen_ids"]
    new = expected.shape[1] - prompt.shape[1]
    np.testing.assert_array_equal(greedy(model, params, prompt, new), expected[:, prompt.shape[1] :])


def test_a_perturbed_tensor_changes_the_logits(tmp_path):
    """The tolerance is tight enough to see one norm scale off by 1e-2."""
    path = tmp_path / "llama"
    shutil.copytree(fixture("llama"), path)
    model, params = hf.load(str(path))
    params["blocks"][1]["mlp_norm"]["scale"] = params["blocks"][1]["mlp_norm"]["scale"] + 1e-2
    ref = np.load(path / "reference.npz")
    assert relative_error(model.apply(params, ref["input_ids"]), ref["logits"]) > 1e-4


@pytest.mark.parametrize("name", MODELS + ("llama_mqa_tied", "qwen2_bias", "gemma_v1", "mistral_window"))
def test_save_then_load_is_bit_identical(name, tmp_path):
    model, params = hf.load(fixture(name))
    files = hf.save(model, params, str(tmp_path), config_extras={"bos_token_id": 2})
    assert sorted(files) == ["config.json", "model.safetensors"]
    config = json.load(open(tmp_path / "config.json"))
    original = json.load(open(os.path.join(fixture(name), "config.json")))
    assert config["architectures"] == original["architectures"] and config["bos_token_id"] == 2
    again, params2 = hf.load(str(tmp_path))
    assert again.cfg == model.cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    # The written tensors are the original ones, name for name.
    from safetensors.numpy import load_file

    written, source = load_file(tmp_path / "model.safetensors"), load_file(
        os.path.join(fixture(name), "model.safetensors")
    )
    kept = {k: v for k, v in source.items() if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    assert sorted(written) == sorted(kept)
    for k in kept:
        np.testing.assert_array_equal(written[k], kept[k], err_msg=k)


def test_sharded_save_writes_an_index_and_loads_identically(tmp_path):
    model, params = hf.load(fixture("qwen3"), scan_layers=True)
    files = hf.save(model, params, str(tmp_path), max_shard_bytes=100_000)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(shards)
    _, params2 = hf.load(str(tmp_path), scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_export_folds_parameterization_multipliers():
    """A muP model's forward multipliers end up in the exported weights: same logits."""
    cfg = TransformerConfig(
        vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
        activation="swiglu", norm="rmsnorm",
    )  # fmt: skip
    param = Parameterization(name="mup", width=64, base_width=16)
    model = PureModel(cfg, param)
    assert {0.5, 2.0} <= set(jax.tree.leaves(param.multipliers(model.abstract_params, model.logical_axes)))
    params = model.init(3)
    tokens = jnp.arange(24).reshape(2, 12) % 64
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lm_align_mup_{os.getpid()}")
    try:
        hf.save(model, params, out)
        again, params2 = hf.load(out)
        assert relative_error(again.apply(params2, tokens), np.asarray(model.apply(params, tokens))) < 1e-5
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_models_without_a_hugging_face_family_are_refused():
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64)  # LayerNorm, no biases
    with pytest.raises(hf.HFCheckpointError, match=r"model.activation='gelu', model.norm='layernorm'"):
        hf.to_hf_config(cfg)


def edited(tmp_path, name, **changes):
    path = tmp_path / name
    shutil.copytree(fixture(name), path)
    config = json.load(open(path / "config.json"))
    config.update(changes)
    json.dump(config, open(path / "config.json", "w"))
    return str(path)


@pytest.mark.parametrize(
    "name, changes, message",
    [
        ("llama", {"model_type": "falcon"}, "model_type 'falcon'.*supported: llama"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2}}, "rope type 'yarn'"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ("llama", {"vocab_size": 321}, r"model.embed_tokens.weight \(320, 64\).*config.json and the weights"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
        ("qwen3", {"num_hidden_layers": 1}, r"would not use: \['model.layers.1"),
    ],
)
def test_bad_checkpoints_fail_by_name(tmp_path, name, changes, message):
    with pytest.raises(hf.HFCheckpointError, match=message):
        hf.load(edited(tmp_path, name, **changes))


def test_missing_files_fail_by_name(tmp_path):
    with pytest.raises(hf.HFCheckpointError, match="config.json not found"):
        hf.load(str(tmp_path))
    shutil.copy(os.path.join(fixture("llama"), "config.json"), tmp_path)
    with pytest.raises(hf.HFCheckpointError, match="no model.safetensors"):
        hf.load(str(tmp_path))


def test_transformers_4_config_style_reads_the_same(tmp_path):
    """rope_theta at top level and rope_scaling (transformers 4.x) instead of rope_parameters."""
    path = edited(tmp_path, "qwen3", rope_theta=1e6, rope_parameters=None)
    model, _ = hf.load(path)
    assert model.cfg.rope_theta == 1e6
    path = edited(tmp_path / "b", "llama", rope_parameters=None, rope_theta=5e5,
                  rope_scaling={"type": "linear", "factor": 4.0})  # fmt: skip
    model, _ = hf.load(path)
    assert (model.cfg.rope_theta, model.cfg.rope_scaling, model.cfg.rope_scaling_factor) == (
        5e5, "linear", 4.0,
    )  # fmt: skip


SHARDED_LOAD = """
import sys, numpy as np, jax
from lm_align import parallel
from lm_align.models import hf
mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
name, scan = sys.argv[1], sys.argv[2] == "1"
shard = lambda m: parallel.logical_to_sharding(m.logical_axes, m.abstract_params, mesh)
model, params = hf.load(name, shardings=shard, scan_layers=scan)
_, plain = hf.load(name, scan_layers=scan)
want = shard(model)
flat = jax.tree_util.tree_flatten_with_path(params)[0]
split = 0
for (path, x), w, p in zip(flat, jax.tree.leaves(want), jax.tree.leaves(plain)):
    assert x.sharding == w, (path, x.sharding, w)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(p))
    split += len(x.sharding.spec) > 0 and any(s is not None for s in x.sharding.spec)
ref = np.load(name + "/reference.npz")
logits = jax.jit(model.apply)(params, ref["input_ids"])
print("split", split, "of", len(flat), "err", float(np.abs(logits - ref["logits"]).max() / np.abs(ref["logits"]).max()))
"""


@pytest.mark.parametrize("name, scan", [("llama", "0"), ("gemma2", "1")])
def test_loading_on_eight_devices_places_each_tensor_on_its_sharding(name, scan):
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_LOAD, fixture(name), scan],
        env=env_with_devices(8), capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    words = proc.stdout.split()
    assert int(words[1]) >= 5 and float(words[-1]) < 1e-4, proc.stdout
