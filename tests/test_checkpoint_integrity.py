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
