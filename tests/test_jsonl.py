"""Tests for the jsonl source and for over-long documents (data.overlong).

Each bad input has one documented behaviour: a DataError naming file:line, or
a counted skip with on_bad_record="skip". Tests double as usage examples.
"""

import json
import math

import numpy as np
import pytest

from lm_align import data

SEQ_LEN = 32


def write_jsonl(path, objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    return str(path)


def all_records(source):
    return [source[i] for i in range(len(source))]


def documents(batch):
    """Decoded text of every document (segment) in a batch."""
    tok = data.ByteTokenizer()
    out = []
    for row in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            out.append(tok.decode(batch["inputs"][row, seg == s]))
    return out


# --------------------------------------------------------------- happy path


def test_text_records_and_every_nth_eval_split(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}", "id": i} for i in range(25)])
    # A byte-order mark at the start and blank lines are ignored.
    (tmp_path / "b.jsonl").write_text('\ufeff{"text": "doc ü 25"}\n\n   \n', encoding="utf-8")
    cfg = {"source": f"jsonl:{tmp_path}/*.jsonl", "text_eval_every": 10}
    train, evals = data.make_source(cfg, "train"), data.make_source(cfg, "eval")
    assert all_records(evals) == [{"text": "doc 0"}, {"text": "doc 10"}, {"text": "doc 20"}]
    assert [r["text"] for r in all_records(train)] == [f"doc {i}" for i in range(25) if i % 10] + [
        "doc ü 25"
    ]
    assert evals.origin(1) == f"{tmp_path}/a.jsonl:11"  # 1-based line numbers
    assert train.origin(len(train) - 1) == f"{tmp_path}/b.jsonl:1"


def test_configurable_fields_and_prompt_completion_records(tmp_path):
    path = write_jsonl(
        tmp_path / "sft.jsonl", [{"q": f"{i}+1=", "a": str(i + 1), "body": "x"} for i in range(30)]
    )
    body = data.make_source({"source": f"jsonl:{path}", "jsonl_text_field": "body"}, "train")
    assert body[0] == {"text": "x"}
    cfg = {
        "source": f"jsonl:{path}",
        "jsonl_prompt_field": "q",
        "jsonl_completion_field": "a",
        "completion_only_loss": True,
        "packing": "pad",
    }
    assert data.make_source(cfg, "eval")[0] == {"prompt": "0+1=", "completion": "1"}
    batch = next(
        data.make_batch_iterator(cfg, split="train", seq_len=SEQ_LEN, batch_size=4, seed=0)
    )
    tok = data.ByteTokenizer()
    for row in range(4):
        text = tok.decode(batch["inputs"][row])
        answer = tok.decode(batch["targets"][row][batch["loss_mask"][row] > 0])
        assert answer == text[text.index("=") + 1 :]  # loss on the completion only
    with pytest.raises(data.DataError, match="set both"):
        data.make_source({"source": f"jsonl:{path}", "jsonl_prompt_field": "q"}, "train")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "content, line, message",
    [
        (b'{"text": "ok"}\n{"text": "unterminated\n', 2, r"not valid JSON \(Unterminated string"),
        (
            b'{"text": "ok"}\n\n["a", "list"]\n',
            3,
            r"expected a JSON object \{\.\.\.\}, got a JSON array",
        ),
        (
            b'{"text": "ok"}\n{"body": "x", "id": 1}\n',
            2,
            r"no field 'text'; this line has fields \['body', 'id'\]; set data.jsonl_text_field",
        ),
        (b'{"text": 42}\n', 1, r"field 'text' is a JSON number \('42'\), not a string"),
        (b'{"text": "ok"}\n{"text": "  "}\n', 2, r"field 'text' is empty"),
        (
            b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
            2,
            r"line is not valid UTF-8 \(invalid continuation byte",
        ),
    ],
)
def test_bad_line_errors_name_file_and_line(tmp_path, content, line, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(data.DataError, match=rf"bad\.jsonl:{line}: {message}"):
        data.JsonlSource(str(tmp_path / "bad.jsonl"))


def test_empty_file_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"empty\.jsonl: the file is empty"):
        data.JsonlSource(str(tmp_path / "empty.jsonl"))
    with pytest.raises(data.DataError, match="no file matches"):
        data.JsonlSource(str(tmp_path / "nothing*.jsonl"))
    with pytest.raises(data.DataError, match="needs a path"):
        data.make_source({"source": "jsonl"}, "train")


def test_skip_mode_counts_and_reports_bad_lines(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(
        b'{"text": "good 0"}\n{oops\n{"text": "good 1"}\n{"body": "x"}\n'
        b'{"text": "caf\xe9"}\n[1]\n{"text": 7}\n{"text": "good 2"}\n'
    )
    (tmp_path / "b.jsonl").write_text("", encoding="utf-8")  # empty file
    pattern = str(tmp_path / "*.jsonl")
    src = data.JsonlSource(pattern, on_bad_record="skip")
    assert [r["text"] for r in all_records(src)] == ["good 0", "good 1", "good 2"]
    assert src.skipped == 6
    assert src.skipped_examples[0].startswith(f"{tmp_path}/a.jsonl:2: not valid JSON")
    assert src.skipped_examples[1].startswith(f"{tmp_path}/a.jsonl:4: no field 'text'")
    assert len(src.skipped_examples) == 5  # the first few; all are counted
    cfg = {"source": f"jsonl:{pattern}", "on_bad_record": "skip", "text_eval_every": 2}
    report = data.describe_source(cfg, seq_len=SEQ_LEN)
    assert "records: train 1, eval 2" in report
    assert "skipped 6 bad records (data.on_bad_record='skip')" in report
    assert "a.jsonl:2: not valid JSON" in report
    # The same files in the default mode: an error at the first bad line.
    with pytest.raises(data.DataError, match=r"a\.jsonl:2: not valid JSON.*on_bad_record='skip'"):
        data.make_source({"source": f"jsonl:{pattern}"}, "train")
    # Nothing usable at all is an error even in skip mode.
    (tmp_path / "c.jsonl").write_text("{oops\n", encoding="utf-8")
    with pytest.raises(data.DataError, match="no usable records: 1 bad lines skipped"):
        data.JsonlSource(str(tmp_path / "c.jsonl"), on_bad_record="skip")


def test_bad_modes_are_config_errors():
    with pytest.raises(data.DataError, match="on_bad_record='ignore'"):
        data.config.check({"on_bad_record": "ignore"})
    with pytest.raises(data.DataError, match="overlong='cut'"):
        data.config.check({"overlong": "cut"})


# ---------------------------------------------------------- over-long documents


@pytest.fixture(name="long_corpus")
def fixture_long_corpus(tmp_path):
    """40 docs, every 10th in eval (36 train, 4 eval); train record 0 (line 2) and
    eval record 2 (line 21) are longer than SEQ_LEN."""
    docs = [f"doc {i}" for i in range(40)]
    docs[1] = "L" * 50  # 52 tokens with bos/eos > SEQ_LEN + 1
    docs[20] = "E" * 40
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": d} for d in docs])
    return {"source": f"jsonl:{path}", "text_eval_every": 10, "packing": "pad"}


def test_overlong_error_names_the_record(long_corpus):
    cfg = {**long_corpus, "overlong": "error"}
    it = data.make_batch_iterator(cfg, split="eval", seq_len=SEQ_LEN, batch_size=2, seed=0)
    with pytest.raises(
        data.DataError,
        match=(
            r"eval record 2 \(.*long\.jsonl:21\) of source .*: document is 42 tokens with "
            r"bos/eos, more than seq_len \+ 1 = 33; raise data\.seq_len"
        ),
    ):
        list(it)


def test_overlong_truncate_is_counted_and_reported(long_corpus):
    cfg = long_corpus  # overlong="truncate", the default
    it = data.make_batch_iterator(cfg, split="train", seq_len=SEQ_LEN, batch_size=4, seed=0)
    texts = [t for _ in range(9) for t in documents(next(it))]  # one epoch: 36 docs
    assert "L" * 31 in texts  # bos + 31 tokens: cut to seq_len, eos lost
    report = data.describe_source(cfg, seq_len=SEQ_LEN)
    assert "over-long (> 33 tokens with bos/eos): train 1 of 36, eval 1 of 4" in report
    assert "truncated to seq_len (data.overlong='truncate')" in report
    assert "train record 0 (" in report and "long.jsonl:2): 52 tokens" in report
    assert (
        "pipeline counters (this process): train: 1 over-long documents truncated "
        "(1 distinct) of 36 read"
    ) in report


def test_overlong_skip_is_counted_deterministic_and_resumable(long_corpus):
    cfg = {**long_corpus, "overlong": "skip"}
    kwargs = {"split": "train", "seq_len": SEQ_LEN, "batch_size": 5, "seed": 0}
    it = data.make_batch_iterator(cfg, **kwargs)
    first = [t for _ in range(7) for t in documents(next(it))]  # 35 = one epoch
    assert sorted(first) == sorted(f"doc {i}" for i in range(40) if i % 10 and i != 1)
    counts = [f for f in data.pipeline.live_featurizers() if f.split == "train"][-1].counts()
    assert counts["overlong"] == 1 and counts["overlong_records"] == 1
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    restored = data.make_batch_iterator(cfg, **kwargs)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in data.FEATURE_DTYPES:
            np.testing.assert_array_equal(want[key], got[key])
    evals = [
        t
        for b in data.make_batch_iterator(cfg, **{**kwargs, "split": "eval"})
        for t in documents(b)
    ]
    assert evals == ["doc 0", "doc 10", "doc 30"]  # eval record 2 ("E" * 40) skipped
    assert "skipped (data.overlong='skip')" in data.describe_source(cfg, seq_len=SEQ_LEN)


def test_overlong_skip_of_everything_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "all_long.jsonl", [{"text": "x" * 40}] * 5)
    cfg = {"source": f"jsonl:{path}", "overlong": "skip"}
    it = data.make_batch_iterator(cfg, split="train", seq_len=SEQ_LEN, batch_size=2, seed=0)
    with pytest.raises(
        data.DataError,
        match=r"every one of the 4 train records .* is longer "
        r"than seq_len=32 tokens",
    ):
        next(it)
    evals = data.make_batch_iterator(cfg, split="eval", seq_len=SEQ_LEN, batch_size=2, seed=0)
    with pytest.raises(data.DataError, match="every one of the 1 eval records"):
        list(evals)


# ------------------------------------------------------------------ end to end


def test_end_to_end_train_steps(tmp_path):
    """A jsonl corpus (with a skipped bad line) into the trainer: finite losses."""
    from lm_align import config as config_lib
    from lm_align.train import train
    from tests.helpers import DEFAULT_EXPERIMENT, TINY, losses

    lines = [json.dumps({"text": f"The {i}th line of a small corpus."}) for i in range(60)]
    lines.insert(7, "{not json")
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = config_lib.apply_overrides(
        config_lib.load_config(DEFAULT_EXPERIMENT),
        TINY
        + [
            "train.steps=3",
            "optimizer.warmup_steps=1",
            f"data.source=jsonl:{tmp_path}/corpus.jsonl",
            "data.on_bad_record=skip",
        ],
    )
    assert "skipped 1 bad records" in data.describe_source(cfg.data)
    train(cfg, str(tmp_path / "run"))
    got = losses(tmp_path / "run")
    assert sorted(got) == [1, 2, 3] and all(math.isfinite(v) for v in got.values())


def test_docs_data_sources_local_md_examples_run(capsys):
    """Every ```python block of docs/data_sources_local.md runs as pasted."""
    import os
    import re

    from tests.helpers import REPO

    with open(os.path.join(REPO, "docs", "data_sources_local.md"), encoding="utf-8") as f:
        blocks = re.findall(r"^```python\n(.*?)^```", f.read(), re.DOTALL | re.MULTILINE)
    assert len(blocks) >= 4
    for index, code in enumerate(blocks):
        exec(
            compile(code, f"docs/data_sources_local.md[python block {index}]", "exec"),  # noqa: S102
            {"__name__": "__docs__"},
        )
    out = capsys.readouterr().out
    assert "[0.7   0.425 0.6   0.275]" in out and "0.5" in out
