"""Plain-text corpora: every non-empty line of the matched files is a document.

``TextFileSource("corpus/*.txt")`` reads the files matched by the glob in sorted
path order, and exposes ``len(source)`` documents ``source[i] == {"text": line}``
(a random-access source for ``grain.MapDataset.source``). A line is non-empty
when it contains a non-whitespace character; the trailing ``\\n``/``\\r\\n`` is
removed, other whitespace is kept.

The whole corpus is held in memory (fine for the small corpora of proxy
studies; large corpora belong in array_record / tfds sources).
"""

import glob
import os

from lm_align.data.errors import DataError


def read_documents(path: str) -> list[str]:
    """Non-empty lines of the UTF-8 file ``path``; errors name file and line."""
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    docs = []
    for line_number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{line_number}: line is not valid UTF-8 ({e.reason} at byte "
                f"{e.start}); re-encode the file as UTF-8, e.g. "
                f"`iconv -f latin1 -t utf-8 {path}`."
            ) from None
        line = line.removesuffix("\r")
        if line.strip():
            docs.append(line)
    if not docs:
        raise DataError(
            f"{path} has no non-empty lines; remove it from the glob or add text "
            "(one document per line)."
        )
    return docs


class TextFileSource:
    """Random-access source over the lines of text files.

    Args:
      path_or_glob: a file path or a glob such as ``"data/*.txt"`` (``**`` works
        recursively); matched files are read in sorted order.
    """

    def __init__(self, path_or_glob: str):
        self.path_or_glob = path_or_glob
        paths = sorted(
            p
            for p in glob.glob(os.path.expanduser(path_or_glob), recursive=True)
            if os.path.isfile(p)
        )
        if not paths:
            raise DataError(
                f"no file matches {path_or_glob!r} (cwd {os.getcwd()}); check the "
                "path, or quote the glob so the shell does not expand it."
            )
        self.paths = paths
        self._docs = [doc for p in paths for doc in read_documents(p)]

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, index: int) -> dict[str, str]:
        return {"text": self._docs[index]}

    def __repr__(self) -> str:
        return (
            f"TextFileSource({self.path_or_glob!r}, files={len(self.paths)}, documents={len(self)})"
        )
