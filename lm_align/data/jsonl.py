"""JSON Lines corpora: one JSON object per line -> text or prompt/completion records.

``data.source = "jsonl:PATH_OR_GLOB"`` reads the matched files in sorted path
order. Every non-blank line must be one JSON object; a blank (whitespace-only)
line is ignored, and so is a UTF-8 byte-order mark at the start of a file.
The record of a line is::

  {"text": obj[jsonl_text_field]}                         (default: field "text")
  {"prompt": obj[jsonl_prompt_field],
   "completion": obj[jsonl_completion_field]}              (when both are set)

Other fields of the object are ignored. The eval split is every
``text_eval_every``-th record (record 0, N, 2N, ...), as for text sources.

Bad input (each message names ``file:line`` and the fix)::

  line is not valid UTF-8          | not valid JSON | not a JSON object
  the field is missing (the message lists the fields the line has)
  the field is not a string        | the field is empty or whitespace only
  the file has no JSON lines at all (names the file)

``on_bad_record="error"`` (default) raises ``DataError`` at the first of them;
``"skip"`` drops the line (or empty file) and counts it: ``source.skipped`` is
the count and ``source.skipped_examples`` the first ``MAX_SKIP_EXAMPLES``
messages. Nothing is ever changed silently: a record is either used exactly
as written or skipped and counted.

The loaders of preference records (``lm_align.data.preference``) read their
files through ``read_json_objects`` and share these rules.
"""

import dataclasses
import glob
import json
import os
from collections.abc import Iterator
from typing import Any

from lm_align.data import config
from lm_align.data.config import BAD_RECORD_MODES
from lm_align.data.errors import DataError
from lm_align.data.sources import EveryNthSplit, RandomAccessSource, register_source

MAX_SKIP_EXAMPLES = 5  # skip messages kept for reports; all are counted.
_SNIPPET_CHARS = 60  # how much of a bad line an error message quotes.
_BOM = "\ufeff"  # UTF-8 byte-order mark some editors write at the start


@dataclasses.dataclass
class SkipLog:
    """Skipped bad records: a count and the first few ``"file:line: reason"``."""

    count: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_SKIP_EXAMPLES:
            self.examples.append(message)


class BadRecord(Exception):
    """Internal: a bad line; ``handle_bad`` turns it into an error or a skip."""


def handle_bad(message: str, on_bad_record: str, skips: SkipLog) -> None:
    """Raises ``DataError(message)`` in "error" mode, else counts a skip."""
    if on_bad_record == "error":
        raise DataError(message + " (or set on_bad_record='skip' to skip and count such lines)")
    skips.add(message)


def check_mode(on_bad_record: str) -> None:
    if on_bad_record not in BAD_RECORD_MODES:
        raise DataError(f"on_bad_record={on_bad_record!r}; valid modes: {BAD_RECORD_MODES}.")


def match_files(path_or_glob: str) -> list[str]:
    """Sorted files matched by ``path_or_glob`` (``**`` is recursive)."""
    paths = sorted(
        p for p in glob.glob(os.path.expanduser(path_or_glob), recursive=True) if os.path.isfile(p)
    )
    if not paths:
        raise DataError(
            f"no file matches {path_or_glob!r} (cwd {os.getcwd()}); check the "
            "path, or quote the glob so the shell does not expand it."
        )
    return paths


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: object, array, string, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )


def _snippet(line: str) -> str:
    return repr(line if len(line) <= _SNIPPET_CHARS else line[:_SNIPPET_CHARS] + "...")


def read_json_objects(
    path: str, *, on_bad_record: str, skips: SkipLog
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields ``(line_number, object)`` for each JSON-object line of ``path``.

    Line numbers are 1-based. Blank lines are ignored. Undecodable, non-JSON and
    non-object lines, and a file with no JSON lines, go to ``handle_bad``.
    """
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    found = False
    for line_number, raw in enumerate(raw_lines, start=1):
        where = f"{path}:{line_number}"
        try:
            line = raw.decode("utf-8").removesuffix("\r")
            if line_number == 1:
                line = line.removeprefix(_BOM)  # a byte-order mark is not data
        except UnicodeDecodeError as e:
            handle_bad(
                f"{where}: line is not valid UTF-8 ({e.reason} at byte {e.start}); "
                f"re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path}`",
                on_bad_record,
                skips,
            )
            found = True
            continue
        if not line.strip():
            continue
        found = True
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            handle_bad(
                f"{where}: not valid JSON ({e.msg} at column {e.colno}): "
                f"{_snippet(line)}; each line must be one complete JSON object "
                "(pretty-printed, multi-line JSON is not JSON Lines)",
                on_bad_record,
                skips,
            )
            continue
        if not isinstance(obj, dict):
            handle_bad(
                f"{where}: expected a JSON object {{...}}, got a JSON "
                f"{json_type(obj)}: {_snippet(line)}",
                on_bad_record,
                skips,
            )
            continue
        yield line_number, obj
    if not found:
        handle_bad(
            f"{path}: the file is empty (no JSON lines); remove it from the glob or add records",
            on_bad_record,
            skips,
        )


def string_field(obj: dict[str, Any], field: str, where: str, hint: str) -> str:
    """``obj[field]`` if it is a non-blank string, else raises ``BadRecord``.

    ``hint`` says which setting chooses ``field`` (shown when it is missing).
    """
    if field not in obj:
        raise BadRecord(f"{where}: no field {field!r}; this line has fields {sorted(obj)}; {hint}")
    value = obj[field]
    if not isinstance(value, str):
        raise BadRecord(
            f"{where}: field {field!r} is a JSON {json_type(value)} "
            f"({_snippet(json.dumps(value))}), not a string"
        )
    if not value.strip():
        raise BadRecord(f"{where}: field {field!r} is empty; remove the line")
    return value


class JsonlSource:
    """Random-access source over the JSON-object lines of ``.jsonl`` files.

    Args:
      path_or_glob: a file or a glob such as ``"data/*.jsonl"``; files are read
        in sorted order.
      text_field: the field holding the document (text records).
      prompt_field, completion_field: if both are non-empty, records are
        ``{"prompt", "completion"}`` read from these fields (SFT examples) and
        ``text_field`` is not used.
      on_bad_record: "error" (raise at the first bad line) or "skip" (count).

    Attributes:
      skipped: number of skipped bad lines (and empty files).
      skipped_examples: the first few skip messages, ``"file:line: reason"``.
    """

    def __init__(
        self,
        path_or_glob: str,
        *,
        text_field: str = "text",
        prompt_field: str = "",
        completion_field: str = "",
        on_bad_record: str = "error",
    ):
        check_mode(on_bad_record)
        if bool(prompt_field) != bool(completion_field):
            raise DataError(
                f"jsonl_prompt_field={prompt_field!r}, jsonl_completion_field="
                f"{completion_field!r}; set both (prompt/completion records) or "
                "neither (text records from jsonl_text_field)."
            )
        if not (prompt_field or text_field):
            raise DataError("jsonl_text_field is empty; name the document field.")
        self.path_or_glob = path_or_glob
        self.paths = match_files(path_or_glob)
        self.fields = (
            {"prompt": prompt_field, "completion": completion_field}
            if prompt_field
            else {"text": text_field}
        )
        self.on_bad_record = on_bad_record
        self._skips = SkipLog()
        self._records: list[dict[str, str]] = []
        self._origins: list[tuple[int, int]] = []  # (index into paths, line)
        for path_index, path in enumerate(self.paths):
            self._read(path_index, path)
        if not self._records:
            raise DataError(
                f"{path_or_glob!r} has no usable records: {self._skips.count} bad "
                f"lines skipped, e.g. {self._skips.examples[:2]}; fix the files."
            )

    def _read(self, path_index: int, path: str) -> None:
        hint = (
            "set data.jsonl_prompt_field/jsonl_completion_field to the fields "
            "holding the prompt and the completion"
            if "prompt" in self.fields
            else "set data.jsonl_text_field to the field holding the document"
        )
        objects = read_json_objects(path, on_bad_record=self.on_bad_record, skips=self._skips)
        for line_number, obj in objects:
            where = f"{path}:{line_number}"
            try:
                record = {
                    key: string_field(obj, field, where, hint) for key, field in self.fields.items()
                }
            except BadRecord as e:
                handle_bad(str(e), self.on_bad_record, self._skips)
                continue
            self._records.append(record)
            self._origins.append((path_index, line_number))

    @property
    def skipped(self) -> int:
        return self._skips.count

    @property
    def skipped_examples(self) -> list[str]:
        return list(self._skips.examples)

    def origin(self, index: int) -> str:
        """``"file:line"`` of record ``index``."""
        path_index, line_number = self._origins[index]
        return f"{self.paths[path_index]}:{line_number}"

    def summary(self) -> str:
        """One line: records, files and the fields read."""
        kind = "prompt/completion" if "prompt" in self.fields else "text"
        return f"{len(self)} {kind} records from {len(self.paths)} file(s), fields {self.fields}"

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, str]:
        return dict(self._records[index])

    def __repr__(self) -> str:
        return (
            f"JsonlSource({self.path_or_glob!r}, files={len(self.paths)}, "
            f"records={len(self)}, skipped={self.skipped})"
        )


@register_source("jsonl")
def _jsonl(data_cfg: Any, split: str, arg: str) -> RandomAccessSource:
    if not arg:
        raise DataError(
            "source 'jsonl' needs a path: use 'jsonl:PATH_OR_GLOB', e.g. 'jsonl:data/*.jsonl'."
        )
    source = JsonlSource(
        arg,
        text_field=config.get(data_cfg, "jsonl_text_field"),
        prompt_field=config.get(data_cfg, "jsonl_prompt_field"),
        completion_field=config.get(data_cfg, "jsonl_completion_field"),
        on_bad_record=config.get(data_cfg, "on_bad_record"),
    )
    return EveryNthSplit(source, config.get(data_cfg, "text_eval_every"), split)
