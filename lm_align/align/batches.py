"""Preference records as arrays, and the order in which the trainer sees them.

Records are read and tokenized once (`load_preferences`): pairs become lists
of K = 2 (chosen first, labels [p, 1 - p]), lists keep their labels, sampled
responses their rewards. A batch is an index set (`PreferenceArrays.take`).
`BatchOrder` deals global batches from seeded per-epoch permutations; each
process takes its contiguous slice of every global batch, so the global batch
at step s depends on the seed and s only, not on the number of processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lm_align import parallel

from lm_align.align.config import resolved_format
from lm_align.config import ConfigError
from lm_align.data import preference as pref_data


@dataclasses.dataclass
class PreferenceArrays:
    """All records of a file as list arrays (pairs are K = 2 lists)."""

    rows: dict[str, np.ndarray]  # five features [N, K, L]
    labels: np.ndarray  # float32 [N, K]
    mask: np.ndarray  # bool [N, K]
    soft_label: np.ndarray  # float32 [N] (1.0 for hard pairs and for lists)
    lengths: np.ndarray  # float32 [N, K] completion tokens (eos included)
    prompts: list[str]
    ref_logps: np.ndarray | None = None  # float32 [N, K] once computed

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> dict[str, Any]:
        batch = {
            "rows": {k: v[index] for k, v in self.rows.items()},
            "labels": self.labels[index],
            "mask": self.mask[index],
            "soft_label": self.soft_label[index],
            "lengths": self.lengths[index],
            "weight": np.ones(len(index), np.float32),
        }
        if self.ref_logps is not None:
            batch["ref_logps"] = self.ref_logps[index]
        return batch


def load_preferences(path: str, a, tokenizer, *, num_responses: int | None = None):
    """Reads and tokenizes a pairwise or listwise JSON Lines file per `align`."""
    fmt = resolved_format(a)
    if fmt == "pairwise":
        records = pref_data.load_pairwise(path, on_tie=a.on_tie)
        b = pref_data.to_batch(records, tokenizer, a.max_len, overlong=a.overlong)
        rows = {k: np.stack([b["chosen"][k], b["rejected"][k]], axis=1) for k in b["chosen"]}
        p = b["soft_label"]
        labels = np.stack([p, 1.0 - p], axis=1).astype(np.float32)
        mask = np.ones_like(labels, bool)
        soft = p.astype(np.float32)
    else:
        if fmt == "samples":
            records = pref_data.load_samples(path)
        else:
            records = pref_data.load_listwise(path, on_tie=a.on_tie)
        b = pref_data.to_batch(
            records, tokenizer, a.max_len, num_responses=num_responses, overlong=a.overlong
        )
        rows, labels, mask = b["responses"], b["labels"], b["response_mask"]
        soft = np.ones(len(records), np.float32)
    lengths = rows["loss_mask"].sum(-1).astype(np.float32)
    return PreferenceArrays(rows, labels, mask, soft, lengths, [r.prompt for r in records])


class BatchOrder:
    """Epochs of seeded permutations of N records, cut into global batches of B.

    Each process takes its contiguous slice of every global batch. The state
    (epoch, batch within the epoch) is saved with checkpoints, so a resumed run
    sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shard_index: int, shard_count: int):
        if n < batch_size:
            raise ConfigError(
                f"train.batch_size={batch_size} but the preference file has only {n} records; "
                f"lower train.batch_size to at most {n} or add records"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.local = batch_size // shard_count
        self.shard_index = shard_index
        self.epoch, self.position = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def __next__(self) -> np.ndarray:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        start = self.position * self.batch_size + self.shard_index * self.local
        self.position += 1
        return perm[start : start + self.local]

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def map_records(fn: Callable, data: PreferenceArrays, batch_size: int, sharding) -> list:
    """`fn(global batch)` over all records in order, the last batch padded (weight 0).

    Returns the host outputs per batch. Each process feeds its slice of every
    global batch; `fn`'s outputs must be replicated.
    """
    n, outs = len(data), []
    local = batch_size // jax.process_count()
    lo = jax.process_index() * local
    for start in range(0, n, batch_size):
        index = np.arange(start, start + batch_size)
        weight = (index < n).astype(np.float32)
        index = np.where(index < n, index, 0)
        batch = data.take(index[lo : lo + local])
        batch["weight"] = weight[lo : lo + local]
        out = jax.device_get(fn(parallel.global_batch(batch, sharding)))
        outs.append((out, int(min(batch_size, n - start))))
    return outs
