"""Tests for experiment configs: loading, typed overrides, validation, and the CLI's early exit.

cfg = load_config("experiments/default.py")            # or "path.py:variant"
cfg, spec = load_experiment(None, ["train.steps=20"])  # the checkout's default experiment + overrides
cfg = apply_overrides(cfg, ["optimizer.lr=3e-3", "model.n_layers=4"])
overrides, rest = parse_override_args(sys.argv[1:])    # --config.a.b=v / --config.a.b v
model_cfg = check_config(cfg, num_devices=jax.device_count())   # ConfigError lists every problem
"""

import os
import re
import subprocess
import sys
import textwrap
import time

import ml_collections
import pytest

from lm_align.config import (
    ConfigError,
    apply_overrides,
    load_config,
    load_experiment,
    parse_override_args,
)
from lm_align.models import TransformerConfig
from lm_align.train.config import base_config
from lm_align.train.validate import check_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(REPO, "experiments", "default.py")


@pytest.fixture(scope="module")
def default_cfg():
    return load_config(DEFAULT)


# --- load_config -----------------------------------------------------------------------


def test_load_config_returns_a_locked_config_dict(default_cfg):
    assert isinstance(default_cfg, ml_collections.ConfigDict)
    assert default_cfg.is_locked
    assert default_cfg.model.qk_layernorm is True and default_cfg.data.source == "arithmetic"
    with pytest.raises(AttributeError, match="locked"):
        default_cfg.train.typo_field = 1  # a locked config rejects new fields


def test_path_colon_arg_is_passed_to_get_config(tmp_path):
    experiment = tmp_path / "widths.py"
    experiment.write_text(
        textwrap.dedent("""
        import ml_collections

        def get_config(arg=None):
            width = {None: 128, "small": 32, "large": 512}[arg]
            return ml_collections.ConfigDict({"model": {"d_model": width}})
    """)
    )
    assert load_config(str(experiment)).model.d_model == 128
    assert load_config(f"{experiment}:small").model.d_model == 32
    assert load_config(f"{experiment}:large").model.d_model == 512


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.py"))
    no_fn = tmp_path / "no_fn.py"
    no_fn.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_config(str(no_fn))


def test_load_experiment_defaults_to_the_checkouts_experiment_and_applies_overrides(tmp_path):
    cfg, spec = load_experiment(None, ["train.steps=20"])
    assert spec == DEFAULT and cfg.train.steps == 20 and cfg.is_locked
    cfg, spec = load_experiment(None, default="bench")
    assert spec.endswith(os.path.join("experiments", "bench.py")) and cfg.model.vocab_size == 8192
    variant = os.path.join(REPO, "experiments", "proxy.py") + ":no_qk_ln"
    cfg, spec = load_experiment(variant, {"optimizer.lr": 2e-3})
    assert spec == variant and cfg.model.qk_layernorm is False and cfg.optimizer.lr == 2e-3
    with pytest.raises(ConfigError, match=r"experiments/missing\.py was not found"):
        load_experiment(None, default="missing")


# --- apply_overrides -------------------------------------------------------------------


def test_overrides_are_parsed_to_the_fields_type(default_cfg):
    cfg = apply_overrides(
        default_cfg,
        [
            "train.steps=2000",
            "optimizer.lr=3e-3",
            "optimizer.b1=1",
            "model.qk_layernorm=false",
            "model.use_bias=true",
            "model.activation=swiglu",
            "train.batch_size=1e2",
            "model.head_dim=16",
        ],
    )
    assert cfg.train.steps == 2000 and type(cfg.train.steps) is int
    assert cfg.optimizer.lr == 0.003 and type(cfg.optimizer.lr) is float
    assert cfg.optimizer.b1 == 1.0 and type(cfg.optimizer.b1) is float  # int text, float field
    assert cfg.model.qk_layernorm is False and cfg.model.use_bias is True
    assert cfg.model.activation == "swiglu"
    assert cfg.train.batch_size == 100 and type(cfg.train.batch_size) is int  # "1e2" is an integer
    assert cfg.model.head_dim == 16  # a None field takes a Python literal
    assert cfg.is_locked


def test_tuple_fields_parse_python_literals():
    cfg = ml_collections.ConfigDict({"data": {"sizes": (8, 16)}})
    assert apply_overrides(cfg, ["data.sizes=(1, 2, 3)"]).data.sizes == (1, 2, 3)
    assert apply_overrides(cfg, ["data.sizes=[4, 5]"]).data.sizes == (4, 5)
    assert apply_overrides(cfg, ["data.sizes=7"]).data.sizes == (7,)


def test_programmatic_overrides_keep_python_values(default_cfg):
    cfg = apply_overrides(default_cfg, {"train.steps": 5, "optimizer.lr": 0.01})
    assert cfg.train.steps == 5 and cfg.optimizer.lr == 0.01


def test_unknown_keys_are_errors_with_suggestions(default_cfg):
    with pytest.raises(
        ConfigError, match=r"unknown config key 'optimizer\.lrr'.*Did you mean optimizer\.lr\b"
    ):
        apply_overrides(default_cfg, ["optimizer.lrr=3e-3"])
    with pytest.raises(ConfigError, match=r"'optimiser\.lr'"):
        apply_overrides(default_cfg, ["optimiser.lr=3e-3"])
    with pytest.raises(ConfigError, match=r"'model' is a group"):
        apply_overrides(default_cfg, ["model=3"])
    with pytest.raises(ConfigError, match="group.field=value"):
        apply_overrides(default_cfg, ["train.steps"])


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("train.steps=abc", "train.steps", "abc"),
        ("train.steps=2.5", "train.steps", "2.5"),
        ("model.qk_layernorm=maybe", "model.qk_layernorm", "maybe"),
        ("optimizer.lr=fast", "optimizer.lr", "fast"),
        ("train.batch_size=true", "train.batch_size", "true"),
    ],
)
def test_values_of_the_wrong_type_are_errors_naming_key_and_value(
    default_cfg, override, key, value
):
    with pytest.raises(ConfigError) as info:
        apply_overrides(default_cfg, [override])
    assert key in str(info.value) and repr(value) in str(info.value)


def test_apply_overrides_leaves_the_original_unchanged(default_cfg):
    before = default_cfg.to_dict()
    apply_overrides(default_cfg, ["train.steps=7", "model.n_layers=9", "optimizer.name=sgd"])
    assert default_cfg.to_dict() == before
    assert default_cfg.is_locked


def test_parse_override_args_splits_config_flags_from_the_rest():
    argv = [
        "train",
        "--config.train.steps=10",
        "--workdir",
        "runs/x",
        "--config.optimizer.lr",
        "3e-3",
        "--config",
        "experiments/proxy.py:no_qk_ln",
    ]
    overrides, rest = parse_override_args(argv)
    assert overrides == ["train.steps=10", "optimizer.lr=3e-3"]
    assert rest == ["train", "--workdir", "runs/x", "--config", "experiments/proxy.py:no_qk_ln"]
    with pytest.raises(ConfigError, match="needs a value"):
        parse_override_args(["train", "--config.train.steps"])


# --- check_config ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["base", "default"])
def test_check_config_accepts_the_shipped_configs(name, default_cfg):
    cfg = base_config() if name == "base" else default_cfg
    model_cfg = check_config(cfg, num_devices=1)
    assert isinstance(model_cfg, TransformerConfig) and model_cfg.d_model == cfg.model.d_model


PROBLEMS = {
    "heads": (["model.n_heads=3"], 1, r"model\.n_heads=3 does not divide model\.d_model=128"),
    "mesh": (["mesh.data=2"], 1, r"mesh data\*fsdp\*tensor = 2\*1\*1 = 2 but 1 devices"),
    "batch": (
        ["mesh.data=8", "train.batch_size=12"],
        8,
        r"train\.batch_size=12 is not divisible by the data-parallel size",
    ),
    "vocab": (
        ["model.vocab_size=200"],
        1,
        r"model\.vocab_size=200 is smaller than the tokenizer's vocabulary \(259\)",
    ),
    "optimizer": (["optimizer.name=lion"], 1, r"[Uu]nknown optimizer name 'lion'"),
    "nonfinite": (["train.nonfinite=ignore"], 1, r"train\.nonfinite='ignore' must be one of"),
}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("name", ["base", "default"])
def test_check_config_reports_each_problem(name, problem, default_cfg):
    overrides, num_devices, message = PROBLEMS[problem]
    cfg = apply_overrides(base_config() if name == "base" else default_cfg, overrides)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg, num_devices=num_devices)


def test_check_config_reports_all_problems_at_once(default_cfg):
    keys = ["heads", "optimizer", "nonfinite", "mesh"]
    overrides = [o for k in keys for o in PROBLEMS[k][0]]
    with pytest.raises(ConfigError) as info:
        check_config(apply_overrides(default_cfg, overrides), num_devices=1)
    for k in keys:
        assert re.search(PROBLEMS[k][2], str(info.value)), (k, str(info.value))


def test_check_config_reports_a_small_vocab_even_when_the_model_config_is_invalid(default_cfg):
    """The vocab check needs only model.vocab_size, so it must not wait for n_heads to be fixed."""
    cfg = apply_overrides(default_cfg, PROBLEMS["heads"][0] + PROBLEMS["vocab"][0])
    with pytest.raises(ConfigError) as info:
        check_config(cfg, num_devices=1)
    assert re.search(PROBLEMS["heads"][2], str(info.value)), str(info.value)
    assert re.search(PROBLEMS["vocab"][2], str(info.value)), str(info.value)


# --- the CLI ---------------------------------------------------------------------------


def test_cli_rejects_a_bad_override_before_compiling(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_align.cli",
            "train",
            "--config.model.n_heads=3",
            "--workdir",
            str(workdir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "model.n_heads=3" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (workdir / "checkpoints").exists()
    assert elapsed < 30, (
        f"rejecting a bad config took {elapsed:.1f}s; it should fail before compiling"
    )


def test_check_config_rejects_fields_an_experiment_file_misspelt(default_cfg):
    import ml_collections

    cfg = ml_collections.ConfigDict(default_cfg.to_dict())
    cfg.train.stpes = 5  # an experiment file can add fields; validation must catch typos
    cfg.mesh.dtaa = 2
    with pytest.raises(ConfigError) as info:
        check_config(cfg, num_devices=1)
    assert "unknown train fields ['stpes']" in str(info.value)
    assert "unknown mesh fields ['dtaa']" in str(info.value)


def test_check_config_reports_an_unknown_data_source(default_cfg):
    cfg = apply_overrides(default_cfg, ["data.source=arithmetik"])
    with pytest.raises(ConfigError, match="unknown data source 'arithmetik'"):
        check_config(cfg, num_devices=1)
