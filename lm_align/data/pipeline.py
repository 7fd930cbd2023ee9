"""The grain pipeline: records -> token documents -> [batch, seq_len] batches.

Shape legend: B = per-process batch size, G = B * shard_count = global batch
size, L = seq_len, N = document length.

Per record (``document_features``)::

  doc       = [bos] + encode(prompt) + encode(completion) + [eos]   (or text)
  over-long = len(doc) > L + 1, handled by ``data_cfg.overlong``:
              "truncate" doc = doc[:L + 1] (eos lost), "skip" (dropped) or
              "error" (DataError naming the record); always counted
  inputs    = doc[:-1]               # [N]
  targets   = doc[1:]                # [N]; targets[t] is the token after inputs[t]
  loss_mask = 1 on every target, or (completion_only_loss and a prompt) 0 on
              the targets that are prompt tokens: targets[:len(prompt_ids)]

Rows (``data_cfg.packing``):

  "pack": whole documents are first-fit packed (grain's
          ``FirstFitPackIterDataset`` with G bins) into rows of exactly L
          tokens; ``segment_ids`` numbers the documents of a row 1, 2, ...
          (0 = padding) and ``positions`` restart at 0 for each document.
          Attention must be restricted to equal segment ids.
  "pad":  one document per row, padded with pad_id; segment_ids 1/0.
  Padding always has loss_mask 0, segment_ids 0, positions 0.

Order and sharding: the pipeline builds GLOBAL batches, a function of the data
config, ``seed`` and the step only. The train split is globally shuffled with
``seed``, a fresh permutation per epoch (``shuffle(seed).repeat()``), and its
documents are packed (or padded) into global batches of G = batch_size *
shard_count rows, first fit over G bins. Process k of K runs this same global
pipeline and keeps rows ``[k * batch_size, (k + 1) * batch_size)`` of every
global batch, the contiguous block that ``lm_align.parallel.global_batch``
places on its devices; so 1 process x 8 devices and 2 processes x 4 devices
train on the same global batches, row for row. The cost: every process
tokenizes and packs all G rows of a step, K times the rows it keeps. The eval
split is read once, in order, into global batches the same way; its last
global batch is padded with all-padding rows (loss_mask 0), so every batch is
[B, L] on every process and all processes see the same number of batches.

Checkpointing: ``it.get_state()`` is a JSON-serialisable dict, the same on
every process: ``{"version": 1, "grain": S}`` with S grain's state of the
global pipeline (a position in the global stream; nothing in it depends on k or
K). ``it.set_state(state)`` on a fresh iterator, with any shard_index and
shard_count of the same global batch size, resumes at exactly the next global
batch. A state without "version" (written by the per-process pipeline of
earlier versions) is accepted only with shard_count 1, where the two pipelines
coincide.
Skipping over-long documents keeps this: the decision is a pure function of the
record, so a skipped record is skipped again after a resume.

Counters: each pipeline's ``DocumentFeaturizer`` counts the over-long documents
it met in this process (``live_featurizers()``; ``describe_source`` reports
them). With ``grain_workers > 0`` the work happens in worker processes and
these in-process counters stay 0; ``describe_source``'s scan of the source
still counts over-long records.
"""

import functools
import itertools
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from lm_align.data import config
from lm_align.data.config import DEFAULTS
from lm_align.data.errors import DataError
from lm_align.data.sources import RandomAccessSource, make_source, record_origin
from lm_align.data.tokenizers import Tokenizer, doc_start, make_tokenizer

__all__ = [
    "DEFAULTS",
    "FEATURE_DTYPES",
    "DocumentFeaturizer",
    "document_features",
    "live_featurizers",
    "make_batch_iterator",
    "make_dataset",
    "make_source",
    "pad_features",
    "token_features",
    "tokenize_record",
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
# grain_workers > 0: documents per worker->main transfer, and the array size
# from which grain passes arrays through shared memory instead of pickling.
_DOCS_PER_WORKER_CHUNK = 128
_MIN_SHM_BYTES = 1 << 16


def tokenize_record(record: dict[str, str], tokenizer: Tokenizer) -> tuple[list[int], int]:
    """``doc = [bos] + prompt + completion + [eos]`` (or text) and len(prompt ids).

    The prompt length is 0 for text records.
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
    doc = doc_start(tokenizer) + prompt_ids + rest_ids + [tokenizer.eos_id]
    return doc, len(prompt_ids)


def overlong_message(where: str, num_tokens: int, seq_len: int) -> str:
    """The DataError text for an over-long document in "error" mode."""
    return (
        f"{where}: document is {num_tokens} tokens with bos/eos, more than "
        f"seq_len + 1 = {seq_len + 1}; raise data.seq_len, or set "
        "data.overlong='truncate' (cut to seq_len, counted) or 'skip' (dropped, "
        "counted)."
    )


def document_features(
    record: dict[str, str],
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    completion_only_loss: bool,
    overlong: str = "truncate",
    where: str = "record",
) -> dict[str, np.ndarray] | None:
    """One record -> ``inputs``, ``targets`` [N] int32 and ``loss_mask`` [N].

    See the module docstring for the math; N <= seq_len. A document with more
    than seq_len + 1 tokens is truncated (``overlong="truncate"``), gives None
    (``"skip"``) or raises DataError naming ``where`` (``"error"``).
    """
    doc, prompt_len = tokenize_record(record, tokenizer)
    if len(doc) > seq_len + 1:
        if overlong == "error":
            raise DataError(overlong_message(where, len(doc), seq_len))
        if overlong == "skip":
            return None
    return token_features(
        doc, prompt_len if completion_only_loss and "prompt" in record else 0, seq_len
    )


def token_features(doc: list[int], masked_prompt_len: int, seq_len: int) -> dict[str, np.ndarray]:
    """Token ids ``doc`` [N + 1] -> ``inputs = doc[:-1]``, ``targets = doc[1:]``
    (int32 [N], after cutting doc to ``doc[:seq_len + 1]``) and ``loss_mask``
    float32 [N], 0 on the first ``masked_prompt_len`` targets, else 1."""
    doc_N1 = np.asarray(doc[: seq_len + 1], dtype=np.int32)
    loss_mask_N = np.ones(len(doc_N1) - 1, dtype=np.float32)
    loss_mask_N[:masked_prompt_len] = 0.0
    return {
        "inputs": doc_N1[:-1],
        "targets": doc_N1[1:],
        "loss_mask": loss_mask_N,
    }


_LIVE_FEATURIZERS: "weakref.WeakSet[DocumentFeaturizer]" = weakref.WeakSet()
_SERIALS = itertools.count()  # creation order of featurizers
_MAX_OVERLONG_EXAMPLES = 5  # example messages kept; all are counted
_MAX_TRACKED_RECORDS = 1 << 20  # distinct over-long indices remembered
_MAX_CONSECUTIVE_SKIPS = 100_000  # all skipped in a row: raise, do not spin


class DocumentFeaturizer:
    """The pipeline's per-record map: ``document_features`` plus counters.

    Called as ``featurizer(source_index, record)`` (grain ``map_with_index`` on
    the source, before shuffling, so the index names the record). Counts, in
    this process: ``documents`` featurized, ``overlong`` documents met (each
    epoch counts again), ``overlong_records`` distinct over-long source indices
    (up to 2**20 remembered), and keeps the first few ``examples`` ("train record 17 (a.jsonl:35): 812
    tokens"). Counting never changes what the pipeline yields.

    In "skip" mode a split whose every record is over-long (or 100000 skips in
    a row) raises DataError rather than yielding nothing or spinning forever.
    """

    def __init__(
        self,
        *,
        source: RandomAccessSource,
        source_spec: str,
        split: str,
        tokenizer: Tokenizer,
        seq_len: int,
        completion_only_loss: bool,
        overlong: str,
    ):
        self.source, self.source_spec, self.split = source, source_spec, split
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.completion_only_loss, self.overlong = completion_only_loss, overlong
        self.documents = 0
        self.overlong_count = 0
        self.overlong_records: set[int] = set()
        self.examples: list[str] = []
        self._consecutive_skips = 0
        self._lock = threading.Lock()
        self._serial = next(_SERIALS)
        _LIVE_FEATURIZERS.add(self)

    def __getstate__(self) -> dict[str, Any]:
        # grain worker processes get a pickled copy (their counts stay there).
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def where(self, index: int) -> str:
        return f"{self.split} record {index} ({record_origin(self.source, index)})"

    def __call__(self, index: int, record: dict[str, str]) -> dict[str, np.ndarray] | None:
        index %= len(self.source)  # grain passes epoch * len + source index
        doc, prompt_len = tokenize_record(record, self.tokenizer)
        is_overlong = len(doc) > self.seq_len + 1
        with self._lock:
            self.documents += 1
            if is_overlong:
                self._count_overlong(index, len(doc))
            else:
                self._consecutive_skips = 0
        if is_overlong and self.overlong == "skip":
            return None
        mask_prompt = self.completion_only_loss and "prompt" in record
        return token_features(doc, prompt_len if mask_prompt else 0, self.seq_len)

    def _count_overlong(self, index: int, num_tokens: int) -> None:
        where = self.where(index)
        if self.overlong == "error":
            raise DataError(
                overlong_message(
                    f"{where} of source {self.source_spec!r}", num_tokens, self.seq_len
                )
            )
        self.overlong_count += 1
        if index not in self.overlong_records and len(self.examples) < _MAX_OVERLONG_EXAMPLES:
            self.examples.append(f"{where}: {num_tokens} tokens")
        if len(self.overlong_records) < _MAX_TRACKED_RECORDS:
            self.overlong_records.add(index)
        if self.overlong == "skip":
            self._consecutive_skips += 1
            if len(self.overlong_records) == len(self.source):
                raise DataError(
                    f"every one of the {len(self.source)} {self.split} records of "
                    f"source {self.source_spec!r} is longer than seq_len="
                    f"{self.seq_len} tokens, so data.overlong='skip' leaves nothing; "
                    "raise data.seq_len."
                )
            if self._consecutive_skips > _MAX_CONSECUTIVE_SKIPS:
                raise DataError(
                    f"the last {self._consecutive_skips} {self.split} documents of "
                    f"source {self.source_spec!r} were all longer than seq_len="
                    f"{self.seq_len} tokens and skipped (data.overlong='skip'); "
                    "raise data.seq_len."
                )

    def counts(self) -> dict[str, Any]:
        """``{"documents", "overlong", "overlong_records", "examples"}`` so far."""
        with self._lock:
            return {
                "documents": self.documents,
                "overlong": self.overlong_count,
                "overlong_records": len(self.overlong_records),
                "examples": list(self.examples),
            }

    def __repr__(self) -> str:
        return (
            f"DocumentFeaturizer({self.source_spec!r}, {self.split!r}, "
            f"seq_len={self.seq_len}, overlong={self.overlong!r})"
        )


def live_featurizers() -> list[DocumentFeaturizer]:
    """The featurizers of the pipelines alive in this process, oldest first."""
    return sorted(_LIVE_FEATURIZERS, key=lambda f: f._serial)  # pylint: disable=protected-access


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


def _process_rows(
    rows: Sequence[dict[str, np.ndarray]],
    *,
    start: int,
    batch_size: int,
    seq_len: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """This process's block of a global batch: rows[start : start + B] as [B, L].

    ``rows`` holds the G rows of one global batch (fewer in the final eval
    batch); the block is padded with all-padding rows (loss_mask 0) where the
    global batch has no rows left.
    """
    mine = rows[start : start + batch_size]
    missing = batch_size - len(mine)
    batch = {}
    for key, dtype in FEATURE_DTYPES.items():
        fill = pad_id if key in ("inputs", "targets") else 0
        pad = np.full((missing, seq_len), fill, dtype)
        batch[key] = np.concatenate([np.stack([r[key] for r in mine]), pad]) if mine else pad
    return batch


STATE_VERSION = 1


class _GlobalStateIterator(grain.DatasetIterator):
    """The pipeline's iterator with the state ``{"version": 1, "grain": S}``.

    S is grain's state of the global pipeline, the same on every process; a
    state without "version" (per-process pipeline of earlier versions) is
    accepted only when this process reads the whole global batch.
    """

    def __init__(self, parent: grain.DatasetIterator, *, shard_count: int):
        super().__init__(parent)
        self._shard_count = shard_count

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "grain": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if "version" not in state:
            if self._shard_count != 1:
                raise DataError(
                    "this data-iterator state has no 'version': it was saved by the "
                    "per-process pipeline of an earlier lm_align, whose position "
                    f"depends on the process; it cannot resume {self._shard_count} "
                    "processes on the global batch sequence. Resume it with 1 "
                    "process, or start the run again."
                )
            self._parent.set_state(state)
            return
        if state["version"] != STATE_VERSION or set(state) != {"version", "grain"}:
            raise DataError(
                f"data-iterator state with keys {sorted(state)} and version "
                f"{state['version']!r}; this lm_align reads version {STATE_VERSION} "
                "states {'version', 'grain'}."
            )
        self._parent.set_state(state["grain"])

    def __str__(self) -> str:
        return f"GlobalStateIterator(shard_count={self._shard_count})"


class _GlobalStateIterDataset(grain.IterDataset):
    """Wraps the pipeline so its iterators save ``{"version", "grain"}`` states."""

    def __init__(self, parent: grain.IterDataset, *, shard_count: int):
        super().__init__(parent)
        self._shard_count = shard_count

    def __iter__(self) -> _GlobalStateIterator:
        return _GlobalStateIterator(self._parent.__iter__(), shard_count=self._shard_count)

    def __str__(self) -> str:
        return f"GlobalStateIterDataset(shard_count={self._shard_count})"


class _Unchunk(grain.experimental.FlatMapTransform):
    """A worker's chunk (list of documents, None = skipped) -> its documents."""

    max_fan_out = _DOCS_PER_WORKER_CHUNK

    def flat_map(self, element):
        return [doc for doc in element if doc is not None]


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
        raise DataError(f"seq_len={seq_len}, batch_size={batch_size}; both must be >= 1.")
    if not 0 <= shard_index < shard_count:
        raise DataError(
            f"shard_index={shard_index}, shard_count={shard_count}; need "
            "0 <= shard_index < shard_count (usually jax.process_index() and "
            "jax.process_count())."
        )
    if not 0 <= seed < _MAX_SEED:
        raise DataError(f"seed={seed}; use an integer in [0, 2**32).")
    tokenizer = make_tokenizer(config.get(data_cfg, "tokenizer"))
    global_batch = batch_size * shard_count  # G rows; this process keeps B of them

    source = make_source(data_cfg, split)
    featurizer = DocumentFeaturizer(
        source=source,
        source_spec=config.get(data_cfg, "source"),
        split=split,
        tokenizer=tokenizer,
        seq_len=seq_len,
        completion_only_loss=config.get(data_cfg, "completion_only_loss"),
        overlong=config.get(data_cfg, "overlong"),
    )
    # Featurize before shuffling, so the featurizer sees source indices; grain
    # maps are lazy, so this costs the same. A skipped record is None, which
    # grain's iterators drop (the iterator state stays an index: resumable).
    ds = grain.MapDataset.source(source).map_with_index(featurizer)
    if split == "train":
        ds = ds.shuffle(seed=seed).repeat()  # new permutation every epoch
    # Every process reads the whole global stream: no per-process slice here.
    packing = config.get(data_cfg, "packing")
    if packing == "pad":
        ds = ds.map(functools.partial(pad_features, seq_len=seq_len, pad_id=tokenizer.pad_id))
    workers = config.get(data_cfg, "grain_workers")
    if workers:
        # Workers send chunks of consecutive documents (same order, so the same
        # batches as without workers).
        ds = ds.batch(_DOCS_PER_WORKER_CHUNK, drop_remainder=False, batch_fn=list)
    read_threads = config.get(data_cfg, "grain_read_threads")
    iter_ds = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=read_threads,
            prefetch_buffer_size=_PREFETCH_PER_THREAD * read_threads,
        )
    )
    if workers:
        _allow_unparsed_absl_flags()
        # Small arrays are pickled: a shared-memory segment per array costs more
        # than featurizing the document (measured: 5x slower than no workers).
        iter_ds = grain.experimental.WithOptionsIterDataset(
            iter_ds, grain.experimental.DatasetOptions(min_shm_size=_MIN_SHM_BYTES)
        )
        # Before packing, so batches do not depend on the number of workers.
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        iter_ds = grain.experimental.FlatMapIterDataset(iter_ds, _Unchunk())
    if packing == "pack":
        iter_ds = grain.experimental.FirstFitPackIterDataset(
            iter_ds,
            length_struct={k: seq_len for k in _TOKEN_FEATURES},
            num_packing_bins=global_batch,
            shuffle_bins=False,
            padding_struct={
                "inputs": tokenizer.pad_id,
                "targets": tokenizer.pad_id,
                "loss_mask": 0.0,
            },
        ).map(_rename_packed)
    iter_ds = iter_ds.batch(
        global_batch,
        drop_remainder=False,
        batch_fn=functools.partial(
            _process_rows,
            start=shard_index * batch_size,
            batch_size=batch_size,
            seq_len=seq_len,
            pad_id=tokenizer.pad_id,
        ),
    )
    return _GlobalStateIterDataset(iter_ds, shard_count=shard_count)


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
      batch_size: B, rows per batch on this process; the global batch has
        G = batch_size * shard_count rows (train.batch_size / processes).
      seed: shuffle seed in [0, 2**32); the same on every process.
      shard_index, shard_count: this process builds the global batches and
        keeps their rows ``[shard_index * B, (shard_index + 1) * B)`` (use
        jax.process_index()/process_count()); the global batches do not
        depend on shard_count.

    Returns:
      A grain ``DatasetIterator`` yielding dicts with keys and dtypes
      ``FEATURE_DTYPES`` (inputs, targets, segment_ids, positions int32;
      loss_mask float32), with JSON-serialisable ``get_state()`` and
      ``set_state(state)``; the state is the same on every process and
      restores into an iterator with any shard_count of the same G. With
      ``grain_workers > 0`` call ``close()`` when done.
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
