"""Experiment variants: `experiments/x.py:ARG` -> get_config(ARG) -> parse_arg(ARG, **defaults).

opts = parse_arg("dpo,quick", stage=OneOf("dpo", ("sft", "dpo", "ipo")), quick=False)
opts.stage, opts.quick        # ('dpo', True): a bare first item is the first option's value
parse_arg("steps=1e3,lr=3e-4", steps=100, lr=1e-3)      # typed from the defaults
parse_arg("no_qk_ln", qk_ln=True).qk_ln                  # False
"""

import glob
import os
import re

import ml_collections
import pytest

from lm_align.config import ConfigError, OneOf, load_config, parse_arg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")

STAGE = OneOf("dpo", ("sft", "dpo", "ipo"))


def _opts(arg):
    return parse_arg(arg, stage=STAGE, quick=False, steps=100, lr=1e-3, name="x", widths=(32, 64))


# --- worked examples -------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg, expected",
    [
        (None, {}),
        ("", {}),
        ("quick", {"quick": True}),
        ("dpo", {"stage": "dpo"}),
        ("sft,quick", {"stage": "sft", "quick": True}),
        ("stage=ipo,quick=false", {"stage": "ipo", "quick": False}),
        ("quick,stage=sft", {"stage": "sft", "quick": True}),
        ("no_quick", {"quick": False}),
        ("steps=1e3", {"steps": 1000}),
        ("lr=3e-4", {"lr": 3e-4}),
        ("lr=1", {"lr": 1.0}),
        ("name=wide", {"name": "wide"}),
        ("widths=(8, 16, 32)", {"widths": (8, 16, 32)}),
        (" ipo , quick ", {"stage": "ipo", "quick": True}),
    ],
)
def test_variant_strings_give_typed_options(arg, expected):
    defaults = {"stage": "dpo", "quick": False, "steps": 100, "lr": 1e-3, "name": "x"}
    defaults["widths"] = (32, 64)
    opts = _opts(arg)
    assert opts.to_dict() == {**defaults, **expected}
    for key, value in opts.items():
        assert type(value) is type(defaults[key]), (key, value)


def test_options_are_a_locked_config_dict():
    opts = _opts("quick")
    assert isinstance(opts, ml_collections.ConfigDict) and opts.is_locked
    with pytest.raises(AttributeError):
        opts.quik = True  # a misspelt option cannot be added later
    with pytest.raises(TypeError):
        opts.steps = "many"  # and options keep their type


def test_a_none_default_takes_a_python_literal_or_the_text():
    assert parse_arg("ckpt=7", ckpt=None).ckpt == 7
    assert parse_arg("ckpt=runs/sft", ckpt=None).ckpt == "runs/sft"


def test_a_string_first_option_takes_any_bare_first_item():
    assert parse_arg("wide,tied", size="base", tied=False).to_dict() == {
        "size": "wide",
        "tied": True,
    }


def test_one_of_needs_its_default_among_the_choices():
    with pytest.raises(ValueError, match="not in"):
        OneOf("rlhf", ("sft", "dpo"))


# --- errors: each names the option, the value and the allowed options -------------------


@pytest.mark.parametrize(
    "arg, named",
    [
        ("quik", ["'quik'", "did you mean 'quick'"]),  # a typo of a flag
        ("stage=dpoo", ["stage", "'dpoo'", "sft, dpo, ipo"]),  # not one of the choices
        ("steps=2.5", ["steps", "'2.5'", "not an integer"]),
        ("quick=maybe", ["quick", "'maybe'", "not a boolean"]),
        ("lr=fast", ["lr", "'fast'"]),
        ("steps=true", ["steps", "'true'", "not an integer"]),
        ("epochs=3", ["'epochs'"]),  # unknown key=value
        ("steps", ["'steps' needs a value", "steps=VALUE"]),  # a bare non-flag option
        ("quick,quick=false", ["'quick' is given twice"]),
        ("dpo,stage=ipo", ["'stage' is given twice"]),
        ("quick,ipo", ["'ipo'", "only as the first item", "stage=ipo"]),
    ],
)
def test_bad_variants_are_errors_naming_option_value_and_allowed_options(arg, named):
    with pytest.raises(ConfigError) as info:
        _opts(arg)
    message = str(info.value)
    assert f"variant {arg!r}" in message
    for text in [*named, "allowed options: stage (one of sft, dpo, ipo; default 'dpo')"]:
        assert text in message, (text, message)
    assert "quick (bool, default False)" in message and "steps (int, default 100)" in message


def test_an_experiment_without_options_rejects_any_variant():
    assert parse_arg(None).to_dict() == {} and parse_arg("").to_dict() == {}
    with pytest.raises(ConfigError, match="unknown option 'small'; allowed options: none"):
        parse_arg("small")


# --- the shipped experiments -----------------------------------------------------------


def _experiment(name_and_arg):
    return load_config(os.path.join(EXPERIMENTS, name_and_arg))


def test_align_arithmetic_variants():
    assert _experiment("align_arithmetic.py").align.loss == "dpo"  # no variant: DPO
    dpo = _experiment("align_arithmetic.py:dpo")
    assert dpo.align.loss == "dpo" and dpo.train.steps == 100
    quick = _experiment("align_arithmetic.py:dpo,quick")
    assert quick.align.loss == "dpo" and quick.train.steps == 10
    assert _experiment("align_arithmetic.py:quick").to_dict() == quick.to_dict()
    assert _experiment("align_arithmetic.py:stage=dpo,quick=true").to_dict() == quick.to_dict()
    assert _experiment("align_arithmetic.py:rso_sigmoid_norm").align.loss == "rso_sigmoid_norm"
    base = _experiment("align_arithmetic.py:base,quick")
    assert "align" not in base and base.train.steps == 250
    assert _experiment("align_arithmetic.py:base").train.steps == 600
    assert _experiment("align_arithmetic.py:dpo_beta01").align.beta == 0.1
    rest_em = _experiment("align_arithmetic.py:rest_em")
    assert "align" not in rest_em and rest_em.optimizer.lr == 1e-4
    assert _experiment("align_arithmetic.py:bon_rlb").align.format == "samples"
    with pytest.raises(ConfigError, match="'dpoo'"):
        _experiment("align_arithmetic.py:dpoo")


def test_self_improvement_variants():
    assert _experiment("rest_em_arithmetic.py:base,quick").train.steps == 250
    mstep = _experiment("rest_em_arithmetic.py:mstep,quick")
    assert mstep.train.steps == 15 and mstep.optimizer.lr == 1e-3
    assert _experiment("rest_em_arithmetic.py:mstep").train.steps == 150
    bon = _experiment("bon_arithmetic.py:bon_rlb_p,quick")
    assert bon.align.loss == "bon_rlb_p" and bon.align.format == "samples" and bon.train.steps == 4
    assert _experiment("bon_arithmetic.py:quick").train.steps == 250  # the base policy
    with pytest.raises(ConfigError, match="stage"):
        _experiment("rest_em_arithmetic.py:estep")


def test_scaling_variants():
    assert _experiment("proxy.py").model.qk_layernorm is True
    assert _experiment("proxy.py:no_qk_ln").model.qk_layernorm is False
    assert _experiment("proxy.py:qk_ln=false").model.qk_layernorm is False
    sp = _experiment("transfer.py:sp")
    assert sp.param.name == "standard" and sp.param.base_width is None
    per_layer = _experiment("transfer.py:sp_per_layer")
    assert per_layer.param.name == "standard" and per_layer.param.base_width == 32
    assert _experiment("transfer.py:mup").param.name == "mup"
    assert _experiment("transfer.py").param.name == "mup"
    with pytest.raises(ConfigError, match="'spp'"):
        _experiment("transfer.py:spp")


@pytest.mark.parametrize(
    "name", ["default.py", "bench.py", "bench_dpo.py", "kg_hallucination.py", "lr_width.py"]
)
def test_experiments_without_variants_reject_one(name):
    _experiment(name)
    with pytest.raises(ConfigError, match="unknown option 'small'"):
        _experiment(f"{name}:small")


# Variants naming a run that exists only after earlier commands (tested in test_hf_cli.py).
NEED_A_RUN = ("hf_finetune.py",)


def _documented_variants():
    """Every `experiments/NAME.py:ARG` written in the README, docs, CI script, tests
    and experiment docstrings (except NEED_A_RUN's)."""
    paths = [os.path.join(REPO, "README.md"), os.path.join(REPO, ".ci", "run")]
    for pattern in ("docs/**/*.md", "tests/*.py", "experiments/*.py", "lm_align/**/*.py"):
        paths += glob.glob(os.path.join(REPO, pattern), recursive=True)
    found = set()
    for path in paths:
        if os.path.isfile(path):
            with open(path) as f:
                found.update(re.findall(r"experiments/(\w+\.py):([\w=,.]+)", f.read()))
    return sorted(
        (name, arg)
        for name, arg in found
        if os.path.exists(os.path.join(EXPERIMENTS, name)) and name not in NEED_A_RUN
    )


def test_every_documented_variant_loads():
    variants = _documented_variants()
    assert ("align_arithmetic.py", "quick") in variants and ("proxy.py", "no_qk_ln") in variants
    for name, arg in variants:
        _experiment(f"{name}:{arg.rstrip('.,')}")


def test_experiments_import_shared_configs_from_the_package():
    """No sys.path edits or sibling imports: each experiment file loads on its own."""
    for path in glob.glob(os.path.join(EXPERIMENTS, "*.py")):
        with open(path) as f:
            source = f.read()
        assert "sys.path" not in source, path
        siblings = {
            os.path.splitext(os.path.basename(p))[0] for p in glob.glob(f"{EXPERIMENTS}/*.py")
        }
        imported = set(re.findall(r"^\s*(?:from|import)\s+(\w+)", source, re.M))
        assert not imported & siblings, (path, imported & siblings)
