"""LoRA (`lm_align.models.lora`): the merge against x W + s (x A) B, PEFT adapters against
PEFT's own logits, training only the adapters, LoRA DPO with the base as its reference,
8 devices = 1, and the Hugging Face round trip of a LoRA run."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_align import config as config_lib
from lm_align.cli import main
from lm_align.config import ConfigError
from lm_align.models import TransformerConfig, hf
from lm_align.models.lora import Lora, LoraConfig, resolve_targets
from lm_align.models.pure import PureModel
from lm_align.train import checkpoint, train
from lm_align.train.config import base_config
from lm_align.train.load import load_run
from lm_align.train.setup import build_experiment
from tests.helpers import REPO, env_with_devices

FIXTURES = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "hf")
OTHER_BASES = os.path.join(REPO, "tests", "data", "hf")
ADAPTERS = os.path.join(REPO, "tests", "data", "hf_lora")  # written by peft (make_adapters.py)
PEFT_ADAPTERS = sorted(d for d in os.listdir(ADAPTERS) if os.path.isdir(os.path.join(ADAPTERS, d)))


def base_dir(name):
    shared = os.path.join(FIXTURES, name)
    return shared if os.path.isdir(shared) else os.path.join(OTHER_BASES, name)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def relative_error(logits, reference):
    return float(np.max(np.abs(np.asarray(logits) - reference)) / np.max(np.abs(reference)))


def random_like(abstract, seed=1, scale=0.1):
    """Random float32 arrays (numpy) shaped like a tree of ShapeDtypeStructs: parameters,
    or adapters with A and B both nonzero (B = 0 would leave the model unchanged)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (scale * rng.normal(size=a.shape)).astype(np.float32), abstract)


# ---------------------------------------------------------------------------
# The merge.

GQA_SWIGLU = TransformerConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                               head_dim=4, d_ff=24, activation="swiglu", norm="rmsnorm")  # fmt: skip
MHA_GELU = TransformerConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=24)


def _weight_slice(t, w, cfg):
    """The [inputs, outputs] matrix a target adapts, cut from its weight by the documented layout
    (docs/checkpoints.md, Names and layouts), written independently of the merge."""
    w = np.asarray(w, np.float64)
    if t.name == "o":
        return w.reshape(-1, cfg.d_model)  # [H, K, D] -> [H K, D]
    if t.slot is not None:
        w = w[:, t.slot]  # q/k/v of [D, 3 or 1 or 2, heads, K]; gate/up of [D, n, F]
    return w.reshape(w.shape[0], -1)


@pytest.mark.parametrize("cfg", [GQA_SWIGLU, MHA_GELU], ids=["gqa_swiglu", "mha_gelu"])
def test_merged_weight_computes_x_w_plus_s_x_a_b(cfg):
    """For every target: x W' = x W + s (x A) B (the unmerged adapter, float64 numpy),
    and every other slice of the weight is unchanged."""
    names = ("q", "k", "v", "o", "up", "down") + (("gate",) if cfg.activation != "gelu" else ())
    model = PureModel(cfg)
    lora = Lora(model, LoraConfig(rank=3, alpha=6.0, targets=names + ("readout",)))
    params, adapters = random_like(model.abstract_params, 0), random_like(lora.abstract_params)
    merged = jax.device_get(jax.jit(lora.merge)(params, adapters))
    rng = np.random.default_rng(0)
    for t in lora.targets:
        for i in range(cfg.n_layers) if t.per_layer else [None]:
            path = lora.weight_path(t, i)
            w, w2 = params, merged
            for k in path:
                w, w2 = w[k], w2[k]
            pair = adapters["blocks"][i][t.name] if t.per_layer else adapters[t.name]
            a = np.asarray(pair["A"], np.float64).reshape(-1, 3)
            b = np.asarray(pair["B"], np.float64).reshape(3, -1)
            x = rng.normal(size=(5, a.shape[0]))
            want = x @ _weight_slice(t, w, cfg) + 2.0 * (x @ a) @ b
            got = x @ _weight_slice(t, w2, cfg)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{t.name} {i}")
            if t.slot is not None:  # the other projections of a stacked weight stay as they were
                others = [j for j in range(w.shape[1]) if j != t.slot]
                touched = {u.slot for u in lora.targets if u.path == t.path}
                for j in set(others) - touched:
                    np.testing.assert_array_equal(np.asarray(w2)[:, j], np.asarray(w)[:, j])


def test_zero_b_gives_the_base_logits_exactly_and_unmerge_restores_the_base():
    ids = np.load(os.path.join(FIXTURES, "llama", "reference.npz"))["input_ids"]
    for scan in (False, True):
        model, params = hf.load(os.path.join(FIXTURES, "llama"), scan_layers=scan)
        lora = Lora(model, LoraConfig(rank=4, targets=("attn", "mlp", "readout")))
        merge = jax.jit(lora.merge)
        adapters = random_like(lora.abstract_params)
        zero_b = jax.tree.map(lambda x: x, adapters)
        for pair in jax.tree.leaves(zero_b, is_leaf=lambda x: isinstance(x, dict) and "B" in x):
            pair["B"] = np.zeros_like(pair["B"])
        # B = 0: every merged weight is the base weight, bit for bit.
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(merge(params, zero_b)), params)
        moved = merge(params, adapters)
        back = jax.jit(lora.unmerge)(moved, adapters)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), back, params)
    apply = jax.jit(model.apply)
    base = np.asarray(apply(params, ids))
    np.testing.assert_array_equal(apply(merge(params, zero_b), ids), base)
    assert relative_error(apply(moved, ids), base) > 1e-2


def test_adapters_carry_their_weights_axes_and_a_replicated_rank_axis():
    model = PureModel(GQA_SWIGLU.__class__(**{**GQA_SWIGLU.__dict__, "scan_layers": True}))
    lora = Lora(model, LoraConfig(rank=2, targets=("q", "k", "o", "down", "readout")))
    axes = lora.logical_axes
    assert axes["blocks"]["q"] == {
        "A": ("layers", "embed", None),
        "B": ("layers", None, "heads", "head_dim"),
    }
    assert axes["blocks"]["k"]["B"] == ("layers", None, "kv_heads", "head_dim")
    assert axes["blocks"]["o"] == {
        "A": ("layers", "heads", "head_dim", None),
        "B": ("layers", None, "embed"),
    }
    assert axes["blocks"]["down"] == {"A": ("layers", "mlp", None), "B": ("layers", None, "embed")}
    assert axes["readout"] == {"A": ("embed", None), "B": (None, "vocab")}
    assert lora.abstract_params["blocks"]["o"]["A"].shape == (2, 4, 4, 2)
    # Kaiming-uniform A (PEFT's): |A| <= 1/sqrt(fan_in), B = 0.
    a = jax.jit(lora.init, static_argnums=0)(0)["blocks"]["down"]
    assert float(jnp.max(jnp.abs(a["A"]))) <= 1 / np.sqrt(24) and not jnp.any(a["B"])


@pytest.mark.parametrize(
    "cfg, lora, message",
    [
        (MHA_GELU, {"dropout": 0.1}, "lora.dropout=0.1"),
        (MHA_GELU, {"targets": ("q", "ffn")}, "unknown ['ffn']"),
        (MHA_GELU, {"targets": ("gate",)}, "a GeLU MLP has no gate"),
        (GQA_SWIGLU, {"targets": ("qkv",)}, "n_kv_heads=2 < n_heads=4"),
        (MHA_GELU.__class__(**{**MHA_GELU.__dict__, "tie_embeddings": True}), {"targets": ("readout",)},
         "ties its readout"),
        (MHA_GELU, {"targets": ("qkv", "v")}, "adapt the same weight"),
    ],
)  # fmt: skip
def test_bad_lora_configs_fail_by_name(cfg, lora, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        resolve_targets(cfg, LoraConfig(**{"rank": 2, **lora}).targets)


def test_config_check_reports_lora_problems_before_compiling():
    cfg = config_lib.apply_overrides(base_config(), ["lora.rank=4", "lora.dropout=0.05",
                                                     "lora.targets=('gate',)"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"lora.dropout=0.05(.|\n)*"):
        build_experiment(cfg)
    cfg = config_lib.apply_overrides(base_config(), ["lora.rank=4", "lora.targets=('gate',)"])
    with pytest.raises(ConfigError, match="a GeLU MLP has no gate"):
        build_experiment(cfg)


# ---------------------------------------------------------------------------
# PEFT adapters.


@pytest.mark.parametrize("scan_layers", [False, True], ids=["layers", "scan"])
def test_the_fixture_adapter_reproduces_peft_logits(scan_layers):
    ref = np.load(os.path.join(FIXTURES, "llama_lora", "reference.npz"))
    model, params = hf.load(os.path.join(FIXTURES, "llama"), scan_layers=scan_layers,
                            adapter=os.path.join(FIXTURES, "llama_lora"))  # fmt: skip
    logits = jax.jit(model.apply)(params, ref["input_ids"])
    assert relative_error(logits, ref["logits"]) < 1e-4
    assert relative_error(logits, ref["base_logits"]) > 1e-2  # the adapter matters


@pytest.mark.parametrize("name", PEFT_ADAPTERS)
def test_other_ranks_targets_and_families_reproduce_peft_logits(name):
    """PEFT's logits are the unmerged forward x W + s (x A) B; ours merge. 1e-5 in float32."""
    path = os.path.join(ADAPTERS, name)
    config = read_json(os.path.join(path, "adapter_config.json"))
    ref = np.load(os.path.join(path, "reference.npz"))
    scan = PEFT_ADAPTERS.index(name) % 2 == 1
    model, params = hf.load(base_dir(config["base_model_name_or_path"]), scan_layers=scan,
                            adapter=path)  # fmt: skip
    assert relative_error(jax.jit(model.apply)(params, ref["input_ids"]), ref["logits"]) < 1e-5


@pytest.mark.parametrize("base, targets", [("llama", ("q", "v", "o", "gate", "readout")),
                                           ("gpt2", ("qkv", "o", "up", "down"))])  # fmt: skip
def test_peft_export_then_import_is_identical(tmp_path, base, targets):
    model, params = hf.load(os.path.join(FIXTURES, base))
    lora = Lora(model, LoraConfig(rank=3, alpha=4.0, rslora=True, targets=targets))
    adapters = random_like(lora.abstract_params)
    files = hf.save_adapter(model, lora, adapters, str(tmp_path), base_model="base")
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = read_json(tmp_path / "adapter_config.json")
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (3, 4.0, True)
    again, back = hf.load_adapter(str(tmp_path), model)
    assert again.cfg.scale == lora.cfg.scale and [t.name for t in again.targets] == list(targets)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)  # bit for bit: identical logits
    if base == "llama":
        apply, merge = jax.jit(model.apply), jax.jit(lora.merge)
        ids = np.arange(24).reshape(2, 12) % model.cfg.vocab_size
        want = np.asarray(apply(merge(params, adapters), ids))
        np.testing.assert_array_equal(apply(merge(params, back), ids), want)
        _, loaded = hf.load(os.path.join(FIXTURES, base), adapter=str(tmp_path))  # merged on load
        assert relative_error(apply(loaded, ids), want) < 1e-6


def _edited_adapter(tmp_path, drop=None, **config_changes):
    from safetensors.numpy import load_file, save_file

    src, dst = os.path.join(FIXTURES, "llama_lora"), tmp_path / "adapter"
    os.makedirs(dst)
    config = read_json(os.path.join(src, "adapter_config.json"))
    with open(dst / "adapter_config.json", "w") as f:
        json.dump({**config, **config_changes}, f)
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if k != drop}, str(dst / "adapter_model.safetensors")
    )
    return str(dst)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"bias": "lora_only"}, "bias='lora_only' is not supported"),
        ({"peft_type": "IA3"}, "only LORA"),
        ({"r": 8}, r"lora_A.weight has shape \(4, 64\), but r and the model imply \(8, 64\)"),
        ({"drop": "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"},
         "lacks.*layers.1.self_attn.v_proj.lora_B"),
    ],
)  # fmt: skip
def test_adapters_lm_align_cannot_apply_fail_by_name(tmp_path, changes, message):
    drop = changes.pop("drop", None)
    with pytest.raises(hf.HFCheckpointError, match=message):
        hf.load(os.path.join(FIXTURES, "llama"), adapter=_edited_adapter(tmp_path, drop, **changes))
    with pytest.raises(hf.HFCheckpointError, match="cannot map onto this gpt2"):
        hf.load(os.path.join(FIXTURES, "gpt2"), adapter=os.path.join(FIXTURES, "llama_lora"))


def test_a_slice_of_a_fused_module_is_refused_on_export(tmp_path):
    model, _ = hf.load(os.path.join(FIXTURES, "gpt2"))
    lora = Lora(model, LoraConfig(rank=2, targets=("q",)))
    with pytest.raises(hf.HFCheckpointError, match="target 'qkv' instead"):
        hf.save_adapter(model, lora, lora.init(0), str(tmp_path))


# ---------------------------------------------------------------------------
# LoRA DPO: the reference is the base, adapters off.

ALIGN_EXPERIMENT = textwrap.dedent("""
    from lm_align.align.config import align_base_config

    def get_config(arg=None):
        cfg = align_base_config()
        cfg.align.train_file = {train!r}
        cfg.align.eval_file = {eval!r}
        cfg.align.max_len = 16
        cfg.align.eval_prompts = 0
        cfg.model.update(d_model=32, n_layers=2, n_heads=2, d_ff=64, vocab_size=260)
        cfg.train.update(steps=16, batch_size=8, log_every=1, eval_every=8, checkpoint_every=1000,
                         answer_eval_examples=0, progress=False, tensorboard=False)
        cfg.optimizer.lr = 3e-3
        cfg.optimizer.warmup_steps = 2
        cfg.lora.rank = 4
        cfg.lora.targets = ("q", "v")
        return cfg
""")


@pytest.fixture(scope="module")
def preference_experiment(tmp_path_factory):
    """Arithmetic pairs: the sum preferred over ten times the sum; held-out problems apart."""
    root = tmp_path_factory.mktemp("lora_dpo")
    rng = np.random.default_rng(0)
    records = []
    for _ in range(96):
        a, b = (int(x) for x in rng.integers(10, 99, 2))
        records.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": f"{a + b}0"})
    for name, part in (("train", records[:64]), ("eval", records[64:])):
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    path = root / "exp.py"
    path.write_text(
        ALIGN_EXPERIMENT.format(train=str(root / "train.jsonl"), eval=str(root / "eval.jsonl"))
    )
    return str(path)


def _rows(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_lora_dpo_starts_at_zero_reward_and_learns_the_preference(preference_experiment, tmp_path):
    from lm_align.align.trainer import align

    cfg = config_lib.load_config(preference_experiment)
    result = align(cfg, str(tmp_path / "dpo"), devices=jax.devices()[:1])
    rows = _rows(tmp_path / "dpo")
    start, first, end = rows[0], rows[1], rows[-1]
    assert start["step"] == 0 and first["step"] == 1
    for key in ("eval_reward_chosen", "eval_reward_rejected", "eval_reward_margin"):
        assert start[key] == 0.0, key  # policy = reference exactly: B = 0
    for key in ("reward_chosen", "reward_rejected", "reward_margin"):
        assert first[key] == 0.0, key  # the first step's policy, before its update
    assert start["eval_reward_accuracy"] == 0.5 and first["loss"] == pytest.approx(
        np.log(2), abs=1e-6
    )
    assert end["eval_reward_accuracy"] >= 0.9 > start["eval_reward_accuracy"]
    assert jax.tree.structure(result.state.params) == jax.tree.structure(
        {"blocks": {i: {"q": {"A": 0, "B": 0}, "v": {"A": 0, "B": 0}} for i in range(2)}}
    )


SHARDING_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from lm_align import config as config_lib
    from lm_align.align.trainer import align
    config, root = sys.argv[1:]
    devs = jax.devices()
    assert len(devs) == 8, devs
    base = config_lib.apply_overrides(config_lib.load_config(config), [
        "train.steps=6", "train.eval_every=0", "align.eval_file=", "align.precompute_reference=false",
        "lora.targets=('attn', 'mlp', 'readout')"])
    align(config_lib.apply_overrides(base, ["mesh.data=1"]), f"{root}/one", devices=devs[:1])
    r = align(config_lib.apply_overrides(base, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
              f"{root}/many", devices=devs)
    spec = lambda x: [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
    specs = {name: [spec(r.state.params["blocks"][0][name][k]) for k in "AB"]
             for name in ("q", "o", "down")}
    specs["readout"] = [spec(r.state.params["readout"][k]) for k in "AB"]
    print(json.dumps(specs))
""")


def test_lora_dpo_on_eight_devices_matches_one(preference_experiment, tmp_path):
    """data 2 x fsdp 2 x tensor 2 vs 1 device, the reference (the base) scored in every step;
    the adapters are sharded like their weights (rank axis replicated)."""
    proc = subprocess.run(
        [sys.executable, "-c", SHARDING_SCRIPT, preference_experiment, str(tmp_path)],
        env=env_with_devices(8), capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    specs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert specs == {  # parallel.LOGICAL_RULES on each adapter's logical axes
        "q": [["fsdp", None], [None, "tensor", None]],  # embed | heads, head_dim
        "o": [["tensor", None, None], [None, "fsdp"]],  # heads, head_dim | embed
        "down": [["tensor", None], [None, "fsdp"]],  # mlp | embed
        "readout": [["fsdp", None], [None, ["tensor", "fsdp"]]],  # embed | vocab
    }
    one, many = (
        {r["step"]: r["loss"] for r in _rows(tmp_path / w) if "loss" in r} for w in ("one", "many")
    )
    assert sorted(one) == sorted(many) == list(range(1, 7)) and one[1] != one[6]
    np.testing.assert_allclose([many[s] for s in one], [one[s] for s in one], rtol=1e-5)


# ---------------------------------------------------------------------------
# LoRA SFT of an imported model: only adapters train, resume, export merged and for PEFT.


def _losses(workdir):
    return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


def test_lora_sft_of_an_imported_model_trains_adapters_only_resumes_and_exports(tmp_path, capsys):
    """hf import -> LoRA SFT (experiments/hf_finetune.py, 4 steps) -> the state and optimizer
    state hold adapters only, the run's model is the base with them merged, a run resumed
    from step 2 repeats steps 3-4 exactly -> hf export merged and --peft: the PEFT adapter
    on the base gives the merged export's logits."""
    llama = os.path.join(FIXTURES, "llama")
    with open(tmp_path / "sft.jsonl", "w") as f:
        f.writelines(
            json.dumps({"prompt": f"{k} plus one:", "completion": f" {k + 1}"}) + "\n"
            for k in range(40)
        )
    assert main(["hf", "import", llama, "--workdir", str(tmp_path / "base")]) == 0
    spec = (
        f"{REPO}/experiments/hf_finetune.py:sft,run={tmp_path / 'base'},"
        f"data={tmp_path / 'sft.jsonl'},steps=4,batch_size=4,seq_len=16,lora=4,lr=1e-2"
    )
    cfg = config_lib.apply_overrides(
        config_lib.load_config(spec),
        ["train.checkpoint_every=2", "train.progress=false", "train.tensorboard=false"],
    )
    sft = str(tmp_path / "sft")
    state = train(cfg, sft, devices=jax.devices()[:1]).state
    # Only the adapters train: the state, Adam's moments and the checkpoint hold nothing else.
    model, base = hf.load(llama)
    lora = Lora(model, LoraConfig(rank=4, alpha=8.0, targets=("attn", "mlp")))  # hf_finetune's
    assert jax.tree.structure(state.params) == jax.tree.structure(lora.abstract_params)
    shapes = {x.shape for x in jax.tree.leaves(lora.abstract_params)}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert all(x.shape in shapes for x in moments)
    assert sum(x.size for x in moments) == 2 * lora.num_params()
    with pytest.raises(ValueError, match="holds a different model: parameters missing"):
        checkpoint.load_params(checkpoint.resolve(sft), model.abstract_params)
    # The run as a model: the imported weights with the adapters merged in.
    _, merged, _ = load_run(sft)
    merged = jax.device_get(merged)
    jax.tree.map(
        np.testing.assert_array_equal, merged, jax.device_get(lora.merge(base, state.params))
    )
    for name in ("embed", "readout", "final_norm"):  # untargeted: bit for bit the import
        jax.tree.map(np.testing.assert_array_equal, merged[name], base[name])
    assert not np.array_equal(merged["blocks"][0]["attn"]["q"], base["blocks"][0]["attn"]["q"])
    # Resume: the same run with its step-4 checkpoint removed continues from step 2.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(sft, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    os.remove(os.path.join(resumed, "final.json"))
    assert train(cfg, resumed, devices=jax.devices()[:1]).final_step == 4
    assert _losses(resumed) == _losses(sft) and sorted(_losses(sft)) == [1, 2, 3, 4]
    # Export: merged, and the adapters for PEFT.
    capsys.readouterr()
    assert main(["hf", "export", sft, "--out", str(tmp_path / "merged")]) == 0
    assert main(["hf", "export", sft, "--out", str(tmp_path / "peft"), "--peft"]) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    ids = np.load(os.path.join(llama, "reference.npz"))["input_ids"]
    apply = jax.jit(model.apply)
    want = np.asarray(apply(merged, ids))
    _, exported = hf.load(str(tmp_path / "merged"))
    _, adapted = hf.load(llama, adapter=str(tmp_path / "peft"))
    assert relative_error(apply(exported, ids), want) < 1e-6
    assert relative_error(apply(adapted, ids), want) < 1e-6
    assert relative_error(apply(base, ids), want) > 1e-3  # four steps moved it
    # A full-weight run has no adapters to export.
    assert (
        main(["hf", "export", str(tmp_path / "base"), "--out", str(tmp_path / "x"), "--peft"]) == 2
    )
    assert "trained every parameter" in capsys.readouterr().err
