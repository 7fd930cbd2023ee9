"""The data config: every field, its default and its meaning, in one place.

``data_cfg`` may be a plain dict or an ml_collections ``ConfigDict``; it is
read only through ``data_cfg.get(key, default)`` and ``data_cfg.keys()``, so this
package never imports ml_collections. Missing fields take the defaults below;
unknown fields are an error (a typo must not silently fall back).
"""

from typing import Any

from lm_align.data.errors import DataError

DEFAULTS: dict[str, Any] = {
    # "arithmetic" (built-in, no download) | "text:PATH_OR_GLOB" (one doc/line).
    "source": "arithmetic",
    # Tokens per row: inputs/targets are [batch, seq_len]. The trainer passes
    # it to make_batch_iterator(seq_len=...), which does not read this field.
    "seq_len": 64,
    # "pack": first-fit pack whole documents into rows; "pad": one doc per row.
    "packing": "pack",
    # Tokenizer name for make_tokenizer ("byte": UTF-8 bytes, vocab 259).
    "tokenizer": "byte",
    # If True, prompt/completion records get loss only on completion + eos.
    "completion_only_loss": False,
    # Number of records in the arithmetic eval split.
    "eval_examples": 512,
    # grain mp_prefetch worker processes; 0 = everything in this process.
    # Batches do not depend on it, but a saved iterator state only restores
    # into an iterator with the same value.
    "grain_workers": 0,
    # grain ReadOptions.num_threads; 0 suits in-memory/synthetic sources.
    "grain_read_threads": 0,
    # Arithmetic operands have 1..arithmetic_digits digits.
    "arithmetic_digits": 2,
    # Arithmetic operators, a subset of "+-*".
    "arithmetic_operators": "+",
    # Operands per arithmetic problem (>= 2).
    "arithmetic_terms": 2,
    # Fraction of the arithmetic problem space held out for eval, in (0, 1).
    "arithmetic_eval_fraction": 0.1,
    # Seed of the arithmetic problem streams (the shuffle seed is separate).
    "arithmetic_seed": 0,
    # Text sources: line i is in eval iff i % text_eval_every == 0 (>= 2).
    "text_eval_every": 20,
}

PACKING_MODES = ("pack", "pad")


def get(data_cfg: Any, key: str) -> Any:
  """``data_cfg[key]`` if set, else ``DEFAULTS[key]``."""
  if key not in DEFAULTS:
    raise KeyError(f"{key!r} is not a data config field; see DEFAULTS.")
  return data_cfg.get(key, DEFAULTS[key])


def check(data_cfg: Any) -> None:
  """Raises DataError on unknown fields or out-of-range values."""
  unknown = sorted(set(data_cfg.keys()) - set(DEFAULTS))
  if unknown:
    raise DataError(
        f"unknown data config fields {unknown}; valid fields: "
        f"{sorted(DEFAULTS)} (see lm_align.data.DEFAULTS)."
    )
  if get(data_cfg, "packing") not in PACKING_MODES:
    raise DataError(
        f"packing={get(data_cfg, 'packing')!r}; valid modes: {PACKING_MODES}."
    )
  for key, low in [
      ("seq_len", 1),
      ("eval_examples", 1),
      ("grain_workers", 0),
      ("grain_read_threads", 0),
      ("text_eval_every", 2),
  ]:
    value = get(data_cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise DataError(f"{key}={value!r}; use an integer >= {low}.")
  if not isinstance(get(data_cfg, "completion_only_loss"), bool):
    raise DataError(
        f"completion_only_loss={get(data_cfg, 'completion_only_loss')!r}; "
        "use True or False."
    )
