"""Checkpoints: orbax CheckpointManager (async, keep-N) over three items.

Each step directory `WORKDIR/checkpoints/<step>/` holds
  state/   the TrainState (params, optimizer state, step, RNG), restorable onto
           any mesh (pass abstract arrays with the target shardings)
  data/    the data-iterator state, one JSON file per process
  config/  the resolved experiment config (JSON)
Orbax writes each step to a temporary directory and renames it when complete,
so an interrupted save never becomes the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
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

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self, step: int, state, data_state: Any, config_dict: dict, *, force: bool = True
    ) -> None:
        """Starts an (async) save of `step`; `data_state` is captured now."""
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
        """Blocks until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
