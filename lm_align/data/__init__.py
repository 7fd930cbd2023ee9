"""lm_align.data: grain input pipelines for LM training science.

Quick start (built-in arithmetic task, no download)::

  from lm_align import data
  it = data.make_batch_iterator(
      {"source": "arithmetic"}, split="train", seq_len=64, batch_size=8, seed=0)
  batch = next(it)       # inputs/targets/segment_ids/positions int32 [8, 64],
                         # loss_mask float32 [8, 64]
  state = it.get_state() # JSON-serialisable; it.set_state(state) resumes

Modules: ``tokenizers`` (byte-level), ``arithmetic`` (task + verifier),
``text`` (one document per line), ``sources`` (the ``data_cfg.source``
registry), ``config`` (``DEFAULTS``, every data field), ``pipeline``
(tokenise, pack/pad, shuffle, shard, batch).
"""

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
from lm_align.data.tokenizers import ByteTokenizer, Tokenizer, make_tokenizer

__all__ = [
    "ArithmeticTask",
    "ByteTokenizer",
    "DEFAULTS",
    "DataError",
    "FEATURE_DTYPES",
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
]
