"""Preference records for alignment: pairwise and listwise, from JSON Lines.

Shape legend: B = records in a batch, K = responses per list, L = max_len.

Pairwise file, one JSON object per line::

  {"prompt": str, "chosen": str, "rejected": str, "p": float}   ("p" optional)

``p = P(chosen beats rejected)`` is a soft label in [0.5, 1] (geometric-averaged
DPO, Furuta et al.: p = 1 is a hard preference, p = 0.5 no preference). An
absent or null ``p`` is a hard label (``soft_label=None``). A p in [0, 0.5)
means the pair is written the wrong way round: it is rejected with the fix
"swap chosen and rejected and use 1 - p".

Listwise file, one JSON object per line, with labels or a win matrix::

  {"prompt": str, "responses": [str] * K, "labels": [float] * K}
  {"prompt": str, "responses": [str] * K, "win_matrix": [[float] * K] * K}

Labels psi_k are in [0, 1], higher is better. ``win_matrix[k][i] =
Psi[k, i] = P(y_k beats y_i)`` with ``Psi[k, i] + Psi[i, k] = 1`` (so the
diagonal is 0.5) gives (Liu et al. 2024, LiPO; docs/listwise.md)::

  psi_k = mean_i Psi[k, i]    (over all K columns, the diagonal 0.5 included)

e.g. rows [[.5,.8,.6,.9],[.2,.5,.3,.7],[.4,.7,.5,.8],[.1,.3,.2,.5]] give
psi = (0.7, 0.425, 0.6, 0.275). Other fields of a line are ignored.

Validation (every message names ``file:line`` and the fix). Bad records go to
``on_bad_record``: "error" (default) raises ``DataError``; "skip" drops and
counts them. Bad records are: the reading errors of ``lm_align.data.jsonl``
(bad UTF-8, malformed JSON, non-object line, empty file); a missing field (the
message lists the fields the line has) or a field of the wrong type; an empty
prompt or response; a p that is not a number in [0.5, 1]; K < 2; labels not K
numbers in [0, 1]; both or neither of labels/win_matrix; a win matrix that is
not K x K, has entries outside [0, 1], or has ``|Psi[k,i] + Psi[i,k] - 1| >
tolerance``.

Ties go to ``on_tie`` instead: "error" (default) or "skip" (counted). A tie
is a pair with ``chosen == rejected``, or a list with two identical responses
or with all labels equal (no preference to learn).

Loaders return a ``RecordList`` (a list) whose ``skipped`` /
``skipped_examples`` attributes count and show what was skipped.
``to_batch`` turns records into padded numpy arrays for the alignment trainer;
``write_records`` writes records in the formats above.
"""

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lm_align.data.errors import DataError
from lm_align.data.jsonl import (
    BadRecord,
    SkipLog,
    check_mode,
    handle_bad,
    json_type,
    match_files,
    read_json_objects,
    string_field,
)
from lm_align.data.pipeline import pad_features, token_features
from lm_align.data.tokenizers import Tokenizer, doc_start, make_tokenizer
from lm_align.utils import write_jsonl

TIE_MODES = ("error", "skip")
OVERLONG_MODES = ("error", "truncate")
MIN_SOFT_LABEL = 0.5
WIN_MATRIX_TOLERANCE = 1e-6  # allowed |Psi[k,i] + Psi[i,k] - 1|


@dataclasses.dataclass(frozen=True)
class PairwiseRecord:
    """One preference pair; ``soft_label`` = P(chosen beats rejected) or None."""

    prompt: str
    chosen: str
    rejected: str
    soft_label: float | None = None  # in [0.5, 1]; None = hard label (p = 1)
    origin: str = ""  # "file:line" it was read from


@dataclasses.dataclass(eq=False)
class ListwiseRecord:
    """K >= 2 responses to one prompt with labels psi [K] in [0, 1]."""

    prompt: str
    responses: list[str]
    labels: np.ndarray  # [K] float64, higher is better
    origin: str = ""  # "file:line" it was read from


class RecordList(list):
    """The loaded records, plus ``skipped`` (count) and ``skipped_examples``."""

    def __init__(self, records: Sequence[Any], skips: SkipLog):
        super().__init__(records)
        self.skipped = skips.count
        self.skipped_examples = list(skips.examples)


class _Tie(Exception):
    """Internal: a tie, handled by ``on_tie``."""


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRecord(f"{where}: {what} is {value!r}, not a number")
    if not math.isfinite(value):
        raise BadRecord(f"{where}: {what} is {value!r}, not a finite number")
    return float(value)


def _soft_label(obj: dict[str, Any], where: str) -> float | None:
    if obj.get("p") is None:
        return None
    p = _number(obj["p"], "p", where)
    if 0.0 <= p < MIN_SOFT_LABEL:
        raise BadRecord(
            f"{where}: p={p} < 0.5 says rejected beats chosen; swap chosen and "
            f"rejected and use p={1 - p:g} (p = P(chosen beats rejected), in "
            "[0.5, 1])"
        )
    if not MIN_SOFT_LABEL <= p <= 1.0:
        raise BadRecord(
            f"{where}: p={p} is outside [0.5, 1]; p is the probability that chosen beats rejected"
        )
    return p


def _pairwise(obj: dict[str, Any], where: str) -> PairwiseRecord:
    hint = "pairwise lines need 'prompt', 'chosen', 'rejected' (and optional 'p')"
    prompt = string_field(obj, "prompt", where, hint)
    chosen = string_field(obj, "chosen", where, hint)
    rejected = string_field(obj, "rejected", where, hint)
    soft_label = _soft_label(obj, where)
    if chosen == rejected:
        raise _Tie(f"{where}: tie: chosen and rejected are the same text")
    return PairwiseRecord(prompt, chosen, rejected, soft_label, where)


def win_matrix_labels(
    win_matrix: Any,
    num_responses: int,
    where: str = "win_matrix",
    tolerance: float = WIN_MATRIX_TOLERANCE,
) -> np.ndarray:
    """Checks a K x K win matrix Psi and returns psi_k = mean_i Psi[k, i] [K].

    Raises ``BadRecord`` unless Psi is K x K with entries in [0, 1] and
    ``|Psi[k,i] + Psi[i,k] - 1| <= tolerance`` (so the diagonal is 0.5).
    """
    k = num_responses
    if (
        not isinstance(win_matrix, list)
        or len(win_matrix) != k
        or any(not isinstance(row, list) or len(row) != k for row in win_matrix)
    ):
        shape = (
            [len(r) if isinstance(r, list) else json_type(r) for r in win_matrix]
            if isinstance(win_matrix, list)
            else json_type(win_matrix)
        )
        raise BadRecord(
            f"{where}: win_matrix must be a {k} x {k} list of rows (one row and "
            f"column per response), got row lengths {shape}"
        )
    psi_KK = np.array(
        [
            [_number(x, f"win_matrix[{r}][{c}]", where) for c, x in enumerate(row)]
            for r, row in enumerate(win_matrix)
        ]
    )
    if np.any((psi_KK < 0) | (psi_KK > 1)):
        r, c = np.argwhere((psi_KK < 0) | (psi_KK > 1))[0]
        raise BadRecord(
            f"{where}: win_matrix[{r}][{c}]={psi_KK[r, c]} is outside [0, 1]; "
            "entries are probabilities P(y_row beats y_col)"
        )
    gap_KK = np.abs(psi_KK + psi_KK.T - 1.0)
    if np.any(gap_KK > tolerance):
        r, c = np.argwhere(gap_KK > tolerance)[0]
        raise BadRecord(
            f"{where}: win_matrix[{r}][{c}] + win_matrix[{c}][{r}] = "
            f"{psi_KK[r, c] + psi_KK[c, r]:g}, not 1 (P(y_{r} beats y_{c}) + "
            f"P(y_{c} beats y_{r}) must be 1; the diagonal must be 0.5)"
        )
    return psi_KK.mean(axis=1)


def _listwise(obj: dict[str, Any], where: str, tolerance: float) -> ListwiseRecord:
    hint = "listwise lines need 'prompt', 'responses' and 'labels' or 'win_matrix'"
    prompt = string_field(obj, "prompt", where, hint)
    if "responses" not in obj:
        raise BadRecord(
            f"{where}: no field 'responses'; this line has fields {sorted(obj)}; {hint}"
        )
    responses = obj["responses"]
    if not isinstance(responses, list):
        raise BadRecord(
            f"{where}: 'responses' must be a list of strings, got a JSON {json_type(responses)}"
        )
    if len(responses) < 2:
        raise BadRecord(f"{where}: {len(responses)} responses; a list needs K >= 2")
    for k, response in enumerate(responses):
        if not isinstance(response, str) or not response.strip():
            raise BadRecord(f"{where}: responses[{k}] is {response!r}, not a non-empty string")
    num = len(responses)
    has_labels, has_matrix = "labels" in obj, "win_matrix" in obj
    if has_labels == has_matrix:
        raise BadRecord(
            f"{where}: give exactly one of 'labels' ([K] in [0, 1]) and "
            f"'win_matrix' ([K, K]); this line has fields {sorted(obj)}"
        )
    if has_matrix:
        labels_K = win_matrix_labels(obj["win_matrix"], num, where, tolerance)
    else:
        labels = obj["labels"]
        if not isinstance(labels, list) or len(labels) != num:
            raise BadRecord(
                f"{where}: 'labels' must be a list of K={num} numbers "
                f"(one per response), got {labels!r}"
            )
        labels_K = np.array([_number(x, f"labels[{k}]", where) for k, x in enumerate(labels)])
        if np.any((labels_K < 0) | (labels_K > 1)):
            raise BadRecord(f"{where}: labels {labels} must lie in [0, 1] (higher is better)")
    if len(set(responses)) < num:
        raise _Tie(f"{where}: tie: two responses are the same text")
    if np.all(labels_K == labels_K[0]):
        raise _Tie(
            f"{where}: tie: all {num} labels are equal ({labels_K[0]:g}), no preference to learn"
        )
    return ListwiseRecord(prompt, list(responses), labels_K, where)


def _samples(obj: dict[str, Any], where: str) -> ListwiseRecord:
    hint = "sample lines need 'prompt', 'responses' (K >= 1 strings) and 'rewards' (K numbers)"
    prompt = string_field(obj, "prompt", where, hint)
    responses, rewards = obj.get("responses"), obj.get("rewards")
    if not isinstance(responses, list) or not responses:
        raise BadRecord(f"{where}: 'responses' must be a non-empty list of strings; {hint}")
    for k, response in enumerate(responses):
        if not isinstance(response, str):
            raise BadRecord(f"{where}: responses[{k}] is {response!r}, not a string")
    if not isinstance(rewards, list) or len(rewards) != len(responses):
        raise BadRecord(
            f"{where}: 'rewards' must be a list of K={len(responses)} numbers, got {rewards!r}"
        )
    rewards_K = np.array([_number(x, f"rewards[{k}]", where) for k, x in enumerate(rewards)])
    return ListwiseRecord(prompt, list(responses), rewards_K, where)


def load_samples(path_or_glob: str, *, on_bad_record: str = "error") -> RecordList:
    """Sampled responses with rewards, one prompt per line, for policy-gradient losses::

      {"prompt": str, "responses": [str] * K, "rewards": [float] * K}

    Unlike preference lists, repeated responses and equal rewards are kept:
    they are the policy's own samples, and their multiplicity matters. The
    rewards are returned as ``ListwiseRecord.labels``.
    """
    return _load(path_or_glob, _samples, on_bad_record, "error")


def _load(path_or_glob: str, parse, on_bad_record: str, on_tie: str) -> RecordList:
    check_mode(on_bad_record)
    if on_tie not in TIE_MODES:
        raise DataError(f"on_tie={on_tie!r}; valid modes: {TIE_MODES}.")
    skips, records = SkipLog(), []
    for path in match_files(path_or_glob):
        objects = read_json_objects(path, on_bad_record=on_bad_record, skips=skips)
        for line_number, obj in objects:
            where = f"{path}:{line_number}"
            try:
                records.append(parse(obj, where))
            except BadRecord as e:
                handle_bad(str(e), on_bad_record, skips)
            except _Tie as e:
                if on_tie == "error":
                    raise DataError(
                        f"{e}; remove or fix the line, or load with "
                        "on_tie='skip' to skip and count ties"
                    ) from None
                skips.add(str(e))
    if not records:
        raise DataError(
            f"{path_or_glob!r} has no usable records: {skips.count} skipped, "
            f"e.g. {skips.examples[:2]}; fix the files."
        )
    return RecordList(records, skips)


def load_pairwise(
    path_or_glob: str, *, on_bad_record: str = "error", on_tie: str = "error"
) -> RecordList:
    """``PairwiseRecord``s of the JSON Lines file(s) (see the module docstring).

    Args:
      path_or_glob: a file or glob; matched files are read in sorted order.
      on_bad_record: "error" (raise DataError naming file:line) or "skip".
      on_tie: what ``chosen == rejected`` does: "error" or "skip" (counted).
    """
    return _load(path_or_glob, _pairwise, on_bad_record, on_tie)


def load_listwise(
    path_or_glob: str,
    *,
    on_bad_record: str = "error",
    on_tie: str = "error",
    tolerance: float = WIN_MATRIX_TOLERANCE,
) -> RecordList:
    """``ListwiseRecord``s of the JSON Lines file(s) (see the module docstring).

    Labels come from ``labels`` or from ``win_matrix`` as
    ``psi_k = mean_i Psi[k, i]``. ``on_tie`` handles identical responses and
    all-equal labels; ``tolerance`` bounds ``|Psi[k,i] + Psi[i,k] - 1|``.
    """
    return _load(
        path_or_glob, lambda obj, where: _listwise(obj, where, tolerance), on_bad_record, on_tie
    )


def response_row(
    prompt_ids: list[int],
    response: str,
    tokenizer: Tokenizer,
    max_len: int,
    overlong: str,
    where: str,
) -> tuple[dict[str, np.ndarray], bool]:
    """``[bos] + prompt_ids + encode(response) + [eos]`` as one padded row of
    ``to_batch``: ``(row, truncated)``.

    ``row`` holds int32/float32 [L] ``inputs``, ``targets``, ``loss_mask``
    (1 exactly on the response tokens and the eos), ``segment_ids`` and
    ``positions``, with L = ``max_len``. A document longer than max_len + 1
    tokens raises ``DataError`` (naming ``where``) with ``overlong="error"``
    and is cut at the end of the response with "truncate" (``truncated``
    True). Reward models score the same rows.
    """
    doc = doc_start(tokenizer) + prompt_ids + tokenizer.encode(response)
    doc.append(tokenizer.eos_id)
    truncated = len(doc) - 1 > max_len
    if truncated and (overlong == "error" or len(prompt_ids) >= max_len):
        raise DataError(
            f"{where}: prompt + response is {len(doc)} tokens with bos/eos, more "
            f"than max_len + 1 = {max_len + 1}; raise max_len"
            + (
                ""
                if len(prompt_ids) >= max_len
                else ", or pass overlong='truncate' (cut the response, flagged in "
                "batch['truncated'])"
            )
            + (
                "; the prompt alone fills max_len, so no response token would be scored"
                if len(prompt_ids) >= max_len
                else ""
            )
        )
    features = token_features(doc, len(prompt_ids), max_len)
    return pad_features(features, seq_len=max_len, pad_id=tokenizer.pad_id), truncated


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def to_batch(
    records: Sequence[PairwiseRecord] | Sequence[ListwiseRecord],
    tokenizer: Tokenizer | str,
    max_len: int,
    *,
    num_responses: int | None = None,
    overlong: str = "error",
) -> dict[str, Any]:
    """Padded numpy arrays of pairwise or listwise records.

    Each (prompt, response) becomes one LM row, like ``make_batch_iterator``'s
    "pad" rows: ``doc = [bos] + prompt + response + [eos]``, ``inputs =
    doc[:-1]``, ``targets = doc[1:]`` padded to L = max_len, ``segment_ids`` 1
    on tokens / 0 on padding, ``positions`` 0.. / 0, and ``loss_mask`` 1 exactly
    on the targets that are response tokens or the eos (so ``sum_t loss_mask *
    log p(targets)`` is log pi(response | prompt)).

    Pairwise records give::

      {"chosen":   {inputs, targets, segment_ids, positions: int32 [B, L],
                    loss_mask: float32 [B, L]},
       "rejected": {same},
       "soft_label": float32 [B]   p, with 1.0 for hard labels (None),
       "truncated":  bool [B]      chosen or rejected row was cut}

    Listwise records give (lists padded to K = num_responses or the largest K)::

      {"responses": {the five features, [B, K, L]},
       "labels":        float32 [B, K]   psi, 0 on padding responses,
       "response_mask": bool [B, K]      True for real responses,
       "truncated":     bool [B, K]}

    Padding responses are all-padding rows (loss_mask 0, segment_ids 0).

    Args:
      records: all ``PairwiseRecord`` or all ``ListwiseRecord``, at least one.
      tokenizer: a Tokenizer or a name for ``make_tokenizer`` ("byte").
      max_len: L, tokens per row.
      num_responses: K for listwise batches (fixed shapes under jit); None =
        the largest K among ``records``.
      overlong: a row with more than max_len + 1 tokens: "error" (DataError
        naming the record) or "truncate" (cut the response end, eos included,
        and flag it in "truncated"). A prompt that alone fills max_len is
        always an error.
    """
    if isinstance(tokenizer, str):
        tokenizer = make_tokenizer(tokenizer)
    if overlong not in OVERLONG_MODES:
        raise DataError(f"overlong={overlong!r}; valid modes: {OVERLONG_MODES}.")
    if not records:
        raise DataError("to_batch got no records; pass at least one.")
    if max_len < 2:
        raise DataError(f"max_len={max_len}; use an integer >= 2.")
    kinds = {type(r) for r in records}
    if kinds == {PairwiseRecord}:
        return _pairwise_batch(records, tokenizer, max_len, overlong)
    if kinds == {ListwiseRecord}:
        return _listwise_batch(records, tokenizer, max_len, overlong, num_responses)
    raise DataError(
        f"to_batch got records of types {sorted(k.__name__ for k in kinds)}; "
        "pass only PairwiseRecord or only ListwiseRecord."
    )


def _where(record: Any, b: int) -> str:
    return record.origin or f"record {b}"


def _pairwise_batch(records, tokenizer, max_len, overlong) -> dict[str, Any]:
    chosen, rejected, truncated_B = [], [], []
    for b, r in enumerate(records):
        prompt_ids = tokenizer.encode(r.prompt)
        row_c, cut_c = response_row(
            prompt_ids, r.chosen, tokenizer, max_len, overlong, f"{_where(r, b)} (chosen)"
        )
        row_r, cut_r = response_row(
            prompt_ids, r.rejected, tokenizer, max_len, overlong, f"{_where(r, b)} (rejected)"
        )
        chosen.append(row_c)
        rejected.append(row_r)
        truncated_B.append(cut_c or cut_r)
    return {
        "chosen": _stack(chosen),
        "rejected": _stack(rejected),
        "soft_label": np.array(
            [1.0 if r.soft_label is None else r.soft_label for r in records], np.float32
        ),
        "truncated": np.array(truncated_B, bool),
    }


def _listwise_batch(records, tokenizer, max_len, overlong, num_responses):
    max_k = max(len(r.responses) for r in records)
    k_pad = max_k if num_responses is None else num_responses
    if k_pad < max_k:
        raise DataError(
            f"num_responses={num_responses} but a record has {max_k} responses; "
            f"use num_responses >= {max_k} or None."
        )
    B = len(records)
    empty = pad_features(
        {
            "inputs": np.zeros(0, np.int32),
            "targets": np.zeros(0, np.int32),
            "loss_mask": np.zeros(0, np.float32),
        },
        seq_len=max_len,
        pad_id=tokenizer.pad_id,
    )
    rows = []
    labels_BK = np.zeros((B, k_pad), np.float32)
    mask_BK = np.zeros((B, k_pad), bool)
    truncated_BK = np.zeros((B, k_pad), bool)
    for b, r in enumerate(records):
        prompt_ids = tokenizer.encode(r.prompt)
        for k in range(k_pad):
            if k < len(r.responses):
                row, truncated_BK[b, k] = response_row(
                    prompt_ids,
                    r.responses[k],
                    tokenizer,
                    max_len,
                    overlong,
                    f"{_where(r, b)} (responses[{k}])",
                )
                labels_BK[b, k], mask_BK[b, k] = r.labels[k], True
            else:
                row = empty
            rows.append(row)
    flat = _stack(rows)  # [B * K, L]
    return {
        "responses": {key: v.reshape(B, k_pad, max_len) for key, v in flat.items()},
        "labels": labels_BK,
        "response_mask": mask_BK,
        "truncated": truncated_BK,
    }


def record_json(record: PairwiseRecord | ListwiseRecord) -> dict[str, Any]:
    """One line of the file formats above (the origin is not written).

    Pairwise: ``{"prompt", "chosen", "rejected"}`` plus ``"p"`` when the record
    has a soft label; listwise: ``{"prompt", "responses", "labels"}``.
    """
    if isinstance(record, PairwiseRecord):
        obj: dict[str, Any] = {
            "prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected
        }  # fmt: skip
        if record.soft_label is not None:
            obj["p"] = float(record.soft_label)
        return obj
    labels = [float(v) for v in np.asarray(record.labels, np.float64)]
    return {"prompt": record.prompt, "responses": list(record.responses), "labels": labels}


def write_records(
    records: Sequence[PairwiseRecord] | Sequence[ListwiseRecord], path: str | os.PathLike
) -> int:
    """Writes records as JSON Lines that ``load_pairwise`` / ``load_listwise`` read back.

    One ``record_json`` object per line (non-ASCII characters escaped, so a
    line break inside a response never splits a record), written atomically;
    parent directories are created. Returns the number of lines written.
    """
    if not records:
        raise ValueError(
            "no records to write: no prompt gave a preference (its samples all scored the same); "
            "sample more responses per prompt, raise the temperature, or use a graded scorer"
        )
    kinds = {type(r) for r in records}
    if kinds not in ({PairwiseRecord}, {ListwiseRecord}):
        raise ValueError(
            f"got records of types {sorted(k.__name__ for k in kinds)}; "
            "write only PairwiseRecord or only ListwiseRecord"
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_jsonl(os.fspath(path), [record_json(r) for r in records])
    return len(records)
