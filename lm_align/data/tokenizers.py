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

SentencePiece comes later behind the same interface (``make_tokenizer``).
"""

from typing import Iterable, Protocol

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
    out = bytearray()
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise ValueError(
            f"token id {i} is outside the byte vocabulary [0, {self.vocab_size})"
            "; mask logits beyond tokenizer.vocab_size before sampling."
        )
      if i == self.eos_id and stop_at_eos:
        break
      if i >= NUM_SPECIAL_IDS:
        out.append(i - NUM_SPECIAL_IDS)
    return out.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer(vocab_size=259)"


_TOKENIZERS = {"byte": ByteTokenizer}


def make_tokenizer(name: str) -> Tokenizer:
  """Builds the tokenizer called ``name`` (currently: 'byte')."""
  if name not in _TOKENIZERS:
    raise ValueError(
        f"unknown tokenizer {name!r}; valid tokenizers: {sorted(_TOKENIZERS)}"
        " (SentencePiece is not available yet)."
    )
  return _TOKENIZERS[name]()
