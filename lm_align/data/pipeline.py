"""The grain pipeline: records -> token documents -> [batch, seq_len] batches.

Shape legend: B = per-process batch size, L = seq_len, N = document length.

Per record (``document_features``)::

  doc       = [bos] + encode(prompt) + encode(completion) + [eos]   (or text)
  doc       = doc[:L + 1]            # over-long documents are truncated
  inputs    = doc[:-1]               # [N]
  targets   = doc[1:]                # [N]; targets[t] is the token after inputs[t]
  loss_mask = 1 on every target, or (completion_only_loss and a prompt) 0 on
              the targets that are prompt tokens: targets[:len(prompt_ids)]

Rows (``data_cfg.packing``):

  "pack": whole documents are first-fit packed (grain's
          ``FirstFitPackIterDataset`` with B bins) into rows of exactly L
          tokens; ``segment_ids`` numbers the documents of a row 1, 2, ...
          (0 = padding) and ``positions`` restart at 0 for each document.
          Attention must be restricted to equal segment ids.
  "pad":  one document per row, padded with pad_id; segment_ids 1/0.
  Padding always has loss_mask 0, segment_ids 0, positions 0.

Order and sharding: the train split is globally shuffled with ``seed``, a fresh
permutation per epoch (``shuffle(seed).repeat()``), and shard k of K reads
global positions ``k, k + K, k + 2K, ...``; so the global order does not depend
on K. The eval split is read once, in order, sharded the same way; its last
batch is padded with all-padding rows (loss_mask 0) so every batch is [B, L].

Checkpointing: ``it.get_state()`` is a JSON-serialisable dict and
``it.set_state(state)`` on a fresh iterator resumes at exactly the next batch.
"""

import functools
from typing import Any, Sequence

import grain
import numpy as np

from lm_align.data import config
from lm_align.data.config import DEFAULTS
from lm_align.data.errors import DataError
from lm_align.data.sources import make_source
from lm_align.data.tokenizers import Tokenizer, make_tokenizer

__all__ = [
    "DEFAULTS",
    "FEATURE_DTYPES",
    "document_features",
    "make_batch_iterator",
    "make_dataset",
    "make_source",
    "pad_features",
]

# Every batch is a dict of these arrays, each [B, L].
FEATURE_DTYPES = {
    "inputs": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "segment_ids": np.int32,
    "positions": np.int32,
}
_TOKEN_FEATURES = ("inputs", "targets", "loss_mask")
_MAX_SEED = 2**32  # grain's shuffle takes seeds in [0, 2**32).
_PREFETCH_PER_THREAD = 16  # grain ReadOptions buffer (documents) per thread.


def document_features(
    record: dict[str, str],
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    completion_only_loss: bool,
) -> dict[str, np.ndarray]:
  """One record -> ``inputs``, ``targets`` [N] int32 and ``loss_mask`` [N].

  See the module docstring for the math; N <= seq_len.
  """
  if "text" in record:
    prompt_ids, rest_ids = [], tokenizer.encode(record["text"])
  elif "prompt" in record and "completion" in record:
    prompt_ids = tokenizer.encode(record["prompt"])
    rest_ids = tokenizer.encode(record["completion"])
  else:
    raise DataError(
        f"record with keys {sorted(record)} has neither 'text' nor "
        "'prompt'+'completion'; fix the source."
    )
  doc = [tokenizer.bos_id] + prompt_ids + rest_ids + [tokenizer.eos_id]
  doc_N1 = np.asarray(doc[: seq_len + 1], dtype=np.int32)
  loss_mask_N = np.ones(len(doc_N1) - 1, dtype=np.float32)
  if completion_only_loss and "prompt" in record:
    loss_mask_N[: len(prompt_ids)] = 0.0
  return {
      "inputs": doc_N1[:-1],
      "targets": doc_N1[1:],
      "loss_mask": loss_mask_N,
  }


def pad_features(
    features: dict[str, np.ndarray], *, seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
  """One document's features [N] -> a padded row [L] with segment 1/0."""
  n = len(features["inputs"])
  row = {}
  for key in ("inputs", "targets"):
    row[key] = np.full(seq_len, pad_id, dtype=np.int32)
    row[key][:n] = features[key]
  row["loss_mask"] = np.zeros(seq_len, dtype=np.float32)
  row["loss_mask"][:n] = features["loss_mask"]
  row["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
  row["positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0)
  row["positions"] = row["positions"].astype(np.int32)
  return row


def _rename_packed(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # grain names packing metadata per feature; all three features share it.
  return {
      "inputs": packed["inputs"],
      "targets": packed["targets"],
      "loss_mask": packed["loss_mask"],
      "segment_ids": packed["inputs_segment_ids"],
      "positions": packed["inputs_positions"],
  }


def _stack_and_pad(
    rows: Sequence[dict[str, np.ndarray]], *, batch_size: int, pad_id: int
) -> dict[str, np.ndarray]:
  """Stacks rows into [B, L]; a short (final eval) batch gets padding rows."""
  batch = {k: np.stack([r[k] for r in rows]) for k in FEATURE_DTYPES}
  missing = batch_size - len(rows)
  if missing:
    for key, value in batch.items():
      fill = pad_id if key in ("inputs", "targets") else 0
      pad_rows = np.full((missing,) + value.shape[1:], fill, value.dtype)
      batch[key] = np.concatenate([value, pad_rows])
  return batch


def _allow_unparsed_absl_flags() -> None:
  """Lets grain's mp_prefetch run in programs that never parse absl flags.

  grain 0.2.18 reads an absl flag when starting workers and raises
  UnparsedFlagAccessError if flags were never parsed (google/grain#1355, fixed
  upstream by #1362). Marking unparsed flags as parsed keeps their defaults;
  programs that parse flags (absl.app) are unaffected.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(
    data_cfg: Any,
    *,
    split: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
  """The grain dataset behind ``make_batch_iterator`` (same arguments)."""
  config.check(data_cfg)
  if seq_len < 1 or batch_size < 1:
    raise DataError(
        f"seq_len={seq_len}, batch_size={batch_size}; both must be >= 1."
    )
  if not 0 <= shard_index < shard_count:
    raise DataError(
        f"shard_index={shard_index}, shard_count={shard_count}; need "
        "0 <= shard_index < shard_count (usually jax.process_index() and "
        "jax.process_count())."
    )
  if not 0 <= seed < _MAX_SEED:
    raise DataError(f"seed={seed}; use an integer in [0, 2**32).")
  tokenizer = make_tokenizer(config.get(data_cfg, "tokenizer"))

  ds = grain.MapDataset.source(make_source(data_cfg, split))
  if split == "train":
    ds = ds.shuffle(seed=seed).repeat()  # new permutation every epoch
  ds = ds[shard_index::shard_count]
  ds = ds.map(
      functools.partial(
          document_features,
          tokenizer=tokenizer,
          seq_len=seq_len,
          completion_only_loss=config.get(data_cfg, "completion_only_loss"),
      )
  )
  packing = config.get(data_cfg, "packing")
  if packing == "pad":
    ds = ds.map(
        functools.partial(pad_features, seq_len=seq_len, pad_id=tokenizer.pad_id)
    )
  read_threads = config.get(data_cfg, "grain_read_threads")
  iter_ds = ds.to_iter_dataset(
      grain.ReadOptions(
          num_threads=read_threads,
          prefetch_buffer_size=_PREFETCH_PER_THREAD * read_threads,
      )
  )
  workers = config.get(data_cfg, "grain_workers")
  if workers:
    _allow_unparsed_absl_flags()
    # Before packing, so batches do not depend on the number of workers.
    iter_ds = iter_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers)
    )
  if packing == "pack":
    iter_ds = grain.experimental.FirstFitPackIterDataset(
        iter_ds,
        length_struct={k: seq_len for k in _TOKEN_FEATURES},
        num_packing_bins=batch_size,
        shuffle_bins=False,
        padding_struct={
            "inputs": tokenizer.pad_id,
            "targets": tokenizer.pad_id,
            "loss_mask": 0.0,
        },
    ).map(_rename_packed)
  return iter_ds.batch(
      batch_size,
      drop_remainder=False,
      batch_fn=functools.partial(
          _stack_and_pad, batch_size=batch_size, pad_id=tokenizer.pad_id
      ),
  )


def make_batch_iterator(
    data_cfg: Any,
    *,
    split: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.DatasetIterator:
  """Iterator over batches ``{name: [batch_size, seq_len] array}``.

  Args:
    data_cfg: dict or ConfigDict with fields of ``DEFAULTS`` (missing ones
      take their defaults; ``data_cfg.seq_len`` is NOT read, pass seq_len).
    split: "train" (shuffled with ``seed``, infinite) or "eval" (in order,
      finite, last batch padded with loss_mask-0 rows).
    seq_len: L, tokens per row.
    batch_size: B, rows per batch on this process (global batch / processes).
    seed: shuffle seed in [0, 2**32); the same on every process.
    shard_index, shard_count: this process reads global positions
      ``shard_index::shard_count`` (use jax.process_index()/process_count()).

  Returns:
    A grain ``DatasetIterator`` yielding dicts with keys and dtypes
    ``FEATURE_DTYPES`` (inputs, targets, segment_ids, positions int32;
    loss_mask float32), with JSON-serialisable ``get_state()`` and
    ``set_state(state)``. With ``grain_workers > 0`` call ``close()`` when done.
  """
  return iter(
      make_dataset(
          data_cfg,
          split=split,
          seq_len=seq_len,
          batch_size=batch_size,
          seed=seed,
          shard_index=shard_index,
          shard_count=shard_count,
      )
  )
