"""The running interpreter's standard library as a real-text corpus (no download).

``data.source = "stdlib"`` reads every ``*.py`` file under
``sysconfig.get_paths()["stdlib"]`` (site-packages and dist-packages excluded;
the ``test``/``tests``/``idle_test`` directories only with
``stdlib_include_tests``): Python code, docstrings, comments and a few large
prose modules (``pydoc_data/topics.py``). It is the same corpus on every
machine with the same Python build, and needs nothing but the interpreter.
``"stdlib:PATTERN"`` keeps the files whose path relative to the stdlib
directory matches the ``fnmatch`` pattern (``*`` crosses ``/``), e.g.
``"stdlib:email/*"`` or ``"stdlib:json/*.py"``.

Split, by file: a file is in eval iff ``u(path) < stdlib_eval_fraction``, with
``u(path)`` the first 64 bits of ``sha256(path)`` over 2**64 (``path`` the
POSIX path relative to the stdlib directory). The assignment of a file never
depends on which other files are present, the pattern, the process or
``PYTHONHASHSEED``, so train and eval are disjoint at every pattern and no
eval file's text is ever trained on.

Records: each file is cut into chunks of consecutive whole lines of at most
``stdlib_chunk_bytes`` UTF-8 bytes (a longer line is cut at character
boundaries); the chunks of a file, concatenated, are exactly its text. The
default chunk size is ``data.seq_len - 1`` bytes, so that with the byte
tokenizer ``[bos] + chunk + [eos]`` fits one row and nothing is truncated;
``0`` makes every file one record. Records are ``{"text": chunk}``, in sorted
path order; ``origin(i)`` is ``"stdlib:PATH:LINE"``.

Files that are not valid UTF-8 (4 deliberately mis-encoded test files of
CPython 3.11) are skipped and counted in ``summary()``.

Size report (files, bytes, records and tokens per split): :func:`corpus_stats`,
or from the shell (arguments: ``--tokenizer sentencepiece:m.model``,
``--include-tests``, ``--eval-fraction 0.05``, ``--pattern 'email/*'``,
``--seq-len 64``, ``--chunk-bytes N``)::

  python -c 'import lm_align.data.stdlib_source as s; s.main()' --include-tests
 The numbers for CPython 3.11 are in
docs/data.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import hashlib
import os
import platform
import sysconfig
from collections.abc import Sequence
from typing import Any

import numpy as np

from lm_align.data import config
from lm_align.data.errors import DataError
from lm_align.data.sources import SPLITS, RandomAccessSource, register_source

# Top-level directories of the stdlib directory that hold third-party packages.
THIRD_PARTY_DIRS = frozenset({"site-packages", "dist-packages"})
# Directory names whose files are test suites (CPython's test/, lib2to3/tests/,
# idlelib/idle_test/, ...); excluded unless include_tests.
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_HASH_DENOMINATOR = 2**64


def stdlib_dir() -> str:
    """The running interpreter's standard-library directory."""
    return sysconfig.get_paths()["stdlib"]


def eval_score(path: str) -> float:
    """u(path) in [0, 1): first 64 bits of sha256(path) / 2**64 (path relative, POSIX)."""
    digest = hashlib.sha256(path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / _HASH_DENOMINATOR


def split_of(path: str, eval_fraction: float) -> str:
    """``"eval"`` iff ``eval_score(path) < eval_fraction``, else ``"train"``."""
    return "eval" if eval_score(path) < eval_fraction else "train"


def is_test_path(path: str) -> bool:
    """Whether a directory of the relative ``path`` is a test directory (``TEST_DIRS``)."""
    return any(part in TEST_DIRS for part in path.split("/")[:-1])


def list_files(root: str, pattern: str = "*.py", include_tests: bool = False) -> list[str]:
    """Sorted POSIX paths, relative to ``root``, of the ``*.py`` files matching ``pattern``."""
    paths = []
    for directory, subdirs, files in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        if parts and parts[0] in THIRD_PARTY_DIRS:
            subdirs[:] = []
            continue
        for name in files:
            path = "/".join([*parts, name])
            if (
                name.endswith(".py")
                and fnmatch.fnmatchcase(path, pattern)
                and (include_tests or not is_test_path(path))
            ):
                paths.append(path)
    return sorted(paths)


@functools.lru_cache(maxsize=4)
@functools.lru_cache(maxsize=4)
def _read_files(
    root: str, pattern: str, include_tests: bool
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """((path, text) of every readable file, paths skipped as not UTF-8).

    Cached per process, like `_split_index`: a sweep validates every run's config
    (each builds the source) and a run builds both splits, from the same files."""
    texts, skipped = [], []
    for path in list_files(root, pattern, include_tests):
        with open(os.path.join(root, path), "rb") as f:
            raw = f.read()
        try:
            texts.append((path, raw.decode("utf-8")))
        except UnicodeDecodeError:
            skipped.append(path)
    return tuple(texts), tuple(skipped)


@functools.lru_cache(maxsize=8)
def _split_index(
    root: str, pattern: str, include_tests: bool, eval_fraction: float, split: str,
    chunk_bytes: int,
) -> tuple[tuple[tuple[str, str], ...], np.ndarray]:
    """(the split's (path, text) files, its read-only [records, 4] table of (file index,
    start, end, first line)): the chunking of every file, done once per process."""
    files, _ = _read_files(root, pattern, include_tests)
    files = tuple((p, t) for p, t in files if split_of(p, eval_fraction) == split)
    spans = [
        (file_index, *span)
        for file_index, (_, text) in enumerate(files)
        for span in chunk_spans(text, chunk_bytes)
    ]
    table = np.asarray(spans, dtype=np.int64).reshape(-1, 4)
    table.flags.writeable = False
    return files, table  # fmt: skip


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _cut_long_line(line: str, max_bytes: int) -> list[str]:
    """``line`` cut into pieces of at most max_bytes UTF-8 bytes, at character boundaries."""
    pieces, start, size = [], 0, 0
    for i, ch in enumerate(line):
        n = _utf8_len(ch)
        if size + n > max_bytes:
            pieces.append(line[start:i])
            start, size = i, 0
        size += n
    pieces.append(line[start:])
    return pieces


def chunk_spans(text: str, max_bytes: int) -> list[tuple[int, int, int]]:
    """(start, end, first line) of the chunks of ``text``: whole lines, <= max_bytes each.

    Character offsets; line numbers start at 1. ``max_bytes == 0``: one chunk.
    The chunks tile the text: ``"".join(text[s:e] for s, e, _ in spans) == text``.
    """
    if not text:
        return []
    if max_bytes == 0:
        return [(0, len(text), 1)]
    pieces = text.split("\n")
    lines = [p + "\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    spans, start, size, first_line, pos = [], 0, 0, 1, 0
    for line_number, line in enumerate(lines, start=1):
        n = _utf8_len(line)
        if n > max_bytes:  # a line longer than a chunk: close the chunk, cut the line
            if pos > start:
                spans.append((start, pos, first_line))
            for piece in _cut_long_line(line, max_bytes):
                spans.append((pos, pos + len(piece), line_number))
                pos += len(piece)
            start, size, first_line = pos, 0, line_number + 1
            continue
        if size + n > max_bytes:
            spans.append((start, pos, first_line))
            start, size, first_line = pos, 0, line_number
        size += n
        pos += len(line)
    if pos > start:
        spans.append((start, pos, first_line))
    return spans


class StdlibSource:
    """The records of one split of the standard-library corpus (random access).

    Args:
      split: "train" or "eval".
      pattern: fnmatch pattern on paths relative to the stdlib directory.
      include_tests: also read files under test directories (``TEST_DIRS``).
      eval_fraction: expected fraction of files in eval, in (0, 1).
      chunk_bytes: UTF-8 bytes per record at most; 0 = one record per file.
      root: the stdlib directory; None = this interpreter's (``stdlib_dir()``).
    """

    def __init__(
        self,
        split: str,
        *,
        pattern: str = "*.py",
        include_tests: bool = False,
        eval_fraction: float = 0.05,
        chunk_bytes: int = 63,
        root: str | None = None,
    ):
        if split not in SPLITS:
            raise DataError(f"split={split!r}; valid splits: {SPLITS}.")
        self.split, self.pattern, self.include_tests = split, pattern, include_tests
        self.eval_fraction, self.chunk_bytes = eval_fraction, chunk_bytes
        self.root = stdlib_dir() if root is None else root
        self.all_files, self.skipped_files = _read_files(self.root, pattern, include_tests)
        if not self.all_files:
            raise DataError(
                f"no readable *.py file of the standard library at {self.root} matches "
                f"{pattern!r} (include_tests={include_tests}); use a pattern such as "
                "'email/*' or '*' (fnmatch, relative to that directory)."
            )
        self.files, table = _split_index(
            self.root, pattern, include_tests, eval_fraction, split, chunk_bytes
        )
        self._file, self._start, self._end, self._line = table.T

    def __len__(self) -> int:
        return len(self._file)

    def __getitem__(self, index: int) -> dict[str, str]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range [0, {len(self)}).")
        text = self.files[int(self._file[index])][1]
        return {"text": text[int(self._start[index]) : int(self._end[index])]}

    def origin(self, index: int) -> str:
        """``"stdlib:PATH:LINE"``: the file and first line of record ``index``."""
        return f"stdlib:{self.files[int(self._file[index])][0]}:{int(self._line[index])}"

    def paths(self) -> list[str]:
        """The relative paths of this split's files, sorted."""
        return [p for p, _ in self.files]

    def fingerprint(self) -> str:
        """sha256 (first 12 hex digits) of every file of the corpus (both splits): paths
        and texts. Equal fingerprints mean the same corpus."""
        h = hashlib.sha256()
        for path, text in self.all_files:
            h.update(path.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
        return h.hexdigest()[:12]

    def summary(self) -> str:
        """One line: the corpus, both splits' files and bytes, chunking, skipped files."""
        parts = []
        for split in SPLITS:
            files = [t for p, t in self.all_files if split_of(p, self.eval_fraction) == split]
            parts.append(f"{split} {len(files):,} files / {sum(map(_utf8_len, files)):,} bytes")
        chunks = "whole files" if self.chunk_bytes == 0 else f"<= {self.chunk_bytes} bytes"
        skipped = (
            f"; {len(self.skipped_files)} non-UTF-8 files skipped" if self.skipped_files else ""
        )
        return (
            f"Python {platform.python_version()} standard library {self.root} "
            f"({self.pattern!r}, tests {'in' if self.include_tests else 'ex'}cluded, "
            f"fingerprint {self.fingerprint()}): {', '.join(parts)}; split by file "
            f"(eval fraction {self.eval_fraction:g}); records: chunks of whole lines "
            f"{chunks}{skipped}"
        )

    def __reduce__(self):
        # Pickled for grain worker processes: rebuilt there from the arguments.
        return (
            _rebuild,
            (
                self.split,
                self.pattern,
                self.include_tests,
                self.eval_fraction,
                self.chunk_bytes,
                self.root,
            ),
        )

    def __repr__(self) -> str:
        return (
            f"StdlibSource({self.split!r}, pattern={self.pattern!r}, files={len(self.files)}, "
            f"records={len(self)}, chunk_bytes={self.chunk_bytes})"
        )


def _rebuild(split, pattern, include_tests, eval_fraction, chunk_bytes, root) -> StdlibSource:
    return StdlibSource(
        split,
        pattern=pattern,
        include_tests=include_tests,
        eval_fraction=eval_fraction,
        chunk_bytes=chunk_bytes,
        root=root,
    )


def chunk_bytes_of(data_cfg: Any) -> int:
    """``stdlib_chunk_bytes``, or ``data.seq_len - 1`` (at least 1) when it is None."""
    value = config.get(data_cfg, "stdlib_chunk_bytes")
    return max(config.get(data_cfg, "seq_len") - 1, 1) if value is None else value


def source_from_config(data_cfg: Any, split: str, pattern: str = "") -> StdlibSource:
    """The ``split`` of ``"stdlib[:PATTERN]"`` with the ``stdlib_*`` fields of ``data_cfg``."""
    return StdlibSource(
        split,
        pattern=pattern or "*.py",
        include_tests=config.get(data_cfg, "stdlib_include_tests"),
        eval_fraction=config.get(data_cfg, "stdlib_eval_fraction"),
        chunk_bytes=chunk_bytes_of(data_cfg),
    )


@register_source("stdlib")
def _stdlib(data_cfg: Any, split: str, arg: str) -> RandomAccessSource:
    return source_from_config(data_cfg, split, arg)


def corpus_stats(data_cfg: Any, tokenizer: Any = None) -> dict[str, dict[str, int]]:
    """Size of each split of the stdlib source of ``data_cfg``.

    Returns ``{split: {"files", "bytes", "records", "tokens", "doc_tokens"}}``:
    ``bytes`` of UTF-8 text; ``tokens`` = the records' text tokens with
    ``tokenizer`` (None = the byte tokenizer: tokens = bytes); ``doc_tokens`` adds
    the bos/eos of every record (what the pipeline feeds, before packing).
    """
    spec = config.get(data_cfg, "source")
    name, _, pattern = spec.partition(":")
    if name != "stdlib":
        raise DataError(f"corpus_stats needs data.source 'stdlib[:PATTERN]', got {spec!r}.")
    stats = {}
    for split in SPLITS:
        src = source_from_config(data_cfg, split, pattern)
        num_bytes = sum(_utf8_len(t) for _, t in src.files)
        if tokenizer is None:
            tokens, specials = num_bytes, 2
        else:
            tokens = sum(len(tokenizer.encode(src[i]["text"])) for i in range(len(src)))
            specials = (tokenizer.bos_id is not None) + (tokenizer.eos_id is not None)
        stats[split] = {
            "files": len(src.files),
            "bytes": num_bytes,
            "records": len(src),
            "tokens": tokens,
            "doc_tokens": tokens + specials * len(src),
        }
    return stats


def format_stats(stats: dict[str, dict[str, int]]) -> str:
    """The table ``corpus_stats`` returns, one row per split and a total."""
    keys = ("files", "bytes", "records", "tokens", "doc_tokens")
    total = {k: sum(s[k] for s in stats.values()) for k in keys}
    rows = [("split", *keys)] + [
        (split, *(f"{s[k]:,}" for k in keys)) for split, s in [*stats.items(), ("total", total)]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(keys) + 1)]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print the stdlib corpus and its size per split (arguments: the module doc)."""
    from lm_align.data.tokenizers import make_tokenizer  # pylint: disable=g-import-not-at-top

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--tokenizer", default="byte", help="byte, sentencepiece:PATH.model or hf:DIR")
    p.add_argument("--pattern", default="", help="fnmatch pattern, e.g. 'email/*'")
    p.add_argument("--include-tests", action="store_true")
    p.add_argument("--eval-fraction", type=float, default=config.DEFAULTS["stdlib_eval_fraction"])
    p.add_argument("--seq-len", type=int, default=config.DEFAULTS["seq_len"])
    p.add_argument("--chunk-bytes", type=int, default=None, help="default: seq_len - 1")
    args = p.parse_args(argv)
    data_cfg = {
        "source": "stdlib" + (f":{args.pattern}" if args.pattern else ""),
        "tokenizer": args.tokenizer,
        "seq_len": args.seq_len,
        "stdlib_include_tests": args.include_tests,
        "stdlib_eval_fraction": args.eval_fraction,
        "stdlib_chunk_bytes": args.chunk_bytes,
    }
    try:
        config.check(data_cfg)
        tokenizer = None if args.tokenizer == "byte" else make_tokenizer(args.tokenizer)
        print(source_from_config(data_cfg, "train", args.pattern).summary())
        print(f"tokens with tokenizer {args.tokenizer!r}:")
        print(format_stats(corpus_stats(data_cfg, tokenizer)))
    except DataError as e:
        print(f"error: {e}")
        return 2
    return 0
