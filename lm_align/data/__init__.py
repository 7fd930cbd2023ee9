"""lm_align.data: grain input pipelines for LM training science.

Quick start (built-in arithmetic task, no download)::

  from lm_align import data
  it = data.make_batch_iterator(
      {"source": "arithmetic"}, split="train", seq_len=64, batch_size=8, seed=0)
  batch = next(it)       # inputs/targets/segment_ids/positions int32 [8, 64],
                         # loss_mask float32 [8, 64]
  state = it.get_state() # JSON-serialisable; it.set_state(state) resumes

Modules: ``tokenizers`` (byte-level, SentencePiece), ``arithmetic`` (task +
verifier), ``text`` (one document per line), ``tfds_source`` (prepared tfds
datasets, ``tfds:NAME``), ``seqio_source`` (seqio tasks, ``seqio:NAME``),
``stdlib_source`` (this Python's standard library as a corpus,
``stdlib``), ``sources`` (the ``data_cfg.source`` registry), ``config`` (``DEFAULTS``,
every data field), ``pipeline`` (tokenise, pack/pad, shuffle, shard, batch).
``kg_facts`` (synthetic knowledge graph + hallucination verifier,
``kg_facts``), ``jsonl`` (JSON Lines corpora, ``jsonl:PATH``), ``preference``
(pairwise/listwise preference records, ``to_batch``), ``report``
(``describe_source``: record counts, skipped and over-long records).
"""

# Importing seqio_source and tfds_source registers the "seqio" and "tfds"
# sources; seqio and tensorflow_datasets are imported only when one is built.
from lm_align.data import seqio_source, tfds_source  # noqa: F401
from lm_align.data.arithmetic import ArithmeticTask
from lm_align.data.config import DEFAULTS
from lm_align.data.errors import DataError
from lm_align.data.pipeline import (
    FEATURE_DTYPES,
    document_features,
    make_batch_iterator,
    make_dataset,
    pad_features,
)
from lm_align.data.sources import (
    make_source,
    register_source,
    source_names,
)
from lm_align.data.text import TextFileSource
from lm_align.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    make_tokenizer,
    train_sentencepiece,
)

# Local sources ("jsonl", "kg_facts", "stdlib"; registered on import), preference
# records for alignment, and the source report.
from lm_align.data.jsonl import JsonlSource  # pylint: disable=g-bad-import-order
from lm_align.data.kg_facts import KnowledgeGraph
from lm_align.data.stdlib_source import StdlibSource
from lm_align.data.preference import (
    ListwiseRecord,
    PairwiseRecord,
    load_listwise,
    load_pairwise,
    to_batch,
)
from lm_align.data.report import describe_source

__all__ = [
    "JsonlSource",
    "KnowledgeGraph",
    "ListwiseRecord",
    "PairwiseRecord",
    "StdlibSource",
    "describe_source",
    "load_listwise",
    "load_pairwise",
    "to_batch",
    "ArithmeticTask",
    "ByteTokenizer",
    "DEFAULTS",
    "DataError",
    "FEATURE_DTYPES",
    "SentencePieceTokenizer",
    "TextFileSource",
    "Tokenizer",
    "document_features",
    "make_batch_iterator",
    "make_dataset",
    "make_source",
    "make_tokenizer",
    "pad_features",
    "register_source",
    "source_names",
    "train_sentencepiece",
]
