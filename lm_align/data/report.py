"""``describe_source``: what a data config will feed the model, in a few lines.

Reports, for ``data_cfg.source``: records per split; the source's own summary
(e.g. the knowledge graph's size); bad records skipped while reading
(``on_bad_record="skip"``) with the first examples; over-long documents (more
than seq_len + 1 tokens with bos/eos) found by tokenizing the first
``scan_limit`` records of each split, and what ``data.overlong`` does with
them; and the live counters of the pipelines built in this process (documents
actually truncated or skipped so far). Example, after 20 batches (long lines
wrapped)::

  data source 'jsonl:/tmp/demo/*.jsonl' (tokenizer 'byte', seq_len 64, packing 'pack')
    records: train 39, eval 3
    42 text records from 2 file(s), fields {'text': 'text'}
    skipped 2 bad records (data.on_bad_record='skip'):
      /tmp/demo/a.jsonl:3: not valid JSON (Expecting property name enclosed in ...
      /tmp/demo/a.jsonl:4: no field 'text'; this line has fields ['body']; ...
    over-long (> 65 tokens with bos/eos): train 1 of 39, eval 0 of 3; truncated
      to seq_len (data.overlong='truncate'), e.g. train record 4
      (/tmp/demo/b.jsonl:4): 152 tokens
    pipeline counters (this process): train: 6 over-long documents truncated
      (1 distinct) of 220 read

The pipeline counters count every read, so an over-long record counts once per
epoch, and packing reads ahead of the batches returned.
"""

from typing import Any

from lm_align.data import config
from lm_align.data.pipeline import live_featurizers, tokenize_record
from lm_align.data.sources import SPLITS, make_source, record_origin
from lm_align.data.tokenizers import make_tokenizer

SCAN_LIMIT = 10_000  # records tokenized per split to count over-long ones
_EXAMPLES = 3  # examples shown per category
_ACTIONS = {
    "truncate": "truncated to seq_len (data.overlong='truncate')",
    "skip": "skipped (data.overlong='skip')",
    "error": "training stops with a DataError at the first one (data.overlong='error')",
}
_PAST_TENSE = {"truncate": "truncated", "skip": "skipped", "error": "rejected"}


def _root(source: Any) -> Any:
    """The innermost source (split wrappers keep theirs in ``.parent``)."""
    while hasattr(source, "parent"):
        source = source.parent
    return source


def _scan(source: Any, tokenizer: Any, seq_len: int, limit: int):
    """(scanned, [(index, num_tokens) of over-long records]) over the first records."""
    scanned = min(len(source), limit)
    over = []
    for i in range(scanned):
        num_tokens = len(tokenize_record(source[i], tokenizer)[0])
        if num_tokens > seq_len + 1:
            over.append((i, num_tokens))
    return scanned, over


def describe_source(
    data_cfg: Any, *, seq_len: int | None = None, scan_limit: int = SCAN_LIMIT
) -> str:
    """A multi-line summary of ``data_cfg.source``: records, skips, over-long.

    Args:
      data_cfg: the data config (dict or ConfigDict, fields of ``DEFAULTS``).
      seq_len: L; None = ``data_cfg.seq_len``.
      scan_limit: records tokenized per split for the over-long count (the
        whole split when it is smaller; the report says when it is partial).

    Raises DataError for a bad config or unreadable source, like ``make_source``.
    """
    config.check(data_cfg)
    seq_len = config.get(data_cfg, "seq_len") if seq_len is None else seq_len
    spec = config.get(data_cfg, "source")
    tokenizer = make_tokenizer(config.get(data_cfg, "tokenizer"))
    overlong = config.get(data_cfg, "overlong")
    sources = {split: make_source(data_cfg, split) for split in SPLITS}
    lines = [
        (
            f"data source {spec!r} (tokenizer {config.get(data_cfg, 'tokenizer')!r}, "
            f"seq_len {seq_len}, packing {config.get(data_cfg, 'packing')!r})"
        ),
        "  records: " + ", ".join(f"{s} {len(src):,}" for s, src in sources.items()),
    ]
    root = _root(sources["train"])
    if hasattr(root, "summary"):
        lines.append("  " + root.summary())
    if getattr(root, "skipped", 0):
        lines.append(
            f"  skipped {root.skipped} bad records (data.on_bad_record="
            f"{config.get(data_cfg, 'on_bad_record')!r}):"
        )
        lines += [f"    {m}" for m in root.skipped_examples[:_EXAMPLES]]

    counts, examples = [], []
    for split, source in sources.items():
        scanned, over = _scan(source, tokenizer, seq_len, scan_limit)
        of = (
            f"{scanned:,}"
            if scanned == len(source)
            else (f"the first {scanned:,} of {len(source):,}")
        )
        counts.append(f"{split} {len(over):,} of {of}")
        examples += [
            f"{split} record {i} ({record_origin(source, i)}): {n} tokens" for i, n in over
        ]
    line = f"  over-long (> {seq_len + 1} tokens with bos/eos): " + ", ".join(counts)
    if examples:
        line += f"; {_ACTIONS[overlong]}, e.g. " + "; ".join(examples[:_EXAMPLES])
    lines.append(line)

    latest = {}
    for featurizer in live_featurizers():
        if featurizer.source_spec == spec:
            latest[featurizer.split] = featurizer  # newest per split wins
    if latest:
        if config.get(data_cfg, "grain_workers"):
            lines.append(
                "  pipeline counters: unavailable (grain_workers > 0 runs "
                "the pipeline in worker processes)"
            )
        else:
            parts = []
            for split, featurizer in sorted(latest.items()):
                c = featurizer.counts()
                parts.append(
                    f"{split}: {c['overlong']:,} over-long documents "
                    f"{_PAST_TENSE[featurizer.overlong]} ({c['overlong_records']:,} "
                    f"distinct) of {c['documents']:,} read"
                )
            lines.append("  pipeline counters (this process): " + "; ".join(parts))
    return "\n".join(lines)
