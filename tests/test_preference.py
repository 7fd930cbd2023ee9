"""Tests for preference records: jsonl loaders, validation, ties and to_batch.

Each test doubles as an example of how to load and batch preference data.
"""

import json

import numpy as np
import pytest

from lm_align import data
from lm_align.data import preference

# The LiPO worked example of docs/listwise.md: rows P(y_k beats y_i).
WIN_MATRIX = [
    [0.5, 0.8, 0.6, 0.9],
    [0.2, 0.5, 0.3, 0.7],
    [0.4, 0.7, 0.5, 0.8],
    [0.1, 0.3, 0.2, 0.5],
]
PSI = [0.7, 0.425, 0.6, 0.275]


def write_lines(tmp_path, objects, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text(
        "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects),
        encoding="utf-8",
    )
    return str(path)


PAIR = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
LIST = {"prompt": "Name a colour:", "responses": ["red", "blue", "sky", "7"]}


# ------------------------------------------------------------------ pairwise


def test_load_pairwise(tmp_path):
    path = write_lines(tmp_path, [PAIR, {**PAIR, "p": 0.8, "id": 3}, "", {**PAIR, "p": None}])
    records = data.load_pairwise(path)
    assert records == [
        data.PairwiseRecord("2+2=", "4", "5", None, f"{path}:1"),
        data.PairwiseRecord("2+2=", "4", "5", 0.8, f"{path}:2"),
        data.PairwiseRecord("2+2=", "4", "5", None, f"{path}:4"),  # null p = hard label
    ]
    assert records.skipped == 0


@pytest.mark.parametrize(
    "line, message",
    [
        ({**PAIR, "prompt": " "}, r"field 'prompt' is empty"),
        ({**PAIR, "chosen": ""}, r"field 'chosen' is empty"),
        (
            {"prompt": "q", "chosen": "a", "loser": "b"},
            r"no field 'rejected'; this line has fields \['chosen', 'loser', 'prompt'\]",
        ),
        ({**PAIR, "rejected": ["5"]}, r"field 'rejected' is a JSON array"),
        (
            {**PAIR, "p": 0.3},
            r"p=0.3 < 0.5 says rejected beats chosen; swap chosen and rejected and use p=0.7",
        ),
        ({**PAIR, "p": 1.5}, r"p=1.5 is outside \[0.5, 1\]"),
        ({**PAIR, "p": -0.1}, r"p=-0.1 is outside \[0.5, 1\]"),
        ({**PAIR, "p": "high"}, r"p is 'high', not a number"),
        ('{"prompt": "q", "chosen": "a", "rejected": "b", "p": NaN}', r"p is nan, not a finite"),
        ('{"prompt": "q", "chosen": "a"', r"not valid JSON"),
    ],
)
def test_pairwise_validation_errors_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path, [PAIR, line])
    with pytest.raises(data.DataError, match=rf"prefs\.jsonl:2: {message}"):
        data.load_pairwise(path)


def test_pairwise_ties_error_by_default_and_skip_counts(tmp_path):
    path = write_lines(tmp_path, [PAIR, {**PAIR, "rejected": "4"}, {**PAIR, "p": 0.5}])
    with pytest.raises(
        data.DataError,
        match=r"prefs\.jsonl:2: tie: chosen and rejected are "
        r"the same text.*on_tie='skip'",
    ):
        data.load_pairwise(path)
    records = data.load_pairwise(path, on_tie="skip")
    assert [r.soft_label for r in records] == [None, 0.5]  # p = 0.5 is a valid soft label
    assert records.skipped == 1 and "prefs.jsonl:2: tie" in records.skipped_examples[0]


def test_pairwise_skip_mode_counts_bad_records(tmp_path):
    path = write_lines(tmp_path, [PAIR, {**PAIR, "p": 2}, "[]", {**PAIR, "chosen": "four"}])
    records = data.load_pairwise(path, on_bad_record="skip")
    assert [r.chosen for r in records] == ["4", "four"]
    assert records.skipped == 2
    assert records.skipped_examples[0].startswith(f"{path}:2: p=2.0 is outside")
    with pytest.raises(data.DataError, match="no usable records"):
        data.load_pairwise(write_lines(tmp_path, ["[]"], "bad.jsonl"), on_bad_record="skip")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"empty\.jsonl: the file is empty"):
        data.load_pairwise(str(tmp_path / "empty.jsonl"))


# ------------------------------------------------------------------ listwise


def test_win_matrix_gives_the_alignment_spec_labels(tmp_path):
    np.testing.assert_allclose(preference.win_matrix_labels(WIN_MATRIX, 4), PSI, atol=1e-12)
    path = write_lines(
        tmp_path,
        [
            {**LIST, "win_matrix": WIN_MATRIX},
            {**LIST, "responses": ["a", "b"], "labels": [1, 0.25]},
        ],
    )
    first, second = data.load_listwise(path)
    assert first.responses == LIST["responses"] and first.origin == f"{path}:1"
    np.testing.assert_allclose(first.labels, PSI, atol=1e-12)
    np.testing.assert_array_equal(second.labels, [1.0, 0.25])


BAD_MATRIX = [row[:] for row in WIN_MATRIX]
BAD_MATRIX[0][1] = 0.7  # 0.7 + 0.2 != 1


@pytest.mark.parametrize(
    "line, message",
    [
        ({**LIST, "responses": ["only one"], "labels": [1.0]}, r"1 responses; a list needs K >= 2"),
        ({**LIST, "responses": "red", "labels": [1.0]}, r"'responses' must be a list of strings"),
        (
            {**LIST, "responses": ["a", ""], "labels": [1, 0]},
            r"responses\[1\] is '', not a non-empty",
        ),
        ({**LIST, "prompt": "", "labels": [1, 0, 0, 0]}, r"field 'prompt' is empty"),
        ({**LIST, "labels": [1, 0, 0.5, 1.2]}, r"labels \[1, 0, 0.5, 1.2\] must lie in \[0, 1\]"),
        ({**LIST, "labels": [1, 0]}, r"'labels' must be a list of K=4 numbers"),
        ({**LIST, "labels": [1, 0, True, 0]}, r"labels\[2\] is True, not a number"),
        (LIST, r"give exactly one of 'labels'.*fields \['prompt', 'responses'\]"),
        ({**LIST, "labels": [1, 0, 0, 0], "win_matrix": WIN_MATRIX}, r"give exactly one of"),
        ({**LIST, "win_matrix": WIN_MATRIX[:3]}, r"win_matrix must be a 4 x 4 list of rows"),
        (
            {**LIST, "win_matrix": [r[:3] for r in WIN_MATRIX]},
            r"win_matrix must be .*got row lengths \[3, 3, 3, 3\]",
        ),
        (
            {**LIST, "win_matrix": [[0.5, 1.5, 0, 0]] + WIN_MATRIX[1:]},
            r"win_matrix\[0\]\[1\]=1.5 is outside \[0, 1\]",
        ),
        (
            {**LIST, "win_matrix": BAD_MATRIX},
            r"win_matrix\[0\]\[1\] \+ win_matrix\[1\]\[0\] = 0.9, not 1",
        ),
        (
            {**LIST, "win_matrix": [[1, 0.8, 0.6, 0.9]] + WIN_MATRIX[1:]},
            r"win_matrix\[0\]\[0\] \+ win_matrix\[0\]\[0\] = 2, not 1.*diagonal must be 0.5",
        ),
    ],
)
def test_listwise_validation_errors_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path, [{**LIST, "labels": [1, 0, 0, 0]}, line])
    with pytest.raises(data.DataError, match=rf"prefs\.jsonl:2: {message}"):
        data.load_listwise(path)


def test_listwise_ties_error_by_default_and_skip_counts(tmp_path):
    all_equal = {**LIST, "labels": [0.5] * 4}
    no_preference = {**LIST, "win_matrix": [[0.5] * 4] * 4}
    duplicate = {**LIST, "responses": ["red", "red", "blue", "sky"], "labels": [1, 0, 0, 0]}
    good = {**LIST, "labels": [1, 0.5, 0.5, 0]}  # some equal labels are fine
    for line, message in [
        (all_equal, "all 4 labels are equal"),
        (no_preference, "all 4 labels are equal"),
        (duplicate, "two responses are the same text"),
    ]:
        path = write_lines(tmp_path, [good, line])
        with pytest.raises(data.DataError, match=rf"prefs\.jsonl:2: tie: {message}"):
            data.load_listwise(path)
    path = write_lines(tmp_path, [good, all_equal, duplicate, good])
    records = data.load_listwise(path, on_tie="skip")
    assert len(records) == 2 and records.skipped == 2


def test_bad_loader_modes():
    with pytest.raises(data.DataError, match="on_tie='keep'"):
        data.load_pairwise("x.jsonl", on_tie="keep")
    with pytest.raises(data.DataError, match="on_bad_record='warn'"):
        data.load_listwise("x.jsonl", on_bad_record="warn")


# ------------------------------------------------------------------ to_batch


def test_to_batch_pairwise_shapes_and_response_masks():
    tok = data.ByteTokenizer()
    records = [
        data.PairwiseRecord("12+7=", "19", "20000", 0.9),
        data.PairwiseRecord("1+1=", "2", "3"),
    ]
    batch = data.to_batch(records, tok, max_len=16)
    for side in ("chosen", "rejected"):
        assert set(batch[side]) == set(data.FEATURE_DTYPES)
        for key, dtype in data.FEATURE_DTYPES.items():
            assert batch[side][key].shape == (2, 16) and batch[side][key].dtype == dtype
    np.testing.assert_array_equal(batch["soft_label"], np.array([0.9, 1.0], np.float32))
    np.testing.assert_array_equal(batch["truncated"], [False, False])
    rej = batch["rejected"]
    # Row 0 of rejected: [bos] "12+7=" "20000" [eos]: 11 inputs, loss on "20000" + eos.
    doc = [tok.bos_id] + tok.encode("12+7=20000") + [tok.eos_id]
    np.testing.assert_array_equal(rej["inputs"][0, :11], doc[:-1])
    np.testing.assert_array_equal(rej["targets"][0, :11], doc[1:])
    np.testing.assert_array_equal(rej["loss_mask"][0], [0] * 5 + [1] * 6 + [0] * 5)
    assert tok.decode(rej["targets"][0][rej["loss_mask"][0] > 0], stop_at_eos=False) == "20000"
    np.testing.assert_array_equal(rej["segment_ids"][0], [1] * 11 + [0] * 5)
    np.testing.assert_array_equal(rej["positions"][0], list(range(11)) + [0] * 5)
    assert batch["chosen"]["loss_mask"][1].sum() == 2  # "2" + eos


def test_to_batch_listwise_ragged_lists():
    records = [
        data.ListwiseRecord("q:", ["a", "bb", "ccc"], np.array([1.0, 0.5, 0.0])),
        data.ListwiseRecord("q:", ["x", "y"], np.array([0.2, 0.8])),
    ]
    batch = data.to_batch(records, "byte", max_len=8, num_responses=4)
    for key, dtype in data.FEATURE_DTYPES.items():
        assert batch["responses"][key].shape == (2, 4, 8)
        assert batch["responses"][key].dtype == dtype
    np.testing.assert_array_equal(batch["response_mask"], [[1, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_allclose(batch["labels"], [[1, 0.5, 0, 0], [0.2, 0.8, 0, 0]])
    np.testing.assert_array_equal(
        batch["responses"]["loss_mask"].sum(-1), [[2, 3, 4, 0], [2, 2, 0, 0]]
    )  # response + eos
    np.testing.assert_array_equal(batch["responses"]["segment_ids"][0, 3], 0)  # padding list slot
    assert data.to_batch(records, "byte", max_len=8)["labels"].shape == (2, 3)
    with pytest.raises(data.DataError, match="num_responses=2 but a record has 3"):
        data.to_batch(records, "byte", max_len=8, num_responses=2)


def test_to_batch_overlong_and_bad_input():
    records = [data.PairwiseRecord("prompt ", "a long chosen answer", "no", origin="f.jsonl:9")]
    with pytest.raises(
        data.DataError,
        match=r"f\.jsonl:9 \(chosen\): prompt \+ response is 29 "
        r"tokens.*overlong='truncate'",
    ):
        data.to_batch(records, "byte", max_len=16)
    batch = data.to_batch(records, "byte", max_len=16, overlong="truncate")
    np.testing.assert_array_equal(batch["truncated"], [True])
    assert batch["chosen"]["loss_mask"][0].sum() == 16 - 7  # prompt is 7 tokens
    with pytest.raises(data.DataError, match="the prompt alone fills max_len"):
        data.to_batch(
            [data.PairwiseRecord("p" * 20, "a", "b")], "byte", max_len=16, overlong="truncate"
        )
    with pytest.raises(data.DataError, match="only PairwiseRecord or only ListwiseRecord"):
        data.to_batch(
            records + [data.ListwiseRecord("q", ["a", "b"], np.array([1.0, 0.0]))],
            "byte",
            max_len=16,
        )
    with pytest.raises(data.DataError, match="no records"):
        data.to_batch([], "byte", max_len=16)


# ---------------------------------------------------------------- end to end


def test_end_to_end_sequence_logprobs_from_a_model(tmp_path):
    """Loaded pairs -> to_batch -> the model: per-sequence response log-probs
    lp(y) = sum_t loss_mask * log p(targets), the input of every preference loss."""
    import jax
    import jax.numpy as jnp

    from lm_align.models import TransformerConfig
    from lm_align.models.pure import PureModel

    path = write_lines(
        tmp_path,
        [
            {"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2), "p": 0.9}
            for i in range(4)
        ],
    )
    batch = data.to_batch(data.load_pairwise(path), "byte", max_len=16)
    model = PureModel(TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32))

    @jax.jit
    def sequence_logprob(rows):  # rows: features [B, L] -> [B]
        params = model.init(0)
        logits_BLV = model.apply(
            params,
            rows["inputs"],
            positions_BL=rows["positions"],
            segment_ids_BL=rows["segment_ids"],
        )
        logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
        logp_BL = jnp.take_along_axis(logp_BLV, rows["targets"][..., None], -1)[..., 0]
        return (logp_BL * rows["loss_mask"]).sum(-1), logp_BL

    both = {k: np.concatenate([batch["chosen"][k], batch["rejected"][k]]) for k in batch["chosen"]}
    lp, logp_BL = map(np.asarray, sequence_logprob(both))
    assert lp.shape == (8,) and np.all(np.isfinite(lp)) and np.all(lp < 0)
    # Only response tokens count: lp equals the sum over the masked positions.
    np.testing.assert_allclose(
        lp, [logp_BL[b][both["loss_mask"][b] > 0].sum() for b in range(8)], rtol=1e-5
    )


# ------------------------------------------------------------------ writing and rows


def test_write_records_round_trips_through_the_loaders(tmp_path):
    pairs = [
        data.PairwiseRecord("37+5=", "42", "41", None),
        data.PairwiseRecord("2*3=", "6", "line\nbreak \u00e9 \ufffd", 0.8807970779778823),
        data.PairwiseRecord("1+1=", "2", "11", 1.0),
    ]
    path = tmp_path / "sub" / "pairs.jsonl"
    assert preference.write_records(pairs, path) == 3
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines[0] == '{"prompt": "37+5=", "chosen": "42", "rejected": "41"}'
    assert "\\u00e9" in lines[1]  # escaped: one line per record, whatever the text
    loaded = data.load_pairwise(str(path))
    assert [(r.prompt, r.chosen, r.rejected, r.soft_label) for r in loaded] == [
        (r.prompt, r.chosen, r.rejected, r.soft_label) for r in pairs
    ]
    lists = [
        data.ListwiseRecord("37+5=", ["42", "41", "x"], np.array([1.0, 41 / 84, 0.0])),
        data.ListwiseRecord("2*3=", ["6", "5"], np.array([0.1, 0.7])),
    ]
    preference.write_records(lists, tmp_path / "lists.jsonl")
    assert json.loads((tmp_path / "lists.jsonl").read_text().splitlines()[1]) == {
        "prompt": "2*3=", "responses": ["6", "5"], "labels": [0.1, 0.7]
    }  # fmt: skip
    for got, want in zip(data.load_listwise(str(tmp_path / "lists.jsonl")), lists, strict=True):
        assert (got.prompt, got.responses) == (want.prompt, want.responses)
        np.testing.assert_array_equal(got.labels, want.labels)
    with pytest.raises(ValueError, match="no records"):
        preference.write_records([], tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="only PairwiseRecord or only ListwiseRecord"):
        preference.write_records([pairs[0], lists[0]], tmp_path / "mixed.jsonl")


def test_response_row_by_hand():
    tok = data.ByteTokenizer()
    row, cut = preference.response_row(tok.encode("1+1="), "2", tok, 8, "error", "pair 0")
    doc = [tok.bos_id] + tok.encode("1+1=2") + [tok.eos_id]  # 7 tokens: 6 inputs
    assert not cut
    np.testing.assert_array_equal(row["inputs"], doc[:-1] + [tok.pad_id] * 2)
    np.testing.assert_array_equal(row["targets"][:6], doc[1:])
    np.testing.assert_array_equal(row["loss_mask"], [0, 0, 0, 0, 1, 1, 0, 0])  # "2" and eos
    np.testing.assert_array_equal(row["segment_ids"], [1] * 6 + [0] * 2)
    row, cut = preference.response_row(tok.encode("1+1="), "22222", tok, 8, "truncate", "x")
    assert cut and row["loss_mask"].sum() == 4  # targets 5..8: the response, cut at max_len
    with pytest.raises(data.DataError, match="pair 3: prompt \\+ response is 11 tokens"):
        preference.response_row(tok.encode("1+1="), "22222", tok, 8, "error", "pair 3")
