"""Tests for lm_align.data: tokenizer, arithmetic task, text source, pipeline.

Each test doubles as an example of how to call the data package.
"""

import json

import numpy as np
import pytest

from lm_align import data
from lm_align.data import arithmetic

SEQ_LEN = 32
BATCH = 4


def batches(it, n):
    return [next(it) for _ in range(n)]


def documents(batch):
    """Recovers (inputs, targets, loss_mask) per document from a batch."""
    docs = []
    for row in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            docs.append(tuple(batch[k][row, idx] for k in ("inputs", "targets", "loss_mask")))
    return docs


def full_doc(inputs, targets):
    """The token document [bos ... eos] a (inputs, targets) pair came from."""
    return tuple(inputs.tolist()) + (int(targets[-1]),)


# ----------------------------------------------------------------- tokenizer


def test_byte_tokenizer_roundtrip_and_specials():
    tok = data.make_tokenizer("byte")
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
    text = "héllo, wörld: 12+7=19 ∑ 🙂"
    ids = tok.encode(text)
    assert ids[:2] == [ord("h") + 3, 0xC3 + 3]  # multi-byte UTF-8
    assert all(3 <= i < 259 for i in ids)
    assert tok.decode(ids) == text
    with_specials = [tok.bos_id] + ids + [tok.eos_id] + tok.encode("junk") + [0]
    assert tok.decode(with_specials) == text
    assert tok.decode(with_specials, stop_at_eos=False) == text + "junk"
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tok.decode([300])


def test_make_tokenizer_unknown_lists_valid():
    with pytest.raises(ValueError, match="'byte'"):
        data.make_tokenizer("gpt2")


# ---------------------------------------------------------------- arithmetic


def test_arithmetic_is_deterministic_in_seed():
    a = data.ArithmeticTask(seed=0, operators="+-*", num_terms=3)
    b = data.ArithmeticTask(seed=0, operators="+-*", num_terms=3)
    c = data.ArithmeticTask(seed=1, operators="+-*", num_terms=3)
    recs_a = [a.record("train", i) for i in range(200)]
    assert recs_a == [b.record("train", i) for i in range(200)]
    assert recs_a != [c.record("train", i) for i in range(200)]
    # Index-addressable: random access gives the same record as sequential.
    assert a.record("train", 123) == recs_a[123]


def test_arithmetic_splits_are_disjoint():
    task = data.ArithmeticTask(seed=0, num_digits=2, operators="+-")
    train = {task.record("train", i)["prompt"] for i in range(3000)}
    evals = {task.record("eval", i)["prompt"] for i in range(300)}
    assert len(evals) > 100 and not train & evals
    assert all(task.in_split(p, "eval") for p in evals)


@pytest.mark.parametrize("operators", ["+", "-", "+-", "+-*"])
def test_arithmetic_completions_are_correct(operators):
    task = data.ArithmeticTask(seed=3, num_digits=3, operators=operators, num_terms=3)
    for i in range(300):
        rec = task.record("train", i)
        prompt = rec["prompt"]
        assert prompt.endswith("=") and set(prompt[:-1]) <= set("0123456789" + operators)
        operands = arithmetic.parse_prompt(prompt)[0]
        assert all(len(str(x)) <= 3 for x in operands)
        # Python's eval uses the same precedence; prompts are our own digits.
        assert rec["completion"] == str(eval(prompt[:-1]))  # pylint: disable=eval-used
        assert task.score(prompt, rec["completion"]) == 1


def test_arithmetic_negative_answers_occur():
    task = data.ArithmeticTask(operators="-")
    assert any(task.record("train", i)["completion"].startswith("-") for i in range(50))


def test_arithmetic_score():
    task = data.ArithmeticTask()
    assert task.score("37+5=", "42") == 1
    assert task.score("37+5=", "  42\n") == 1
    assert task.score("37+5=", "43") == 0
    assert task.score("37+5=", "4 2") == 0
    assert task.score("37+5=", "") == 0
    assert task.score("2+3*4=", "14") == 1
    assert task.score("5-12=", "-7") == 1
    with pytest.raises(data.DataError, match="not an arithmetic prompt"):
        task.score("37 plus 5", "42")


def test_arithmetic_bad_knobs():
    with pytest.raises(data.DataError, match="operators"):
        data.ArithmeticTask(operators="/")
    with pytest.raises(data.DataError, match="num_terms"):
        data.ArithmeticTask(num_terms=1)


# ---------------------------------------------------------------------- text


def test_text_source_reads_nonempty_lines_in_sorted_file_order(tmp_path):
    (tmp_path / "b.txt").write_text("third\n\n  \nfourth\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first\r\nsecond ü\n", encoding="utf-8")
    src = data.TextFileSource(str(tmp_path / "*.txt"))
    assert [src[i]["text"] for i in range(len(src))] == ["first", "second ü", "third", "fourth"]


def test_text_source_errors(tmp_path):
    with pytest.raises(data.DataError, match="no file matches"):
        data.TextFileSource(str(tmp_path / "missing*.txt"))
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(data.DataError, match="empty.txt has no non-empty lines"):
        data.TextFileSource(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.txt").write_bytes(b"ok line\nalso ok\nlatin1 caf\xe9\n")
    with pytest.raises(data.DataError, match=r"bad.txt:3: line is not valid UTF-8"):
        data.TextFileSource(str(tmp_path / "bad.txt"))


def test_text_splits_every_20th_line_is_eval(tmp_path):
    lines = [f"line {i}" for i in range(45)]
    (tmp_path / "c.txt").write_text("\n".join(lines), encoding="utf-8")
    cfg = {"source": f"text:{tmp_path}/c.txt"}
    evals = data.make_source(cfg, "eval")
    train = data.make_source(cfg, "train")
    assert [evals[i]["text"] for i in range(len(evals))] == ["line 0", "line 20", "line 40"]
    assert [train[i]["text"] for i in range(len(train))] == [
        l for i, l in enumerate(lines) if i % 20
    ]


def test_unknown_source_and_fields():
    with pytest.raises(data.DataError, match="valid sources"):
        data.make_source({"source": "wikipedia"}, "train")
    with pytest.raises(data.DataError, match="unknown data config fields"):
        data.make_batch_iterator({"seqlen": 8}, split="train", seq_len=8, batch_size=2, seed=0)


# ------------------------------------------------------------------ pipeline


def check_batch_shapes(batch):
    assert set(batch) == set(data.FEATURE_DTYPES)
    for key, dtype in data.FEATURE_DTYPES.items():
        assert batch[key].shape == (BATCH, SEQ_LEN) and batch[key].dtype == dtype


def test_document_features_math():
    tok = data.ByteTokenizer()
    rec = {"prompt": "12+7=", "completion": "19"}
    f = data.document_features(rec, tokenizer=tok, seq_len=SEQ_LEN, completion_only_loss=True)
    doc = [1] + tok.encode("12+7=19") + [2]
    np.testing.assert_array_equal(f["inputs"], doc[:-1])
    np.testing.assert_array_equal(f["targets"], doc[1:])
    # Loss on the completion "19" and the eos only.
    np.testing.assert_array_equal(f["loss_mask"], [0] * 5 + [1, 1, 1])
    long = data.document_features(
        {"text": "x" * 100}, tokenizer=tok, seq_len=8, completion_only_loss=False
    )
    assert len(long["inputs"]) == 8 and long["inputs"][0] == tok.bos_id


def test_packing_invariants():
    cfg = {"source": "arithmetic", "arithmetic_operators": "+-*", "arithmetic_digits": 3}
    it = data.make_batch_iterator(cfg, split="train", seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
    # The documents that should appear, in order: the same pipeline in pad mode.
    ref = data.make_batch_iterator(
        {**cfg, "packing": "pad"}, split="train", seq_len=SEQ_LEN, batch_size=BATCH, seed=0
    )
    expected = [full_doc(i, t) for b in batches(ref, 12) for i, t, _ in documents(b)]
    packed = []
    packed_batches = batches(it, 3)
    for batch in packed_batches:
        check_batch_shapes(batch)
        seg, pos = batch["segment_ids"], batch["positions"]
        for row in range(BATCH):
            n = np.count_nonzero(seg[row])
            assert np.all(seg[row, :n] > 0) and np.all(seg[row, n:] == 0)  # pad at end
            assert np.all(np.diff(seg[row, :n]) >= 0)
            assert seg[row, 0] == 1 and np.all(np.diff(seg[row, :n]) <= 1)  # 1, 2, ...
            for s in range(1, seg[row].max() + 1):
                idx = np.flatnonzero(seg[row] == s)
                np.testing.assert_array_equal(pos[row, idx], np.arange(len(idx)))
                # targets are inputs shifted by one, within the document only.
                np.testing.assert_array_equal(
                    batch["targets"][row, idx[:-1]], batch["inputs"][row, idx[1:]]
                )
                assert batch["inputs"][row, idx[0]] == 1 and batch["targets"][row, idx[-1]] == 2
            assert np.all(batch["loss_mask"][row, n:] == 0)
            assert np.all(batch["inputs"][row, n:] == 0) and np.all(pos[row, n:] == 0)
        packed += [full_doc(i, t) for i, t, _ in documents(batch)]
    # Every document exactly once: the packed rows hold the first documents of
    # the stream; within a row they keep stream order (first fit).
    assert sorted(packed) == sorted(expected[: len(packed)])
    assert len(set(packed)) == len(packed)
    stream_index = {doc: i for i, doc in enumerate(expected)}
    for batch in packed_batches:
        for row in range(BATCH):
            row_docs = [
                full_doc(i, t)
                for i, t, _ in documents({k: v[row : row + 1] for k, v in batch.items()})
            ]
            order = [stream_index[d] for d in row_docs]
            assert order == sorted(order)
    assert sum(len(d) - 1 for d in packed) > 0.7 * 3 * BATCH * SEQ_LEN  # dense


def test_pad_mode_masks():
    cfg = {"packing": "pad"}
    batch = next(
        data.make_batch_iterator(cfg, split="train", seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
    )
    check_batch_shapes(batch)
    n = np.count_nonzero(batch["segment_ids"], axis=1)
    valid = np.arange(SEQ_LEN)[None, :] < n[:, None]
    np.testing.assert_array_equal(batch["segment_ids"], valid.astype(np.int32))
    np.testing.assert_array_equal(batch["loss_mask"], valid.astype(np.float32))
    np.testing.assert_array_equal(batch["inputs"][~valid], 0)
    np.testing.assert_array_equal(batch["positions"], np.where(valid, np.arange(SEQ_LEN), 0))


def test_completion_only_loss_masks_prompt():
    tok = data.ByteTokenizer()
    for packing in ("pack", "pad"):
        cfg = {"completion_only_loss": True, "packing": packing}
        batch = next(
            data.make_batch_iterator(cfg, split="train", seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
        )
        for inputs, targets, mask in documents(batch):
            text = tok.decode(inputs)
            prompt_len = text.index("=") + 1
            np.testing.assert_array_equal(mask[:prompt_len], 0)
            np.testing.assert_array_equal(mask[prompt_len:], 1)
            assert tok.decode(targets[mask > 0]) == text[prompt_len:]  # the answer


def test_resume_from_json_state_gives_the_same_batches():
    cfg = {"arithmetic_operators": "+-*"}
    kwargs = dict(split="train", seq_len=SEQ_LEN, batch_size=BATCH, seed=7)
    it = data.make_batch_iterator(cfg, **kwargs)
    batches(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected = batches(it, 5)
    restored = data.make_batch_iterator(cfg, **kwargs)
    restored.set_state(state)
    for want, got in zip(expected, batches(restored, 5)):
        for key in data.FEATURE_DTYPES:
            np.testing.assert_array_equal(want[key], got[key])


def test_resume_across_epochs_of_a_finite_source(tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(f"doc {i}" for i in range(41)), encoding="utf-8")
    cfg = {"source": f"text:{tmp_path}/t.txt"}  # 38 train docs, ~5 per packed row
    kwargs = dict(split="train", seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
    it = data.make_batch_iterator(cfg, **kwargs)
    batches(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = batches(it, 6)  # crosses into later epochs
    restored = data.make_batch_iterator(cfg, **kwargs)
    restored.set_state(state)
    for want, got in zip(expected, batches(restored, 6)):
        for key in data.FEATURE_DTYPES:
            np.testing.assert_array_equal(want[key], got[key])


def test_train_epochs_cover_all_documents_and_reshuffle(tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(f"doc {i}" for i in range(41)), encoding="utf-8")
    cfg = {"source": f"text:{tmp_path}/t.txt", "packing": "pad"}
    it = data.make_batch_iterator(cfg, split="train", seq_len=SEQ_LEN, batch_size=2, seed=0)
    tok = data.ByteTokenizer()
    texts = [tok.decode(i) for b in batches(it, 38) for i, _, _ in documents(b)]
    epoch1, epoch2 = texts[:38], texts[38:]
    assert sorted(epoch1) == sorted(epoch2) == sorted(f"doc {i}" for i in range(41) if i % 20)
    assert epoch1 != epoch2


def shard_iterators(cfg, processes, *, split="train", global_batch=8, seed=3):
    """One iterator per process k of `processes`, each B = global_batch / processes rows."""
    b = global_batch // processes
    common = {"split": split, "seq_len": SEQ_LEN, "batch_size": b, "seed": seed}
    return [
        data.make_batch_iterator(cfg, **common, shard_index=k, shard_count=processes)
        for k in range(processes)
    ]


def global_batches(cfg, *, processes, steps, state=None):
    """The global batches [G, L] that `processes` shards assemble, row block k from
    shard k (the rows `parallel.global_batch` puts on process k's devices), and
    each shard's iterator state afterwards."""
    its = shard_iterators(cfg, processes)
    if state is not None:
        for it in its:
            it.set_state(json.loads(json.dumps(state)))
    out = []
    for _ in range(steps):
        blocks = [next(it) for it in its]
        out.append({key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]})
    return out, [it.get_state() for it in its]


def assert_same_batches(want, got):
    assert len(want) == len(got)
    for a, b in zip(want, got):
        for key in data.FEATURE_DTYPES:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_global_batches_do_not_depend_on_the_process_count(tmp_path, packing):
    """1, 2 or 4 processes assemble the same global batches, row for row, and save
    the same iterator state, which resumes any process count."""
    # A finite source with over-long lines (skipped): epochs and skips are global too.
    lines = [f"doc {i} " + "x" * (i % 7) * (9 if i % 11 == 0 else 1) for i in range(60)]
    (tmp_path / "t.txt").write_text("\n".join(lines), encoding="utf-8")
    for cfg in (
        {"packing": packing, "arithmetic_operators": "+-*"},
        {"packing": packing, "source": f"text:{tmp_path}/t.txt", "overlong": "skip"},
    ):
        one, (state,) = global_batches(cfg, processes=1, steps=6)
        for processes in (2, 4):
            got, states = global_batches(cfg, processes=processes, steps=6)
            assert_same_batches(one, got)
            assert states == [state] * processes  # one global position
        assert any(np.any(b["segment_ids"] == 0) for b in one)  # padding somewhere
        # Resume: 3 steps on 2 processes, then 1 or 4 processes from their state.
        _, states = global_batches(cfg, processes=2, steps=3)
        for processes in (1, 4):
            resumed, _ = global_batches(cfg, processes=processes, steps=3, state=states[0])
            assert_same_batches(one[3:], resumed)


def test_global_eval_batches_do_not_depend_on_the_process_count():
    """The eval split: read once, the same global batches and count on every process;
    the last global batch is padded (10 examples in batches of 8)."""
    for packing in ("pack", "pad"):
        cfg = {"eval_examples": 10, "packing": packing}
        one = list(
            data.make_batch_iterator(cfg, split="eval", seq_len=SEQ_LEN, batch_size=8, seed=0)
        )
        assert len(one) == (2 if packing == "pad" else 1)
        for processes in (2, 4):
            its = shard_iterators(cfg, processes, split="eval", seed=0)
            per_process = [list(it) for it in its]
            assert {len(batches) for batches in per_process} == {len(one)}
            got = [
                {key: np.concatenate([b[key] for b in blocks]) for key in data.FEATURE_DTYPES}
                for blocks in zip(*per_process)
            ]
            assert_same_batches(one, got)
        # The last global batch is padded: 10 = 8 + 2 rows (pad), 10 documents in
        # fewer than 8 rows (pack).
        np.testing.assert_array_equal(one[-1]["segment_ids"][2 if packing == "pad" else 4 :], 0)


def test_iterator_state_format_and_older_states():
    cfg = {"packing": "pad"}
    kwargs = {"split": "train", "seq_len": SEQ_LEN, "batch_size": 2, "seed": 0}
    it = data.make_batch_iterator(cfg, **kwargs)
    batches(it, 3)
    state = it.get_state()
    assert state == {"version": 1, "grain": {"next_index": 6}}  # 3 steps x 2 rows
    expected = batches(it, 2)
    # A state of the earlier per-process pipeline (the grain state alone) resumes
    # a single process, where the two pipelines coincide ...
    single = data.make_batch_iterator(cfg, **kwargs)
    single.set_state(state["grain"])
    assert_same_batches(expected, batches(single, 2))
    # ... but not several, whose position it does not give.
    shard = data.make_batch_iterator(cfg, **{**kwargs, "shard_index": 1, "shard_count": 2})
    with pytest.raises(data.DataError, match="no 'version'"):
        shard.set_state(state["grain"])
    with pytest.raises(data.DataError, match="version 1"):
        shard.set_state({"version": 2, "grain": state["grain"]})


def test_eval_split_is_finite_ordered_and_padded():
    cfg = {"eval_examples": 10, "packing": "pad"}
    it = data.make_batch_iterator(cfg, split="eval", seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
    got = list(it)
    assert len(got) == 3  # 10 examples, batch 4: the last batch has 2 padding rows
    for batch in got:
        check_batch_shapes(batch)
    np.testing.assert_array_equal(got[-1]["loss_mask"][2:], 0)
    np.testing.assert_array_equal(got[-1]["segment_ids"][2:], 0)
    tok = data.ByteTokenizer()
    task = data.ArithmeticTask()
    texts = [tok.decode(i) for b in got for i, _, _ in documents(b)]
    assert texts == [
        r["prompt"] + r["completion"] for r in (task.record("eval", i) for i in range(10))
    ]
    # Packed eval: same documents, fewer rows.
    packed = list(
        data.make_batch_iterator(
            {"eval_examples": 10}, split="eval", seq_len=SEQ_LEN, batch_size=BATCH, seed=0
        )
    )
    assert sorted(tok.decode(i) for b in packed for i, _, _ in documents(b)) == sorted(texts)


def test_grain_workers_give_identical_batches_and_resume():
    kwargs = dict(split="train", seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
    single = batches(data.make_batch_iterator({}, **kwargs), 4)
    cfg = {"grain_workers": 2}  # mp_prefetch runs before packing: same batches.
    it = data.make_batch_iterator(cfg, **kwargs)
    try:
        multi = batches(it, 2)
        state = json.loads(json.dumps(it.get_state()))
        multi += batches(it, 2)
    finally:
        it.close()
    # Resumed by process 1 of 2 (with workers too): rows 2..3 of the same batches.
    shard = {"batch_size": BATCH // 2, "shard_index": 1, "shard_count": 2}
    restored = data.make_batch_iterator(cfg, **{**kwargs, **shard})
    try:
        restored.set_state(state)
        resumed = batches(restored, 2)
    finally:
        restored.close()
    second_half = [{k: v[BATCH // 2 :] for k, v in b.items()} for b in single[2:]]
    for want, got in zip(single + second_half, multi + resumed):
        for key in data.FEATURE_DTYPES:
            np.testing.assert_array_equal(want[key], got[key])


def test_configdict_config():
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(data.DEFAULTS))  # every field, defaults
    cfg.packing = "pad"
    batch = next(
        data.make_batch_iterator(cfg, split="train", seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
    )
    check_batch_shapes(batch)
    np.testing.assert_array_equal(batch["segment_ids"].max(axis=1), 1)
