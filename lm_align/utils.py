"""Small shared helpers for files and console output: atomic writes, JSON, process-0 logging.

Every layer may import this module (it imports only the standard library,
numpy and jax); nothing here knows about models, data or runs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np


def write_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename.

    A reader sees either the old file or the whole new one, never a partial
    write (the rename is atomic on a local disk).
    """
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def jsonable(value: Any) -> Any:
    """`value` with numpy/jax scalars and arrays turned into Python numbers and lists.

    Non-finite floats become the strings "nan", "inf", "-inf" (JSON has no
    literal for them), so the output is strict JSON:

    >>> jsonable({"loss": np.float32(0.5), "n": np.arange(2), "bad": float("nan")})
    {'loss': 0.5, 'n': [0, 1], 'bad': 'nan'}
    """
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
        return jsonable(np.asarray(value).tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(path: str, obj: Any) -> None:
    """`obj` as indented JSON (through `jsonable`), written atomically."""
    write_atomic(path, json.dumps(jsonable(obj), indent=2))


def write_jsonl(path: str, rows: Iterable[Any]) -> None:
    """One JSON object per line (through `jsonable`), written atomically."""
    write_atomic(path, "".join(json.dumps(jsonable(r)) + "\n" for r in rows))


def log(msg: str) -> None:
    """Prints `msg` on process 0 only (every process of a multi-process run calls it)."""
    import jax  # deferred: `lm_align.utils` stays importable without initialising jax

    if jax.process_index() == 0:
        print(msg, flush=True)


def tail(path: str, offset: int = 0, lines: int = 20) -> str:
    """The last `lines` non-blank lines of the text file `path` after byte `offset`.

    Progress bars redraw with carriage returns; each line keeps what a terminal
    would show (the text after its last ``\\r``). A missing file gives "".
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    shown = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join([line for line in shown if line.strip()][-lines:])
