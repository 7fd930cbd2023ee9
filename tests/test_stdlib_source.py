"""The `stdlib` source: this interpreter's standard library as a corpus (no download).

Split by file (a hash of the relative path), records are chunks of whole lines
that tile each file, and the corpus trains through the real pipeline and
trainer. Most tests read one package (`stdlib:email/*`, 29 files) to stay fast.
"""

import json
import math
import os

import pytest

from lm_align import data
from lm_align.data import stdlib_source as S

EMAIL = {"source": "stdlib:email/*"}


def _read(path):
    with open(os.path.join(S.stdlib_dir(), path), encoding="utf-8") as f:
        return f.read()


def test_split_is_by_file_disjoint_and_covers_every_file():
    train, ev = (data.make_source(EMAIL, split) for split in ("train", "eval"))
    every = S.list_files(S.stdlib_dir(), "email/*")
    assert set(train.paths()).isdisjoint(ev.paths())
    assert sorted(train.paths() + ev.paths()) == every and len(every) == 29
    # eval holds exactly the files whose path hash is below the fraction
    assert ev.paths() == [p for p in every if S.eval_score(p) < 0.05] and ev.paths()
    # and every record of a split comes from that split's files (empty files have none)
    for src in (train, ev):
        nonempty = {p for p in src.paths() if _read(p)}
        assert {src.origin(i).split(":")[1] for i in range(len(src))} == nonempty


def test_split_is_deterministic_and_does_not_depend_on_the_other_files():
    # sha256 of the relative path, pinned: the same on every machine and process
    assert 0.23117 < S.eval_score("json/decoder.py") < 0.23118
    assert S.split_of("json/decoder.py", 0.24) == "eval"
    assert S.split_of("json/decoder.py", 0.23) == "train"
    # a file's split is the same whatever the pattern selects around it
    whole = data.make_source({"source": "stdlib"}, "eval").paths()
    assert [p for p in whole if p.startswith("email/")] == data.make_source(EMAIL, "eval").paths()
    # a larger eval fraction only moves files from train to eval
    bigger = data.make_source({**EMAIL, "stdlib_eval_fraction": 0.5}, "eval").paths()
    assert set(data.make_source(EMAIL, "eval").paths()) < set(bigger)


def test_records_are_the_files_text_in_chunks_of_whole_lines():
    src = data.make_source({**EMAIL, "seq_len": 128}, "train")
    by_file = {}
    for i in range(len(src)):
        text = src[i]["text"]
        _, path, line = src.origin(i).split(":")
        assert len(text.encode("utf-8")) <= 127
        if path not in by_file:
            assert line == "1"
        by_file.setdefault(path, []).append(text)
    # the chunks of a file, in order, are exactly the file on disk
    for path, chunks in by_file.items():
        assert "".join(chunks) == _read(path)
    assert any('"""' in c or "def " in c for c in by_file["email/charset.py"])
    # chunks end at line ends, except where one line is longer than a chunk
    cut = sum(not c.endswith("\n") for chunks in by_file.values() for c in chunks[:-1])
    assert cut < 0.01 * len(src)


def test_chunk_spans_cut_long_lines_at_character_boundaries():
    text = "ab\n" + "é" * 10 + "\nxyz"  # a 20-byte line
    spans = S.chunk_spans(text, 8)
    chunks = [text[s:e] for s, e, _ in spans]
    assert "".join(chunks) == text
    assert all(len(c.encode("utf-8")) <= 8 for c in chunks)
    assert chunks[0] == "ab\n" and [line for _, _, line in spans] == [1, 2, 2, 2, 3]
    assert S.chunk_spans(text, 0) == [(0, len(text), 1)] and S.chunk_spans("", 8) == []


def test_tests_are_excluded_unless_asked_for():
    without = S.list_files(S.stdlib_dir(), "unittest/*")
    with_tests = S.list_files(S.stdlib_dir(), "unittest/*", include_tests=True)
    assert not any(S.is_test_path(p) for p in without)
    assert "unittest/test/test_case.py" in with_tests and set(without) < set(with_tests)
    assert not any(p.startswith(("site-packages/", "dist-packages/")) for p in with_tests)


def test_config_fields_are_checked():
    with pytest.raises(data.DataError, match="stdlib_eval_fraction"):
        data.config.check({"source": "stdlib", "stdlib_eval_fraction": 1.0})
    with pytest.raises(data.DataError, match="stdlib_chunk_bytes"):
        data.config.check({"source": "stdlib", "stdlib_chunk_bytes": -1})
    with pytest.raises(data.DataError, match="stdlib_include_tests"):
        data.config.check({"source": "stdlib", "stdlib_include_tests": "yes"})
    with pytest.raises(data.DataError, match="no readable"):
        data.make_source({"source": "stdlib:no_such_package/*"}, "train")


def test_byte_tokenizer_batches_fit_rows_without_truncation():
    cfg = {**EMAIL, "seq_len": 64}
    it = data.make_batch_iterator(cfg, split="train", seq_len=64, batch_size=4, seed=0)
    batch = next(it)
    assert batch["inputs"].shape == (4, 64) and batch["loss_mask"].sum() > 0.9 * 4 * 64
    text = data.describe_source(cfg)
    assert "records: train" in text and "standard library" in text
    assert "over-long (> 65 tokens with bos/eos): train 0 of" in text
    # tokens with the byte tokenizer are the UTF-8 bytes (+ bos/eos per record)
    stats = S.corpus_stats(cfg)
    src = data.make_source(cfg, "eval")
    assert stats["eval"]["tokens"] == sum(len(_read(p).encode("utf-8")) for p in src.paths())
    assert stats["eval"]["doc_tokens"] == stats["eval"]["tokens"] + 2 * len(src)


def test_sentencepiece_trained_on_the_source_keeps_code_layout(tmp_path):
    src = data.make_source(EMAIL, "train")
    texts = (src[i]["text"] for i in range(0, len(src), 3))
    # identity normalization and a "\n" piece: whitespace is not collapsed
    tok = data.train_sentencepiece(
        texts,
        str(tmp_path / "sp"),
        600,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        byte_fallback=True,
    )
    for i in range(0, len(src), 101):
        assert tok.decode(tok.encode(src[i]["text"])) == src[i]["text"]
    stats = S.corpus_stats(EMAIL, tok)
    assert 0 < stats["train"]["tokens"] < stats["train"]["bytes"]


def test_tiny_training_run_on_the_stdlib(tmp_path):
    """The stdlib source into the real trainer: a few steps, finite train and eval losses."""
    from lm_align import config as config_lib
    from lm_align.train import train
    from tests.helpers import DEFAULT_EXPERIMENT, TINY, losses

    cfg = config_lib.apply_overrides(
        config_lib.load_config(DEFAULT_EXPERIMENT),
        TINY
        + [
            "train.steps=3",
            "train.eval_every=3",
            "optimizer.warmup_steps=1",
            "data.source=stdlib:email/*",
        ],
    )
    result = train(cfg, str(tmp_path))
    assert result.final_step == 3
    got = losses(tmp_path)
    assert sorted(got) == [1, 2, 3] and all(math.isfinite(v) for v in got.values())
    assert math.isfinite(result.metrics["eval_loss"])
    with open(tmp_path / "final.json") as f:
        assert math.isfinite(json.load(f)["unigram_baseline_loss"])
