"""A damaged or half-written newest checkpoint is detected; the run resumes from the one before."""

import json
import os

import pytest

from tests.helpers import TINY, losses, run_cli

# A constant LR, so that the first 8 steps do not depend on train.steps.
RUN = TINY + ["train.checkpoint_every=4", "train.keep_checkpoints=3", "optimizer.schedule=constant"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    run_cli(workdir, RUN + ["train.steps=12"])
    return losses(workdir)


def _damage_truncate(step_dir):
    """A file of the saved state loses its tail (a write that never completed)."""
    manifest = json.loads((step_dir / "lm_align_manifest.json").read_text())
    name = max((n for n in manifest if n.startswith("state/")), key=lambda n: manifest[n])
    path = step_dir / name
    path.write_bytes(path.read_bytes()[: manifest[name] // 2])
    return f"{name} has {manifest[name] // 2} bytes, {manifest[name]} were written"


def _damage_unfinished(step_dir):
    """What a save killed midway leaves on storage without atomic renames: no commit markers."""
    (step_dir / "lm_align_manifest.json").unlink()
    (step_dir / "state" / "commit_success.txt").unlink()
    return "state/commit_success.txt is missing (the save did not finish)"


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_unfinished])
def test_corrupt_latest_checkpoint_is_moved_aside_and_the_previous_one_used(
    straight, tmp_path, damage
):
    workdir = tmp_path / "run"
    run_cli(workdir, RUN + ["train.steps=8"])
    ckpts = workdir / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["4", "8"]
    problem = damage(ckpts / "8")

    out = run_cli(workdir, RUN + ["train.steps=12"]).stdout
    assert f"checkpoint {ckpts}/8 is incomplete or corrupt ({problem})" in out, out
    assert "resuming from step 4" in out
    assert f"resumed from {ckpts}/4 (step 4 of 12)" in out
    # The broken step is kept for inspection, outside the checkpoint directory.
    (moved,) = os.listdir(workdir / "checkpoints_corrupt")
    assert moved.startswith("8-")
    # Steps 5..12 were retrained from step 4: the same losses as a run never interrupted.
    assert losses(workdir) == straight
    assert sorted(os.listdir(ckpts)) == ["12", "4", "8"]


@pytest.mark.slow
def test_interrupted_save_directory_is_reported_and_ignored(straight, tmp_path):
    workdir = tmp_path / "run"
    run_cli(workdir, RUN + ["train.steps=8"])
    tmp = workdir / "checkpoints" / "12.orbax-checkpoint-tmp-1234"
    tmp.mkdir()
    (tmp / "partial").write_text("x")
    out = run_cli(workdir, RUN + ["train.steps=12"]).stdout
    assert f"ignoring {tmp}: a save that was interrupted before it finished" in out
    assert "resumed from" in out and "/8 (step 8 of 12)" in out
    assert losses(workdir) == straight


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory):
    """A run with steps 4 and 8 whose newest step (8) was truncated, and step 4's params."""
    import numpy as np

    from lm_align.align.setup import load_model

    workdir = tmp_path_factory.mktemp("damaged")
    run_cli(workdir, RUN + ["train.steps=8"])
    _, good_params, _ = load_model(str(workdir / "checkpoints" / "4"))
    _, newest_params, _ = load_model(str(workdir / "checkpoints" / "8"))
    assert not np.array_equal(good_params["embed"], newest_params["embed"])
    problem = _damage_truncate(workdir / "checkpoints" / "8")
    expected = (
        f"checkpoint {workdir / 'checkpoints'}/8 is incomplete or corrupt ({problem}); "
        "loading step 4 instead"
    )
    return workdir, good_params, expected


def test_loading_a_damaged_newest_step_falls_back_and_says_so(damaged_run, capsys):
    """`lm-align eval --policy`, `align.policy_checkpoint` and `train.init_from` all load
    through `resolve`: the truncated step 8 is skipped with a message, step 4 is loaded."""
    import jax
    import numpy as np

    from lm_align.align.config import align_base_config
    from lm_align.align.setup import load_model, setup
    from lm_align.config import apply_overrides, load_config
    from lm_align.train.checkpoint import CheckpointNotFoundError, resolve
    from lm_align.train.loop import init_state_fn
    from lm_align.train.setup import build_experiment
    from tests.helpers import DEFAULT_EXPERIMENT

    workdir, good, expected = damaged_run
    assert resolve(str(workdir)).step == 4
    assert expected in capsys.readouterr().out

    # lm-align eval --policy WORKDIR (and every other command that loads a model)
    _, params, _ = load_model(str(workdir))
    assert expected in capsys.readouterr().out
    np.testing.assert_array_equal(params["embed"], good["embed"])

    # align.policy_checkpoint=WORKDIR
    cfg = align_base_config()
    cfg.align.train_file, cfg.align.policy_checkpoint = "x", str(workdir)
    params = setup(cfg).init_params()
    assert expected in capsys.readouterr().out
    np.testing.assert_array_equal(params["embed"], good["embed"])

    # train.init_from=WORKDIR
    cfg = apply_overrides(load_config(DEFAULT_EXPERIMENT), RUN + [f"train.init_from={workdir}"])
    exp = build_experiment(cfg, jax.devices()[:1])
    state = init_state_fn(exp, cfg.train.init_from)()
    out = capsys.readouterr().out
    assert expected in out and f"parameters from {workdir / 'checkpoints'}/4" in out
    np.testing.assert_array_equal(state.params["embed"], good["embed"])

    # A damaged step named explicitly is an error, not a silent fallback.
    with pytest.raises(CheckpointNotFoundError, match="incomplete or corrupt"):
        resolve(str(workdir / "checkpoints" / "8"))
