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
            raise FileNotFoundError(
                f"no data-iterator state {path} (found {found}); the checkpoint was written by a "
                "different number of processes, so the data order cannot be resumed exactly"
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
        """None when `step` is complete, else what is wrong with it."""
        d = self.step_dir(step)
        manifest_path = os.path.join(d, MANIFEST)
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                expected = json.load(f)
            found = _file_sizes(d)
            for name, size in sorted(expected.items()):
                if name not in found:
                    return f"{name} is missing"
                if found[name] != size:
                    return f"{name} has {found[name]} bytes, {size} were written"
            return None
        # Not sealed yet (the run stopped before the next save): orbax's markers.
        items = [e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e))]
        for where in ["", *sorted(items)]:
            if not os.path.exists(os.path.join(d, where, COMMIT_MARKER)):
                return f"{os.path.join(where, COMMIT_MARKER)} is missing (the save did not finish)"
        return None

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
