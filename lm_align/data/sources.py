"""Data sources: a registry from ``data_cfg.source`` strings to records.

A source is a random-access sequence of records (``len(src)``, ``src[i]``)
that ``grain.MapDataset.source`` accepts. A record is a dict with either
``"text"`` (a plain document) or ``"prompt"`` and ``"completion"`` (a task
example, e.g. arithmetic).

``data_cfg.source`` is ``NAME`` or ``NAME:ARG``:

  ``arithmetic``        built-in arithmetic problems (no download); the train
                        split has ``ARITHMETIC_TRAIN_LENGTH`` (virtual, never
                        runs out) records, eval has ``eval_examples``.
  ``stdlib[:PATTERN]``  this interpreter's standard library (*.py), no
                        download; split by file, records are chunks of whole
                        lines (``stdlib_source``; stdlib_* fields).
  ``text:PATH_OR_GLOB`` one document per non-empty line; line i is in eval iff
                        ``i % text_eval_every == 0`` (default 20), else train.
  ``tfds:NAME[:VERSION]`` a tfds dataset prepared as array_record
                        (``tfds_source``; tfds_* fields).
  ``seqio:TASK``        a registered seqio task or mixture, materialised
                        (``seqio_source``; seqio_* fields).
  ``kg_facts``          a seeded synthetic knowledge graph: statements (+ some
                        QA) in train, QA on the other facts in eval
                        (``kg_facts``; kg_* fields).
  ``jsonl:PATH_OR_GLOB`` one JSON object per line, text or prompt/completion
                        (``jsonl``; jsonl_* fields, on_bad_record); eval
                        split as for text.

New sources register a builder with ``register_source``. A source may also
have ``origin(index) -> str`` (e.g. ``"file:line"``, used in error messages),
``summary() -> str`` and ``skipped`` / ``skipped_examples`` (bad records it
skipped), which ``describe_source`` reports.
"""

from typing import Any, Callable, Protocol

from lm_align.data import config
from lm_align.data.arithmetic import ArithmeticTask
from lm_align.data.errors import DataError
from lm_align.data.text import TextFileSource

SPLITS = ("train", "eval")
# Virtual length of the arithmetic train split: the largest length grain's
# index shuffle supports (32-bit), far more records than any run reads.
ARITHMETIC_TRAIN_LENGTH = 2**31 - 1


class RandomAccessSource(Protocol):
    """What grain.MapDataset.source needs: ``len`` and integer indexing."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, str]: ...


# builder(data_cfg, split, arg) -> source, where arg is the text after "NAME:".
SourceBuilder = Callable[[Any, str, str], RandomAccessSource]
_BUILDERS: dict[str, SourceBuilder] = {}


def register_source(name: str) -> Callable[[SourceBuilder], SourceBuilder]:
    """Decorator registering ``builder`` as the source called ``name``."""

    def decorator(builder: SourceBuilder) -> SourceBuilder:
        if name in _BUILDERS:
            raise ValueError(f"source {name!r} is already registered.")
        _BUILDERS[name] = builder
        return builder

    return decorator


def source_names() -> list[str]:
    """Registered source names."""
    return sorted(_BUILDERS)


def make_source(data_cfg: Any, split: str) -> RandomAccessSource:
    """The records of ``split`` ("train" or "eval") of ``data_cfg.source``."""
    if split not in SPLITS:
        raise DataError(f"split={split!r}; valid splits: {SPLITS}.")
    spec = config.get(data_cfg, "source")
    name, _, arg = spec.partition(":")
    if name not in _BUILDERS:
        raise DataError(
            f"unknown data source {spec!r}; valid sources: 'arithmetic', "
            "'text:PATH_OR_GLOB', 'tfds:NAME[:VERSION]', 'seqio:TASK_OR_MIXTURE'"
            " (registered names: "
            f"{source_names()})."
        )
    source = _BUILDERS[name](data_cfg, split, arg)
    if len(source) == 0:  # pylint: disable=g-explicit-length-test
        raise DataError(f"the {split!r} split of source {spec!r} is empty; add more data.")
    return source


class ArithmeticSource:
    """Records ``task.record(split, i)`` for ``i < length``."""

    def __init__(self, task: ArithmeticTask, split: str, length: int):
        self.task, self.split, self.length = task, split, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, str]:
        return self.task.record(self.split, index)

    def __repr__(self) -> str:
        return f"ArithmeticSource({self.task!r}, {self.split!r}, {self.length})"


class EveryNthSplit:
    """Eval = records with ``index % every == 0``; train = all the others.

    Train index j maps to parent index ``j + j // (every - 1) + 1`` (skipping
    0, every, 2 * every, ...).
    """

    def __init__(self, parent: RandomAccessSource, every: int, split: str):
        self.parent, self.every, self.split = parent, every, split
        num_eval = -(-len(parent) // every)  # ceil
        self.length = num_eval if split == "eval" else len(parent) - num_eval

    def parent_index(self, index: int) -> int:
        if self.split == "eval":
            return index * self.every
        return index + index // (self.every - 1) + 1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, str]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range [0, {self.length}).")
        return self.parent[self.parent_index(index)]

    def origin(self, index: int) -> str:
        """Where record ``index`` comes from (e.g. ``"file:line"``)."""
        return record_origin(self.parent, self.parent_index(index))

    def __repr__(self) -> str:
        return f"EveryNthSplit({self.parent!r}, every={self.every}, {self.split!r})"


def record_origin(source: RandomAccessSource, index: int) -> str:
    """``source.origin(index)`` (e.g. ``"a.jsonl:17"``) if the source has one,
    else ``"source record INDEX"``; for error messages and reports."""
    if hasattr(source, "origin"):
        return source.origin(index)
    return f"source record {index}"


@register_source("arithmetic")
def _arithmetic(data_cfg: Any, split: str, arg: str) -> RandomAccessSource:
    if arg:
        raise DataError(
            f"source 'arithmetic:{arg}' takes no argument; set the "
            "arithmetic_* fields of the data config instead."
        )
    task = arithmetic_task(data_cfg)
    length = ARITHMETIC_TRAIN_LENGTH if split == "train" else config.get(data_cfg, "eval_examples")
    return ArithmeticSource(task, split, length)


@register_source("text")
def _text(data_cfg: Any, split: str, arg: str) -> RandomAccessSource:
    if not arg:
        raise DataError(
            "source 'text' needs a path: use 'text:PATH_OR_GLOB', e.g. 'text:data/*.txt'."
        )
    every = config.get(data_cfg, "text_eval_every")
    return EveryNthSplit(TextFileSource(arg), every, split)


def arithmetic_task(data_cfg: Any) -> ArithmeticTask:
    """The task of a data config's ``arithmetic_*`` fields (defaults where unset),
    corruption of the train demonstrations included."""
    get = lambda key: config.get(data_cfg, key)
    return ArithmeticTask(
        seed=get("arithmetic_seed"),
        num_digits=get("arithmetic_digits"),
        operators=get("arithmetic_operators"),
        num_terms=get("arithmetic_terms"),
        eval_fraction=get("arithmetic_eval_fraction"),
        corruption=get("arithmetic_corruption"),
        corruption_rate=get("arithmetic_corruption_rate"),
    )
