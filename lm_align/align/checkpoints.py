"""Loading a trained policy (or reward model) from an `lm-align train|align` checkpoint.

A checkpoint path may name a workdir (``runs/sft``: its newest step), its
``checkpoints/`` directory, or one step (``runs/sft/checkpoints/600``). Only
the parameters are read (the optimizer state is skipped), placed directly
in the shardings the caller asks for:

    ckpt = resolve("runs/sft")
    cfg = saved_config(ckpt)                   # the run's resolved config
    params = load_params(ckpt, abstract)       # ShapeDtypeStructs with shardings
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp

from lm_align import config as config_lib


class CheckpointNotFoundError(FileNotFoundError):
    """The path names no lm-align checkpoint."""


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    directory: str  # .../checkpoints
    step: int

    @property
    def path(self) -> str:
        return os.path.join(self.directory, str(self.step))

    def __str__(self) -> str:
        return self.path


def _steps(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and os.path.isdir(os.path.join(directory, name, "state"))
    )


def resolve(path: str) -> CheckpointRef:
    """The checkpoint a workdir / checkpoints dir / step dir names (newest step)."""
    path = os.path.abspath(os.path.expanduser(path))
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
        return CheckpointRef(os.path.dirname(path), int(base))
    for directory in (os.path.join(path, "checkpoints"), path):
        steps = _steps(directory)
        if steps:
            return CheckpointRef(directory, steps[-1])
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


def _name(path) -> str:
    """'blocks/0/attn/qkv' (checkpoints store integer keys as strings)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def load_params(ref: CheckpointRef, abstract_params):
    """The checkpoint's ``params``, restored onto ``abstract_params``' shapes and shardings.

    ``abstract_params``: a tree of ``jax.ShapeDtypeStruct`` with ``sharding``
    set (e.g. from ``parallel.logical_to_sharding``). Raises ValueError naming
    the first mismatching parameter when the checkpoint holds another model.
    """
    checkpointer = ocp.PyTreeCheckpointer()
    state_dir = os.path.join(ref.path, "state")
    stored = checkpointer.metadata(state_dir)
    stored = getattr(stored, "item_metadata", stored)
    stored = getattr(stored, "tree", stored)
    if "params" not in stored:
        raise ValueError(f"{state_dir} holds no `params` (keys: {sorted(stored)})")
    want = {_name(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    have = {_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(stored["params"])[0]}
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
