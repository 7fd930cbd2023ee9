"""Checkpoints: orbax CheckpointManager (async, keep-N) over three items.

Each step directory `WORKDIR/checkpoints/<step>/` holds
  state/   the TrainState (params, optimizer state, step, RNG), restorable onto
           any mesh (pass abstract arrays with the target shardings)
  data/    the data-iterator state, one JSON file per process
  config/  the resolved experiment config (JSON)
Orbax writes each step to a temporary directory and renames it when complete,
so an interrupted save never becomes the latest checkpoint on a local disk.
On storage where that is not atomic, or when files are damaged later, a step
can still be incomplete: every finished step is therefore sealed with
`lm_align_manifest.json` (each file's size), and `verify(step)` checks a step
against it (or, before sealing, checks orbax's commit markers). The training
loop resumes from the newest step that verifies and moves broken ones to
`WORKDIR/checkpoints_corrupt/`, saying so.

Loading a trained model (``train.init_from``, ``align.policy_checkpoint``,
``lm-align eval --policy``) reads only the parameters of a step, placed
directly in the shardings the caller asks for. A path may name a workdir
(``runs/sft``: its newest step that verifies; damaged newer steps are skipped
with a message, exactly as resume does), its ``checkpoints/`` directory, or
one step (``runs/sft/checkpoints/600``, which must verify):

    ref = resolve("runs/sft")
    cfg = saved_config(ref)                    # the run's resolved config
    params = load_params(ref, abstract)        # ShapeDtypeStructs with shardings
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from lm_align import config as config_lib
from lm_align.utils import log


class DataStateHandler(ocp.CheckpointHandler):
    """Saves a JSON-serialisable iterator state per process (`process_i-of-n.json`)."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir())
            states = {p.read_text() for p in directory.glob("process_*-of-*.json")}
            if len(states) == 1:  # every process saved the same, global, state
                return json.loads(states.pop())
            raise FileNotFoundError(
                f"no data-iterator state {path} (found {found}); the checkpoint was written by a "
                "different number of processes whose data states differ, so the data order "
                "cannot be resumed exactly"
            )
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path):
        return None

    def structure(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    """Save/restore TrainState + data-iterator state + config under `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": DataStateHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _seal_finished(self) -> None:
        """Writes the manifest of every finished, unsealed step (process 0)."""
        if jax.process_index() != 0:
            return
        for step in self.all_steps():
            d = self.step_dir(step)
            if os.path.exists(os.path.join(d, MANIFEST)) or not os.path.exists(
                os.path.join(d, COMMIT_MARKER)
            ):
                continue
            tmp = os.path.join(d, MANIFEST + ".tmp")
            with open(tmp, "w") as f:
                json.dump(_file_sizes(d), f, indent=0, sort_keys=True)
            os.replace(tmp, os.path.join(d, MANIFEST))

    def verify(self, step: int) -> str | None:
        """None when `step` is complete, else what is wrong with it (see `verify_step`)."""
        return verify_step(self.step_dir(step))

    def interrupted_saves(self) -> list[str]:
        """Temporary directories of saves that never finished (orbax ignores them)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(
            os.path.join(self.directory, e) for e in os.listdir(self.directory) if TMP_MARK in e
        )

    def quarantine(self, step: int) -> str:
        """Moves `step` out of the checkpoint directory (process 0); returns where to."""
        dest = os.path.join(
            os.path.dirname(self.directory),
            "checkpoints_corrupt",
            f"{step}-{time.strftime('%Y%m%d-%H%M%S')}",
        )
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(self.step_dir(step), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"lm_align quarantine {step}")
        self.manager.reload()
        return dest

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self, step: int, state, data_state: Any, config_dict: dict, *, force: bool = True
    ) -> None:
        """Starts an (async) save of `step`; `data_state` is captured now."""
        self._seal_finished()
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=DataStateSave(data_state),
                config=ocp.args.JsonSave(config_dict),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state) -> tuple[Any, Any, dict]:
        """(state, data_state, config_dict) of `step`; arrays get `abstract_state`'s shardings."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=DataStateRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return out.state, out.data, out.config

    def wait(self) -> None:
        """Blocks until pending async saves are on disk (and sealed)."""
        self.manager.wait_until_finished()
        self._seal_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()


MANIFEST = "lm_align_manifest.json"
COMMIT_MARKER = "commit_success.txt"
TMP_MARK = ".orbax-checkpoint-tmp"


def _file_sizes(directory: str) -> dict[str, int]:
    """{relative path: size} of the files under `directory`, the manifest excluded."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if not rel.startswith(MANIFEST):
                out[rel] = os.path.getsize(path)
    return out


def verify_step(step_dir: str) -> str | None:
    """None when the step directory is complete, else what is wrong with it.

    A sealed step is checked against its manifest (every file present with the
    size that was written); an unsealed one (the run stopped before the next
    save sealed it) against orbax's commit markers.
    """
    manifest_path = os.path.join(step_dir, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            expected = json.load(f)
        found = _file_sizes(step_dir)
        for name, size in sorted(expected.items()):
            if name not in found:
                return f"{name} is missing"
            if found[name] != size:
                return f"{name} has {found[name]} bytes, {size} were written"
        return None
    items = [e for e in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, e))]
    for where in ["", *sorted(items)]:
        if not os.path.exists(os.path.join(step_dir, where, COMMIT_MARKER)):
            return f"{os.path.join(where, COMMIT_MARKER)} is missing (the save did not finish)"
    return None


# ---------------------------------------------------------------------------
# Loading a trained model's parameters (no optimizer state, no data state).


class CheckpointNotFoundError(FileNotFoundError):
    """The path names no usable lm-align checkpoint."""


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    directory: str  # .../checkpoints
    step: int

    @property
    def path(self) -> str:
        return os.path.join(self.directory, str(self.step))

    def __str__(self) -> str:
        return self.path


def _step_dirs(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and os.path.isdir(os.path.join(directory, name, "state"))
    )


def resolve(path: str) -> CheckpointRef:
    """The checkpoint step that `path` names, verified.

    `path` is a workdir, its ``checkpoints/`` directory, or one step directory.
    For a workdir the newest step that verifies is taken; each newer, damaged
    step is reported (what is wrong, and which step is loaded instead). A step
    directory named explicitly must verify. Raises CheckpointNotFoundError
    when nothing usable is there.
    """
    path = os.path.abspath(os.path.expanduser(path))
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
        problem = verify_step(path)
        if problem:
            raise CheckpointNotFoundError(
                f"checkpoint {path} is incomplete or corrupt ({problem}); name its run directory "
                f"({os.path.dirname(os.path.dirname(path))}) to load the newest intact step"
            )
        return CheckpointRef(os.path.dirname(path), int(base))
    for directory in (os.path.join(path, "checkpoints"), path):
        steps = _step_dirs(directory)
        for i, step in enumerate(reversed(steps)):
            problem = verify_step(os.path.join(directory, str(step)))
            if problem is None:
                return CheckpointRef(directory, step)
            older = steps[: len(steps) - i - 1]
            instead = f"loading step {older[-1]} instead" if older else "no older step is left"
            log(f"checkpoint {directory}/{step} is incomplete or corrupt ({problem}); {instead}")
        if steps:
            raise CheckpointNotFoundError(
                f"every checkpoint under {directory} is incomplete or corrupt (steps {steps}); "
                "retrain, or restore the run directory from a copy"
            )
    raise CheckpointNotFoundError(
        f"no checkpoint at {path}: expected a workdir of `lm-align train` or `lm-align align` "
        "(with checkpoints/<step>/state), its checkpoints/ directory or one step directory; "
        "train a policy first, e.g. `lm-align train --workdir runs/sft`"
    )


def saved_config(ref: CheckpointRef):
    """The experiment config stored with the checkpoint (a ConfigDict).

    Fields the run did not record (written by an older lm-align) take their
    current defaults.
    """
    from lm_align.train.config import base_config

    path = os.path.join(ref.path, "config", "metadata")
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{ref} has no saved config ({path} is missing)")
    with open(path) as f:
        saved = json.load(f)
    merged = base_config().to_dict()
    for group, values in saved.items():
        if isinstance(values, dict) and isinstance(merged.get(group), dict):
            merged[group].update(values)
        else:
            merged[group] = values
    return config_lib.from_dict(merged)


def _param_name(path) -> str:
    """'blocks/0/attn/qkv' (checkpoints store integer keys as strings)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _stored_tree(state_dir: str) -> dict:
    """The metadata tree (names, shapes, dtypes; no values) of a saved state."""
    stored = ocp.PyTreeCheckpointer().metadata(state_dir)
    stored = getattr(stored, "item_metadata", stored)
    return getattr(stored, "tree", stored)


def holds_params_only(step_dir: str) -> bool:
    """True when the step saved parameters alone, no optimizer state (`lm-align hf
    import` writes such a step 0): loadable as a model, not resumable as a run."""
    return set(_stored_tree(os.path.join(step_dir, "state"))) == {"params"}


def load_params(ref: CheckpointRef, abstract_params):
    """The checkpoint's ``params``, restored onto ``abstract_params``' shapes and shardings.

    ``abstract_params``: a tree of ``jax.ShapeDtypeStruct`` with ``sharding``
    set (e.g. from ``parallel.logical_to_sharding``). Raises ValueError naming
    the first mismatching parameter when the checkpoint holds another model.
    """
    checkpointer = ocp.PyTreeCheckpointer()
    state_dir = os.path.join(ref.path, "state")
    stored = _stored_tree(state_dir)
    if "params" not in stored:
        raise ValueError(f"{state_dir} holds no `params` (keys: {sorted(stored)})")
    flat = jax.tree_util.tree_flatten_with_path
    want = {_param_name(p): a for p, a in flat(abstract_params)[0]}
    have = {_param_name(p): m for p, m in flat(stored["params"])[0]}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise ValueError(
            f"{ref} holds a different model: parameters missing {missing[:5]}, unexpected "
            f"{extra[:5]}; point the checkpoint option at a run of the same model"
        )
    for key, a in want.items():
        shape = tuple(getattr(have[key], "shape", ()))
        if shape != tuple(a.shape):
            raise ValueError(
                f"{ref}: parameter {key} has shape {shape} in the checkpoint but the model "
                f"expects {tuple(a.shape)}; the model config differs from the checkpoint's"
            )
    restored = checkpointer.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args={"params": ocp.checkpoint_utils.construct_restore_args(abstract_params)},
            partial_restore=True,
        ),
    )
    return restored["params"]
