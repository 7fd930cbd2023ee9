"""Tokenizers: text <-> token ids.

A tokenizer maps a string to a list of ids in ``[0, vocab_size)`` and back.
Special ids are exposed as properties so that the pipeline, the losses and the
sampler never hard-code them.

``ByteTokenizer`` (the built-in default, no files needed)::

  id 0 = pad, id 1 = bos, id 2 = eos, byte b (UTF-8) -> id b + 3; vocab 259.

  >>> tok = ByteTokenizer()
  >>> tok.encode("hi")
  [107, 108]
  >>> tok.decode([1, 107, 108, 2, 107])
  'hi'

``SentencePieceTokenizer`` (a trained ``.model`` file; ``make_tokenizer(
"sentencepiece:PATH")``): ids are the model's pieces; pad/bos/eos are the
model's own ids. ``train_sentencepiece`` trains one locally with
pad=0, bos=1, eos=2, unk=3, the same special ids as ``ByteTokenizer``.

``HFTokenizer`` (a Hugging Face ``tokenizer.json``, read by the ``tokenizers``
package; ``make_tokenizer("hf:DIR")`` with DIR holding ``tokenizer.json`` and
``tokenizer_config.json``, or ``"hf:PATH/tokenizer.json"``): ids are the
file's; bos, eos and pad are the ``bos_token``, ``eos_token`` and
``pad_token`` of ``tokenizer_config.json`` (no pad token: pad = eos, which
the pipeline masks out of every loss).

Tokenizer names (``data_cfg.tokenizer``): ``"byte"``,
``"sentencepiece:PATH"`` or ``"hf:PATH"``.
"""

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from lm_align.data.errors import DataError

NUM_SPECIAL_IDS = 3  # pad, bos, eos occupy ids 0, 1, 2 in ByteTokenizer.
NUM_BYTES = 256


class Tokenizer(Protocol):
    """What the data pipeline, sampler and evaluators need from a tokenizer."""

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str: ...


class ByteTokenizer:
    """UTF-8 byte tokenizer: id = byte + 3, with pad=0, bos=1, eos=2.

    ``encode`` never adds specials; the pipeline adds bos/eos around documents.
    """

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def vocab_size(self) -> int:
        return NUM_BYTES + NUM_SPECIAL_IDS  # 259

    def encode(self, text: str) -> list[int]:
        """Returns ``[b + 3 for b in text.encode('utf-8')]`` (no special ids)."""
        return [b + NUM_SPECIAL_IDS for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Inverse of ``encode``: bytes ``id - 3`` decoded as UTF-8.

        Special ids (pad, bos, eos) are dropped; with ``stop_at_eos`` everything
        from the first eos on is dropped too. Byte sequences that are not valid
        UTF-8 (possible in model samples) decode to U+FFFD instead of raising.

        Raises:
          ValueError: an id outside ``[0, vocab_size)``; mask logits of a padded
            model vocabulary to ``vocab_size`` before sampling.
        """
        kept = _kept_ids(ids, self, stop_at_eos, "the byte vocabulary")
        out = bytes(i - NUM_SPECIAL_IDS for i in kept)  # the specials are ids 0, 1, 2
        return out.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


def _import_sentencepiece():
    try:
        import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise DataError(
            "SentencePiece tokenizers need the sentencepiece package; install the "
            'extra: pip install -e ".[seqio]" (or pip install sentencepiece).'
        ) from None
    return sentencepiece


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` behind the ``Tokenizer`` interface.

    ``encode(text)`` is the model's segmentation (``sp.encode(text)``, no special
    ids); ``vocab_size`` is the model's piece count. bos and eos are the model's
    own ids and must exist (the pipeline frames every document as
    ``[bos] + ids + [eos]``). A model without a pad piece (LLaMA-style models
    set ``pad_id=-1``) pads with its eos id: padding always has loss_mask 0 and
    segment id 0, so the id never reaches the loss.

    Args:
      model_path: a ``.model`` file, e.g. one written by ``train_sentencepiece``
        or ``lm-align tokenizer train``.
    """

    def __init__(self, model_path: str):
        self.model_path = model_path
        if not os.path.isfile(model_path):
            raise DataError(
                f"SentencePiece model {model_path!r} does not exist (cwd "
                f"{os.getcwd()}); fix the path, or train one: `lm-align tokenizer "
                "train --vocab-size N --output PREFIX` writes PREFIX.model."
            )
        spm = _import_sentencepiece()
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise DataError(
                f"SentencePiece model {model_path!r} has bos_id={self._sp.bos_id()}, "
                f"eos_id={self._sp.eos_id()}; lm_align needs both (every document is "
                "[bos] + ids + [eos]). Train a model with bos and eos, e.g. "
                "`lm-align tokenizer train` (pad=0, bos=1, eos=2)."
            )
        pad = self._sp.pad_id()
        self._pad_id = pad if pad >= 0 else self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """The model's piece ids of ``text`` (no special ids added)."""
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Inverse of ``encode`` (up to SentencePiece normalisation).

        pad/bos/eos are dropped; with ``stop_at_eos`` everything from the first
        eos on is dropped too.

        Raises:
          ValueError: an id outside ``[0, vocab_size)``; mask logits of a padded
            model vocabulary to ``vocab_size`` before sampling.
        """
        kept = _kept_ids(ids, self, stop_at_eos, f"the SentencePiece vocabulary of {self.model_path}")
        return self._sp.decode(kept)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` behind the ``Tokenizer`` interface.

    ``encode(text)`` is the file's segmentation without special tokens
    (``add_special_tokens=False``: the pipeline adds bos/eos itself), so its
    ids equal ``transformers``' ``tokenizer(text, add_special_tokens=False)``.
    """

    def __init__(self, path: str):
        try:
            import tokenizers
        except ImportError:
            raise DataError(
                "Hugging Face tokenizers need the tokenizers package: pip install tokenizers"
            ) from None
        path = os.path.expanduser(path)
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise DataError(
                f"no tokenizer file {file}; 'hf:PATH' names a directory with tokenizer.json "
                "(a Hugging Face model directory) or the tokenizer.json file itself."
            )
        self.path = file
        self._tok = tokenizers.Tokenizer.from_file(file)
        config_path = os.path.join(directory, "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = json.load(f)
        names = {k: _token_text(config.get(f"{k}_token")) for k in ("bos", "eos", "pad")}
        if names["eos"] is None:
            raise DataError(
                f"{config_path} names no eos_token; the pipeline ends every document with "
                'eos: add "eos_token" to tokenizer_config.json.'
            )
        self._ids = {}
        for k, text in names.items():
            i = None if text is None else self._tok.token_to_id(text)
            if text is not None and i is None:
                raise DataError(f"{k}_token {text!r} of {config_path} is not in {file}.")
            self._ids[k] = i
        if self._ids["pad"] is None:
            self._ids["pad"] = self._ids["eos"]

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def bos_id(self) -> int | None:
        """None for models without one (Qwen): documents then start without it."""
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """The file's token ids of ``text`` (no special ids added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Inverse of ``encode``: pad/bos/eos dropped; with ``stop_at_eos`` everything
        from the first eos on is dropped too.

        Raises:
          ValueError: an id outside ``[0, vocab_size)``; mask logits of a padded
            model vocabulary to ``vocab_size`` before sampling.
        """
        kept = _kept_ids(ids, self, stop_at_eos, f"the vocabulary of {self.path}")
        return self._tok.decode(kept, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _kept_ids(ids: Iterable[int], tok: Tokenizer, stop_at_eos: bool, vocabulary: str) -> list[int]:
    """The ids to decode: pad/bos/eos dropped, everything from the first eos on
    dropped with `stop_at_eos`; an id outside ``[0, vocab_size)`` is a ValueError."""
    specials = {tok.pad_id, tok.bos_id, tok.eos_id}
    kept = []
    for i in ids:
        i = int(i)
        if not 0 <= i < tok.vocab_size:
            raise ValueError(
                f"token id {i} is outside {vocabulary} [0, {tok.vocab_size}); mask logits "
                "beyond tokenizer.vocab_size before sampling."
            )
        if i == tok.eos_id and stop_at_eos:
            break
        if i not in specials:
            kept.append(i)
    return kept


def _token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, or ``{"content": str, ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Non-empty lines of every text (SentencePiece trains on sentences)."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    *,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    byte_fallback: bool = False,
    input_sentence_size: int = 1_000_000,
    num_threads: int = 2,
    **trainer_kwargs: Any,
) -> SentencePieceTokenizer:
    """Trains a SentencePiece model on ``texts``; writes ``model_prefix.model``.

    Special ids match ``ByteTokenizer``: pad=0, bos=1, eos=2 (and unk=3), so
    the rest of lm_align never depends on which tokenizer is in use. Each text
    is split into lines; every non-empty line is one training sentence.

    Args:
      texts: documents (any iterable of str; consumed once).
      model_prefix: output path without extension; ``.model`` and ``.vocab``
        are written next to it (parent directories are created).
      vocab_size: pieces in the model, specials included.
      model_type: "unigram" (default), "bpe", "char" or "word".
      character_coverage: fraction of characters covered by the vocabulary;
        1.0 for small alphabets, 0.9995 for CJK-heavy corpora.
      byte_fallback: encode characters outside the vocabulary as UTF-8 byte
        pieces instead of unk (needs vocab_size > 256 + specials + alphabet).
      input_sentence_size: at most this many lines are sampled for training.
      num_threads: trainer threads.
      **trainer_kwargs: any other ``SentencePieceTrainer.train`` option.

    Returns:
      The trained model as a ``SentencePieceTokenizer``.

    Raises:
      DataError: no text, or a vocab_size the corpus cannot fill (the message
        gives the largest size that works).
    """
    spm = _import_sentencepiece()
    if vocab_size < 8:
        raise DataError(f"vocab_size={vocab_size}; use at least 8.")
    parent = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(parent, exist_ok=True)
    lines = _training_lines(texts)
    first = next(lines, None)
    if first is None:
        raise DataError(
            "no text to train SentencePiece on: every document was empty; check the source."
        )

    def sentences() -> Iterator[str]:
        yield first
        yield from lines

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads,
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            minloglevel=2,
            **trainer_kwargs,
        )
    except RuntimeError as e:
        reason = str(e).rstrip(".")
        raise DataError(
            f"SentencePiece training failed: {reason}. If vocab_size={vocab_size}"
            " is too high or too low for this corpus, use the size the message "
            "suggests (or add text)."
        ) from None
    return SentencePieceTokenizer(model_prefix + ".model")


_SENTENCEPIECE_PREFIX = "sentencepiece:"
_HF_PREFIX = "hf:"
_TOKENIZERS = {"byte": ByteTokenizer}


def doc_start(tokenizer: Tokenizer) -> list[int]:
    """What every document and prompt starts with: ``[bos]``, or nothing for a
    tokenizer without bos (``bos_id`` None, e.g. Qwen's)."""
    return [] if tokenizer.bos_id is None else [tokenizer.bos_id]


def make_tokenizer(name: str) -> Tokenizer:
    """Builds the tokenizer ``name``: "byte", "sentencepiece:PATH.model" or "hf:PATH"."""
    if name.startswith(_HF_PREFIX):
        if not name[len(_HF_PREFIX) :]:
            raise DataError(
                "tokenizer 'hf:' needs a path: 'hf:/path/to/model_dir' (with tokenizer.json)."
            )
        return HFTokenizer(name[len(_HF_PREFIX) :])
    if name.startswith(_SENTENCEPIECE_PREFIX):
        path = name[len(_SENTENCEPIECE_PREFIX) :]
        if not path:
            raise DataError(
                "tokenizer 'sentencepiece:' needs a model path: 'sentencepiece:/path/to/x.model'."
            )
        return SentencePieceTokenizer(os.path.expanduser(path))
    if name not in _TOKENIZERS:
        raise DataError(
            f"unknown tokenizer {name!r}; valid tokenizers: {sorted(_TOKENIZERS)},"
            " 'sentencepiece:/path/to/x.model' or 'hf:/path/to/model_dir'."
        )
    return _TOKENIZERS[name]()
