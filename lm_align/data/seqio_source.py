"""seqio tasks and mixtures as sources: ``seqio:TASK_OR_MIXTURE``.

seqio (an extra: it pulls TensorFlow) is imported only when such a source is
built. Modules listed in ``data_cfg.seqio_imports`` (comma-separated) are
imported first; importing them registers your tasks and mixtures.

Design: materialise, then grain. The first ``seqio_max_examples`` examples
of the split, from seqio's own unshuffled pipeline
(``get_dataset(sequence_length=None, shuffle=False, num_epochs=1)``, all of
the task's preprocessors applied), become an in-memory list of text records:

  targets only       -> {"text": targets}
  inputs and targets -> {"prompt": inputs, "completion": targets}

The text of a feature is its ``<feature>_pretokenized`` string when the task
keeps one (``seqio.preprocessors.tokenize`` does), else its ids decoded with
the feature's vocabulary (up to the first eos). lm_align's tokenizer then
encodes that text, and from there on everything is the grain pipeline every
source uses (shuffle, shard, pack, checkpoint). Consequences:

- Resume is exact. The materialised list is rebuilt identically on restart
  (unshuffled order, TensorFlow's global seed fixed to ``MATERIALISE_SEED``,
  so stochastic seqio preprocessors draw the same randomness), and the grain
  iterator state resumes at the next batch: nothing is replayed or skipped.
  What is repeated on restart is the materialisation itself (time, not data).
  It is only as deterministic as the task: a source whose files change, or a
  preprocessor with Python-level randomness, gives different records.
- Ids agree with the task's. If the task's ``targets`` feature has a
  ``SentencePieceVocabulary``, ``data_cfg.tokenizer`` must be
  ``sentencepiece:`` + that model file (an error says so otherwise; see
  ``task_tokenizer``), so the text encodes to the task's own ids.
- Only the first ``seqio_max_examples`` examples of a split are used, in
  seqio's order; raise it to cover a larger split (memory: about the text
  size of those examples). Materialised splits are cached per process.
"""

import difflib
import importlib
import os
from typing import Any

from lm_align.data import config
from lm_align.data.errors import DataError
from lm_align.data.sources import RandomAccessSource, register_source

EXTRA_HINT = 'pip install -e ".[seqio]"'
# tf.random.set_seed value while materialising, so that seqio preprocessors
# that draw random numbers draw the same ones on every run.
MATERIALISE_SEED = 0

# (provider id, split, max_examples) -> (provider, materialised records); the
# provider is kept so that its id is not reused by a re-registered task.
_CACHE: dict[tuple[int, str, int], tuple[Any, list[dict[str, str]]]] = {}


def import_seqio():
    """``seqio``, or a DataError naming the extra to install."""
    try:
        import seqio  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise DataError(
            f"seqio sources need seqio ({e}); install the extra: {EXTRA_HINT} "
            "(it pulls TensorFlow, about 2.4 GB)."
        ) from None
    return seqio


def import_task_modules(imports: str) -> list[str]:
    """Imports each module of the comma-separated ``imports``; returns them."""
    modules = [m.strip() for m in imports.split(",") if m.strip()]
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise DataError(
                f"seqio_imports: cannot import {module!r} ({e}); it must be "
                "importable from this Python (installed, or its directory on "
                f"PYTHONPATH, e.g. `PYTHONPATH=. lm-align ...`; cwd {os.getcwd()})."
            ) from None
    return modules


def get_provider(name: str, imports: str = "") -> Any:
    """The registered seqio Task or Mixture ``name`` (after ``imports``)."""
    seqio = import_seqio()
    modules = import_task_modules(imports)
    tasks, mixtures = seqio.TaskRegistry.names(), seqio.MixtureRegistry.names()
    if name not in tasks and name not in mixtures:
        names = sorted(set(tasks) | set(mixtures))
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        raise DataError(
            f"unknown seqio task or mixture {name!r}; close registered names: "
            f"{close or 'none'} ({len(tasks)} tasks, {len(mixtures)} mixtures "
            f"registered after importing seqio_imports={modules}). Register it in "
            "a module (seqio.TaskRegistry.add) and set "
            "--config.data.seqio_imports=THAT_MODULE."
        )
    return seqio.get_mixture_or_task(name)


def task_tokenizer(provider: Any) -> str | None:
    """``"sentencepiece:MODEL"`` if the provider's targets use a SentencePiece
    vocabulary (the tokenizer lm_align must use for ids to agree), else None."""
    seqio = import_seqio()
    feature = provider.output_features.get("targets")
    vocab = getattr(feature, "vocabulary", None)
    if isinstance(vocab, seqio.SentencePieceVocabulary):
        return "sentencepiece:" + vocab.sentencepiece_model_file
    return None


def _check_tokenizer(data_cfg: Any, name: str, provider: Any) -> None:
    wanted = task_tokenizer(provider)
    if wanted is None:
        return
    configured = config.get(data_cfg, "tokenizer")
    prefix = "sentencepiece:"
    if configured.startswith(prefix) and os.path.realpath(
        os.path.expanduser(configured[len(prefix) :])
    ) == os.path.realpath(wanted[len(prefix) :]):
        return
    vocab = provider.output_features["targets"].vocabulary
    raise DataError(
        f"seqio task {name!r} tokenises with the SentencePiece model "
        f"{wanted[len(prefix) :]!r} (vocab {vocab.vocab_size}) but "
        f"data.tokenizer={configured!r}; use the task's vocabulary so ids agree:"
        f" --config.data.tokenizer={wanted} "
        f"--config.model.vocab_size={vocab.vocab_size} (or larger)."
    )


def _feature_text(example: dict[str, Any], key: str, vocab: Any) -> str:
    """The text of feature ``key``: its pretokenized string or decoded ids."""
    value = example.get(f"{key}_pretokenized", example[key])
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    if vocab is None:
        raise DataError(
            f"seqio feature {key!r} holds ids but has no vocabulary to decode "
            "them; give the task's output feature a vocabulary."
        )
    return vocab.decode([int(i) for i in value])


def materialise(provider: Any, split: str, max_examples: int) -> list[dict[str, str]]:
    """The first ``max_examples`` examples of ``split`` as text records."""
    key = (id(provider), split, max_examples)
    if key in _CACHE:
        return _CACHE[key][1]
    seqio = import_seqio()
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    try:  # TensorFlow must not reserve the GPU memory JAX trains with.
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices (the caller's TF)
        pass
    features = provider.output_features
    if "targets" not in features:
        raise DataError(
            f"seqio task {provider.name!r} has output features {list(features)};"
            " lm_align trains on 'targets' (and 'inputs' as the prompt)."
        )
    keys = ("inputs", "targets") if "inputs" in features else ("targets",)
    kwargs = {
        "sequence_length": None,
        "split": split,
        "shuffle": False,
        "num_epochs": 1,
        "seed": None,
    }
    if isinstance(provider, seqio.Mixture):
        kwargs["copy_pretokenized"] = True
    tf.random.set_seed(MATERIALISE_SEED)
    ds = provider.get_dataset(**kwargs).take(max_examples)
    records = []
    for example in ds.as_numpy_iterator():
        texts = [_feature_text(example, k, features[k].vocabulary) for k in keys]
        if len(texts) == 1:
            records.append({"text": texts[0]})
        else:
            records.append({"prompt": texts[0], "completion": texts[1]})
    _CACHE[key] = (provider, records)
    return records


class SeqioRecords:
    """A materialised seqio split: a random-access list of text records."""

    def __init__(self, records: list[dict[str, str]], description: str):
        self.records, self.description = records, description

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, str]:
        return self.records[index]

    def origin(self, index: int) -> str:
        """Where record ``index`` comes from, for error messages."""
        return f"{self.description} example {index}"

    def __repr__(self) -> str:
        return f"SeqioRecords({self.description!r}, records={len(self)})"


@register_source("seqio")
def _seqio(data_cfg: Any, split: str, arg: str) -> RandomAccessSource:
    if not arg:
        raise DataError(
            "source 'seqio' needs a task or mixture name: 'seqio:NAME' "
            "(register tasks in a module listed in data.seqio_imports)."
        )
    provider = get_provider(arg, config.get(data_cfg, "seqio_imports"))
    _check_tokenizer(data_cfg, arg, provider)
    available = list(provider.splits)
    for key in ("seqio_train_split", "seqio_eval_split"):
        if config.get(data_cfg, key) not in available:
            raise DataError(
                f"{key}={config.get(data_cfg, key)!r} is not a split of seqio "
                f"{type(provider).__name__.lower()} {arg!r}; its splits are "
                f"{available}. Set --config.data.{key}=one of them."
            )
    seqio_split = config.get(
        data_cfg, "seqio_train_split" if split == "train" else "seqio_eval_split"
    )
    records = materialise(provider, seqio_split, config.get(data_cfg, "seqio_max_examples"))
    return SeqioRecords(records, f"seqio:{arg} {seqio_split}")
