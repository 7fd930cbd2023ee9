"""Test-suite settings.

CI (`.ci/run`: `pytest -q -n 2 --dist loadfile -m "slow or not slow"`, every
test) must finish within 15 minutes on 2 CPU cores. The variants below repeat
a check the default run already makes (another parameterization, another
decoder setting, another data source end to end) and are marked `slow`: the
default run skips them, `-m slow` runs only them.
"""

import os

import pytest

from tests.helpers import TEST_XLA_FLAGS

# Before any test module imports jax (see tests/helpers.py).
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

SLOW_VARIANTS = (
    # Another row of the same closed-form check; full-standard and none-mup stay.
    "test_param_integration.py::test_trainer_step_one_update_is_eta_C_r_to_the_minus_c[full-ntk]",
    "test_param_integration.py::test_trainer_step_one_update_is_eta_C_r_to_the_minus_c[full-mfp]",
    "test_param_integration.py::test_trainer_step_one_update_is_eta_C_r_to_the_minus_c[none-mfp]",
    "test_param_integration.py::test_trainer_step_one_update_is_eta_C_r_to_the_minus_c[none-standard]",
    "test_param_integration.py::test_trainer_step_one_update_is_eta_C_r_to_the_minus_c[none-ntk]",
    "test_param_integration.py::test_trainer_step_one_update_is_eta_C_r_to_the_minus_c[full-mup]",
    "test_param_integration.py::test_abc_symmetry_of_the_whole_train_step[adam_atan2]",
    # Further decoder settings; kw0 stays.
    "test_sampling.py::test_greedy_with_the_cache_equals_step_by_step_decoding[kw1]",
    "test_sampling.py::test_greedy_with_the_cache_equals_step_by_step_decoding[kw2]",
    # The listwise variant of the 8-device check; the pairwise one stays.
    "test_align_trainer.py::test_eight_devices_match_one[lipo_lambda-lists]",
    "test_align_trainer.py::test_reference_in_every_step_equals_precomputed",
    # End-to-end training from each data source (their readers are tested fast).
    "test_kg_facts.py::test_end_to_end_train_steps",
    "test_text_source_train.py::test_text_files_train_end_to_end",
    "test_seqio_source.py::test_trains_end_to_end",
    "test_tfds_source.py::test_trains_end_to_end",
    "test_jsonl.py::test_end_to_end_train_steps",
    "test_stdlib_source.py::test_tiny_training_run_on_the_stdlib",
    # The coordinate check behind the SGD cells of the abc table; the derivation
    # tests of the same file run by default.
    "test_abc_constraints.py::test_sgd_coordinate_check_agrees_with_the_min",
    # Engine paths with a faster sibling in the default run.
    "test_coordcheck.py::test_cli_prints_slopes_as_json_and_writes_the_plot",
    "test_model.py::test_full_remat_gives_the_same_logits_and_gradients",
    "test_train.py::test_rerun_of_finished_run_keeps_results_and_reports_config_changes",
    "test_train.py::test_nonfinite_skip_mode_drops_updates",
)


def pytest_collection_modifyitems(config, items):
    """Marks SLOW_VARIANTS slow; an entry naming no test of a collected file is an error."""
    ids = {item.nodeid.split("tests/", 1)[-1] for item in items}
    for item in items:
        if item.nodeid.split("tests/", 1)[-1] in SLOW_VARIANTS:
            item.add_marker(pytest.mark.slow)
    # Only when whole files were collected (no -k, no file::test selection).
    if config.option.keyword or any("::" in arg for arg in config.args):
        return
    files = {nodeid.split("::", 1)[0] for nodeid in ids}
    stale = [v for v in SLOW_VARIANTS if v.split("::", 1)[0] in files and v not in ids]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW_VARIANTS names no collected test: {stale}")
