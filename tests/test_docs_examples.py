"""The docs cannot go stale: their examples run, and their tables match the code.

- Every ```python block of docs/optim.md is executed on its own (a fresh
  namespace), exactly as a reader would paste it.
- docs/configs.md has one table per config group listing every field, with
  its default as a Python expression; both are compared with the code.
- docs/metrics.md lists every key a metrics.jsonl row can hold.
"""

import dataclasses
import math
import os
import re

import pytest

from tests.helpers import DEFAULT_EXPERIMENT, REPO

DOCS = os.path.join(REPO, "docs")
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|([^|]*)\|([^|]*)\|", re.M)


def _read(name):
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read()


def _python_blocks(name):
    return FENCE.findall(_read(name))


OPTIM_BLOCKS = _python_blocks("optim.md")


def test_optim_md_has_examples():
    assert len(OPTIM_BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(OPTIM_BLOCKS)))
def test_optim_md_example_runs(index):
    code = OPTIM_BLOCKS[index]
    exec(compile(code, f"docs/optim.md[python block {index}]", "exec"), {"__name__": "__docs__"})


LISTWISE_BLOCKS = _python_blocks("listwise.md")
SCALING_BLOCKS = _python_blocks("scaling.md")


@pytest.mark.parametrize(
    "name, index",
    [("listwise.md", i) for i in range(len(LISTWISE_BLOCKS))]
    + [("scaling.md", i) for i in range(len(SCALING_BLOCKS))],
)
def test_listwise_and_scaling_md_examples_run(name, index):
    code = _python_blocks(name)[index]
    exec(compile(code, f"docs/{name}[python block {index}]", "exec"), {"__name__": "__docs__"})


# ----------------------------------------------------------------------------
# docs/configs.md: one table per group, every field, the right defaults
# ----------------------------------------------------------------------------


def _group_defaults():
    from lm_align import data, optim, parameterization
    from lm_align.align.config import ALIGN_DEFAULTS
    from lm_align.align.rl_config import RL_DEFAULTS
    from lm_align.models import TransformerConfig
    from lm_align.models.lora import LORA_DEFAULTS
    from lm_align.train.config import MESH_DEFAULTS, TRAIN_DEFAULTS

    return {
        "train": dict(TRAIN_DEFAULTS),
        "mesh": dict(MESH_DEFAULTS),
        "model": {f.name: f.default for f in dataclasses.fields(TransformerConfig)},
        "optimizer": dict(optim.DEFAULTS),
        "param": dict(parameterization.DEFAULTS),
        "data": dict(data.DEFAULTS),
        "align": dict(ALIGN_DEFAULTS),
        "lora": dict(LORA_DEFAULTS),
        "rl": dict(RL_DEFAULTS),
    }


def _group_table(group):
    """{field: (default cell, default.py cell)} of the table under `### group`."""
    text = _read("configs.md")
    match = re.search(rf"^### {group}\s*$(.*?)(?=^#{{1,3}} |\Z)", text, re.S | re.M)
    assert match, f"docs/configs.md has no '### {group}' section"
    return {
        field: (default.strip(), experiment.strip())
        for field, default, experiment in ROW.findall(match.group(1))
    }


def _cell_value(cell):
    assert cell.startswith("`") and cell.endswith("`"), f"default cell {cell!r} must be `code`"
    return eval(cell.strip("`"), {"math": math})  # noqa: S307 - our own docs


@pytest.mark.parametrize(
    "group", ["train", "mesh", "model", "optimizer", "param", "data", "lora", "align", "rl"]
)
def test_configs_md_lists_every_field_with_its_default(group):
    defaults = _group_defaults()[group]
    table = _group_table(group)
    missing = sorted(set(defaults) - set(table))
    assert not missing, f"docs/configs.md '### {group}' table lacks fields {missing}"
    stale = sorted(set(table) - set(defaults))
    assert not stale, f"docs/configs.md '### {group}' documents fields the code lacks: {stale}"
    for field, value in defaults.items():
        documented = _cell_value(table[field][0])
        assert documented == value and type(documented) is type(value), (
            f"{group}.{field}: docs say {table[field][0]}, code default is {value!r}"
        )


@pytest.mark.parametrize("group", ["train", "mesh", "model", "optimizer", "param", "data", "lora"])
def test_configs_md_default_py_column_matches_the_experiment(group):
    from lm_align import config as config_lib

    cfg = config_lib.load_config(DEFAULT_EXPERIMENT)
    defaults = _group_defaults()[group]
    for field, (_, experiment_cell) in _group_table(group).items():
        actual = cfg[group][field]
        if experiment_cell:
            assert actual == _cell_value(experiment_cell), (
                f"{group}.{field}: docs say default.py sets {experiment_cell}, it sets {actual!r}"
            )
        else:
            assert actual == defaults[field], (
                f"{group}.{field}: default.py sets {actual!r}; add it to the default.py column"
            )


# ----------------------------------------------------------------------------
# docs/metrics.md: every metrics.jsonl key is documented
# ----------------------------------------------------------------------------


def test_metrics_md_documents_every_row_key():
    import jax
    import jax.numpy as jnp

    from lm_align import optim
    from lm_align.models import TransformerConfig
    from lm_align.models.pure import PureModel
    from lm_align.train.step import BATCH_KEYS, init_state, make_train_step

    model = PureModel(TransformerConfig(d_model=8, n_layers=1, n_heads=1, d_ff=8))
    opt = optim.make_optimizer({}, total_steps=10)
    step_fn = make_train_step(model, opt.tx, opt.schedule)
    state = jax.eval_shape(lambda: init_state(model, opt.tx, 0))
    batch = {
        k: jax.ShapeDtypeStruct((2, 4), jnp.float32 if k == "loss_mask" else jnp.int32)
        for k in BATCH_KEYS
    }
    _, metrics = jax.eval_shape(step_fn, state, batch)
    # The loop drops the internal `finite` flag and adds step, throughput and eval keys.
    keys = (set(metrics) - {"finite"}) | {
        "step",
        "tokens_per_s",
        "tokens",
        "eval_loss",
        "eval_accuracy",
    }
    # Per-parameter keys (`param_rms/blocks.attn.qkv`) are documented as `param_rms/<param>`.
    keys = {k.split("/")[0] + "/<param>" if "/" in k else k for k in keys}
    assert {"param_rms/<param>", "grad_rms/<param>", "update_rms/<param>"} <= keys
    documented = set(re.findall(r"^\|\s*`([^`]+)`\s*\|", _read("metrics.md"), re.M))
    missing = sorted(keys - documented)
    assert not missing, f"docs/metrics.md does not document metrics.jsonl keys {missing}"


def test_metrics_md_documents_every_align_row_key():
    import jax
    import jax.numpy as jnp
    import ml_collections

    from lm_align import optim
    from lm_align.align import trainer
    from lm_align.align.config import ALIGN_DEFAULTS, LOSSES
    from lm_align.align.logprobs import sequence_logprobs
    from lm_align.models import TransformerConfig
    from lm_align.models.pure import PureModel
    from lm_align.train.step import init_state

    model = PureModel(TransformerConfig(d_model=8, n_layers=1, n_heads=1, d_ff=8))
    opt = optim.make_optimizer({}, total_steps=10)
    state = jax.eval_shape(lambda: init_state(model, opt.tx, 0))
    rows = {
        k: jax.ShapeDtypeStruct((2, 2, 4), jnp.float32 if k == "loss_mask" else jnp.int32)
        for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")
    }
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    batch = {
        "rows": rows, "labels": f32(2, 2), "mask": jax.ShapeDtypeStruct((2, 2), bool),
        "soft_label": f32(2), "lengths": f32(2, 2), "weight": f32(2), "ref_logps": f32(2, 2),
    }  # fmt: skip

    def score_rows(params, rows):
        return sequence_logprobs(model, params, rows).logps

    keys = set()
    for loss in LOSSES:
        a = ml_collections.ConfigDict({**ALIGN_DEFAULTS, "loss": loss})
        step = trainer.make_align_step(a, score_rows, opt.tx, opt.schedule)
        _, metrics = jax.eval_shape(step, state, batch)
        keys |= set(metrics) - {"finite"}
        keys |= {f"eval_{k}" for k in metrics if k not in ("grad_norm", "lr", "finite", "skipped")}
    keys |= {"step", "tokens_per_s", "tokens"}
    keys |= {"eval_kl", "eval_response_length", "eval_sample_reward", "eval_answer_exact_match"}
    documented = set(re.findall(r"^\|\s*`([^`]+)`\s*\|", _read("metrics.md"), re.M))
    missing = sorted(keys - documented)
    assert not missing, f"docs/metrics.md does not document align metrics.jsonl keys {missing}"
