"""Hugging Face tokenizer.json as a tokenizer kind (`hf:PATH`), checked against the ids that
`transformers` produced for the fixtures in ../shared/fixtures/hf (tokenizer_reference.json)."""

import json
import os
import pickle
import shutil

import pytest

from lm_align import data
from tests.helpers import REPO

FIXTURES = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "hf")
MODELS = ("llama", "qwen3", "gemma2", "gpt2")


@pytest.mark.parametrize("name", MODELS)
def test_ids_match_transformers_and_specials_come_from_the_config(name):
    directory = os.path.join(FIXTURES, name)
    ref = json.load(open(os.path.join(directory, "tokenizer_reference.json")))
    for spec in (f"hf:{directory}", f"hf:{directory}/tokenizer.json"):
        tok = data.make_tokenizer(spec)
        for text, ids in zip(ref["texts"], ref["ids"], strict=True):
            assert tok.encode(text) == ids
            assert tok.decode(ids) == text
        # tokenizer_config.json: <bos>, <eos>, <pad>, at ids 2, 1, 0 of the file's vocabulary.
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, 0, 320)


def test_decode_drops_specials_and_stops_at_eos():
    tok = data.make_tokenizer(f"hf:{FIXTURES}/llama")
    hi, there = tok.encode("hi"), tok.encode(" there")
    framed = [tok.bos_id, *hi, tok.pad_id, *there, tok.eos_id, *hi]
    assert tok.decode(framed) == "hi there"
    assert tok.decode(framed, stop_at_eos=False) == "hi therehi"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([320])
    assert pickle.loads(pickle.dumps(tok)).encode("hi") == hi  # grain workers pickle it


def _copy_with_config(tmp_path, config):
    shutil.copy(os.path.join(FIXTURES, "gpt2", "tokenizer.json"), tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return f"hf:{tmp_path}"


def test_special_tokens_as_dicts_no_pad_and_missing_eos(tmp_path):
    # transformers also writes special tokens as {"content": ...}; no pad token: pad = eos.
    spec = _copy_with_config(tmp_path, {"bos_token": {"content": "<bos>"}, "eos_token": "<eos>"})
    tok = data.make_tokenizer(spec)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 1)
    _copy_with_config(tmp_path, {"bos_token": "<bos>"})
    with pytest.raises(data.DataError, match='names no eos_token.*add "eos_token"'):
        data.make_tokenizer(spec)
    _copy_with_config(tmp_path, {"bos_token": "<s>", "eos_token": "<eos>"})
    with pytest.raises(data.DataError, match="bos_token '<s>'.*is not in"):
        data.make_tokenizer(spec)
    with pytest.raises(data.DataError, match="no tokenizer file"):
        data.make_tokenizer(f"hf:{tmp_path}/missing")
    with pytest.raises(data.DataError, match="needs a path"):
        data.make_tokenizer("hf:")


def test_pipeline_rows_are_bos_text_eos_in_the_files_ids():
    tok = data.make_tokenizer(f"hf:{FIXTURES}/qwen3")
    it = data.make_batch_iterator(
        {"source": "arithmetic", "tokenizer": f"hf:{FIXTURES}/qwen3", "packing": "pad"},
        split="eval", seq_len=24, batch_size=2, seed=0,
    )  # fmt: skip
    batch = next(it)
    record = data.make_source({"source": "arithmetic"}, "eval")[0]
    want = [tok.bos_id, *tok.encode(record["prompt"] + record["completion"]), tok.eos_id]
    assert batch["inputs"][0, : len(want) - 1].tolist() == want[:-1]
    assert batch["targets"][0, : len(want) - 1].tolist() == want[1:]


def test_a_tokenizer_without_bos_starts_documents_and_prompts_without_one(tmp_path):
    """Qwen-style tokenizer_config.json (no bos_token): nothing is prepended, eos still ends."""
    from lm_align.data.pipeline import tokenize_record
    from lm_align.sampling import prompt_ids

    shutil.copy(os.path.join(FIXTURES, "qwen3", "tokenizer.json"), tmp_path)
    config = json.load(open(os.path.join(FIXTURES, "qwen3", "tokenizer_config.json")))
    json.dump({**config, "bos_token": None}, open(tmp_path / "tokenizer_config.json", "w"))
    tok = data.make_tokenizer(f"hf:{tmp_path}")
    assert tok.bos_id is None and tok.eos_id == 1
    hi = tok.encode("hi")
    assert prompt_ids(tok, "hi") == hi
    assert prompt_ids(data.make_tokenizer(f"hf:{FIXTURES}/qwen3"), "hi") == [2, *hi]
    doc, n_prompt = tokenize_record({"prompt": "hi", "completion": "hi"}, tok)
    assert doc == [*hi, *hi, tok.eos_id] and n_prompt == len(hi)
