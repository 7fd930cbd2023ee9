"""The data config: every field, its default and its meaning, in one place.

``data_cfg`` may be a plain dict or an ml_collections ``ConfigDict``; it is
read only through ``data_cfg.get(key, default)`` and ``data_cfg.keys()``, so this
package never imports ml_collections. Missing fields take the defaults below;
unknown fields are an error (a typo must not silently fall back).
"""

from typing import Any

from lm_align.data.arithmetic import check_corruption
from lm_align.data.errors import DataError

DEFAULTS: dict[str, Any] = {
    # "arithmetic" (built-in, no download) | "stdlib[:PATTERN]" (this Python's
    # standard library, no download) | "text:PATH_OR_GLOB" (one doc/line)
    # | "tfds:NAME[:VERSION]" (prepared array_record) | "seqio:TASK_OR_MIXTURE".
    "source": "arithmetic",
    # Tokens per row: inputs/targets are [batch, seq_len]. The trainer passes
    # it to make_batch_iterator(seq_len=...), which does not read this field.
    "seq_len": 64,
    # "pack": first-fit pack whole documents into rows; "pad": one doc per row.
    "packing": "pack",
    # Tokenizer for make_tokenizer: "byte" (UTF-8 bytes, vocab 259),
    # "sentencepiece:PATH.model" or "hf:DIR" (a Hugging Face tokenizer.json).
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
    # Systematic error of the arithmetic TRAIN completions (eval is never
    # changed): "none" | "dropped_carry" (addition with a carry: its lowest
    # carry dropped) | "off_by_one" (answer + 1). See lm_align.data.arithmetic.
    "arithmetic_corruption": "none",
    # Fraction of the eligible train problems corrupted, in [0, 1]; which ones
    # is a fixed hash of the prompt.
    "arithmetic_corruption_rate": 0.0,
    # Text sources: line i is in eval iff i % text_eval_every == 0 (>= 2).
    "text_eval_every": 20,
    # Documents longer than seq_len tokens (with bos/eos): "truncate" (cut to
    # seq_len, counted), "skip" (dropped, counted) or "error" (raise, naming
    # the record). describe_source() reports the counts.
    "overlong": "truncate",
    # Bad jsonl lines (malformed JSON, missing/non-string/empty field, bad
    # UTF-8, empty file): "error" (raise naming file:line) or "skip" (counted).
    "on_bad_record": "error",
    # jsonl sources: the string field holding each document (text records).
    "jsonl_text_field": "text",
    # jsonl sources: if both are non-empty, records are prompt/completion pairs
    # read from these fields (SFT) and jsonl_text_field is not used.
    "jsonl_prompt_field": "",
    "jsonl_completion_field": "",
    # kg_facts: seed of the synthetic knowledge graph (names, facts, QA split).
    "kg_seed": 0,
    # kg_facts: entities in the graph (2..100000).
    "kg_entities": 200,
    # kg_facts: relations used (1..8), e.g. capital, founder, mentor, ...
    "kg_relations": 4,
    # kg_facts: facts per subject entity, distinct relations (<= kg_relations).
    "kg_facts_per_entity": 2,
    # kg_facts: statements per fact in train (paraphrase templates cycle).
    "kg_repeats": 1,
    # kg_facts: fraction of facts whose QA form is in train, in [0, 1); the
    # other facts' questions are the eval split.
    "kg_qa_train_fraction": 0.5,
    # stdlib source: also read the test suites (files under test/, tests/ and
    # idle_test/ directories).
    "stdlib_include_tests": False,
    # stdlib source: expected fraction of the files in eval, in (0, 1); a file
    # is in eval iff a hash of its path is below it (split by file).
    "stdlib_eval_fraction": 0.05,
    # stdlib source: UTF-8 bytes per record at most (whole lines, long lines
    # cut); None = seq_len - 1 (fits a row with the byte tokenizer); 0 = one
    # record per file.
    "stdlib_chunk_bytes": None,
    # tfds sources: TFDS data dir holding the prepared dataset; None = tfds's
    # default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    "tfds_data_dir": None,
    # tfds sources: the string feature holding each document.
    "tfds_text_field": "text",
    # tfds sources: split names (any tfds split string, e.g. "train[:95%]").
    "tfds_train_split": "train",
    "tfds_eval_split": "validation",
    # seqio sources: comma-separated Python modules imported first; importing
    # them registers your tasks/mixtures (e.g. "my_project.tasks").
    "seqio_imports": "",
    # seqio sources: split names of the task or mixture.
    "seqio_train_split": "train",
    "seqio_eval_split": "validation",
    # seqio sources: examples materialised in memory per split (the first ones
    # of seqio's unshuffled pipeline); grain shuffles and packs them.
    "seqio_max_examples": 100_000,
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
        raise DataError(f"packing={get(data_cfg, 'packing')!r}; valid modes: {PACKING_MODES}.")
    for key, low in [
        ("seq_len", 1),
        ("eval_examples", 1),
        ("grain_workers", 0),
        ("grain_read_threads", 0),
        ("text_eval_every", 2),
        ("seqio_max_examples", 1),
    ]:
        value = get(data_cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DataError(f"{key}={value!r}; use an integer >= {low}.")
    for key in (
        "tfds_text_field",
        "tfds_train_split",
        "tfds_eval_split",
        "seqio_train_split",
        "seqio_eval_split",
    ):
        value = get(data_cfg, key)
        if not isinstance(value, str) or not value:
            raise DataError(f"{key}={value!r}; use a non-empty string.")
    if not isinstance(get(data_cfg, "seqio_imports"), str):
        raise DataError(
            f"seqio_imports={get(data_cfg, 'seqio_imports')!r}; use a "
            "comma-separated string of module names, e.g. 'my_tasks,other.tasks'."
        )
    data_dir = get(data_cfg, "tfds_data_dir")
    if data_dir is not None and (not isinstance(data_dir, str) or not data_dir):
        raise DataError(
            f"tfds_data_dir={data_dir!r}; use a directory path or None (tfds's default)."
        )
    if not isinstance(get(data_cfg, "completion_only_loss"), bool):
        raise DataError(
            f"completion_only_loss={get(data_cfg, 'completion_only_loss')!r}; use True or False."
        )
    _check_local_sources(data_cfg)
    check_corruption(
        get(data_cfg, "arithmetic_corruption"),
        get(data_cfg, "arithmetic_corruption_rate"),
        names=("arithmetic_corruption", "arithmetic_corruption_rate"),
    )


OVERLONG_MODES = ("truncate", "skip", "error")
BAD_RECORD_MODES = ("error", "skip")


def _check_local_sources(data_cfg: Any) -> None:
    """Checks the overlong, on_bad_record, jsonl_*, stdlib_* and kg_* fields."""
    for key, modes in (("overlong", OVERLONG_MODES), ("on_bad_record", BAD_RECORD_MODES)):
        if get(data_cfg, key) not in modes:
            raise DataError(f"{key}={get(data_cfg, key)!r}; valid modes: {modes}.")
    for key in ("jsonl_text_field", "jsonl_prompt_field", "jsonl_completion_field"):
        if not isinstance(get(data_cfg, key), str):
            raise DataError(f"{key}={get(data_cfg, key)!r}; use a field name string.")
    for key, low in (
        ("kg_seed", 0),
        ("kg_entities", 2),
        ("kg_relations", 1),
        ("kg_facts_per_entity", 1),
        ("kg_repeats", 1),
    ):
        value = get(data_cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DataError(f"{key}={value!r}; use an integer >= {low}.")
    if not isinstance(get(data_cfg, "stdlib_include_tests"), bool):
        raise DataError(
            f"stdlib_include_tests={get(data_cfg, 'stdlib_include_tests')!r}; use True or False."
        )
    eval_fraction = get(data_cfg, "stdlib_eval_fraction")
    if (
        not isinstance(eval_fraction, (int, float))
        or isinstance(eval_fraction, bool)
        or not 0 < eval_fraction < 1
    ):
        raise DataError(
            f"stdlib_eval_fraction={eval_fraction!r}; use a value in (0, 1), e.g. 0.05."
        )
    chunk_bytes = get(data_cfg, "stdlib_chunk_bytes")
    if chunk_bytes is not None and (
        not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes < 0
    ):
        raise DataError(
            f"stdlib_chunk_bytes={chunk_bytes!r}; use None (seq_len - 1), 0 (whole files) "
            "or a positive integer."
        )
    fraction = get(data_cfg, "kg_qa_train_fraction")
    if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise DataError(
            f"kg_qa_train_fraction={fraction!r}; use a value in [0, 1) (1 leaves "
            "no questions for eval)."
        )
