"""Tokenizers: SentencePiece behind the ByteTokenizer interface, trained locally
(`train_sentencepiece`, `lm-align tokenizer train`), usable by the trainer."""

import os
import pickle
import random
import subprocess
import sys

import pytest
import sentencepiece  # noqa: F401  (the test extra installs it; a missing one fails here)

from lm_align import config as config_lib
from lm_align import data
from tests.helpers import DEFAULT_EXPERIMENT, REPO, env_with_devices

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def corpus(n=300):
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(9)) for _ in range(n)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("sp") / "tok")
    data.train_sentencepiece(corpus(), prefix, 32)
    return prefix + ".model"


def test_sentencepiece_roundtrip_and_special_ids(sp_model):
    tok = data.make_tokenizer(f"sentencepiece:{sp_model}")
    assert isinstance(tok, data.SentencePieceTokenizer)
    # The same special ids as ByteTokenizer: pad 0, bos 1, eos 2.
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 32)
    text = "gamma delta alpha mu"
    ids = tok.encode(text)
    assert ids and all(3 <= i < 32 for i in ids)  # encode adds no special ids
    assert tok.decode(ids) == text
    framed = [tok.bos_id] + ids + [tok.eos_id] + tok.encode("beta") + [tok.pad_id]
    assert tok.decode(framed) == text
    assert tok.decode(framed, stop_at_eos=False) == text + " beta"
    with pytest.raises(ValueError, match="outside the SentencePiece vocabulary"):
        tok.decode([32])
    # grain worker processes receive the tokenizer pickled.
    assert pickle.loads(pickle.dumps(tok)).encode(text) == ids


def test_pipeline_and_config_check_with_sentencepiece(sp_model, tmp_path):
    from lm_align.train.validate import check_config

    (tmp_path / "c.txt").write_text("\n".join(corpus(60)) + "\n")
    spec = f"sentencepiece:{sp_model}"
    it = data.make_batch_iterator(
        {"source": f"text:{tmp_path}/c.txt", "tokenizer": spec},
        split="train",
        seq_len=32,
        batch_size=2,
        seed=0,
    )
    batch = next(it)
    assert batch["inputs"][0, 0] == 1 and batch["inputs"].max() < 32
    base = config_lib.load_config(DEFAULT_EXPERIMENT)
    ok = config_lib.apply_overrides(base, [f"data.tokenizer={spec}", "model.vocab_size=32"])
    assert check_config(ok, num_devices=1).vocab_size == 32
    small = config_lib.apply_overrides(base, [f"data.tokenizer={spec}", "model.vocab_size=30"])
    with pytest.raises(config_lib.ConfigError, match="set model.vocab_size >= 32"):
        check_config(small, num_devices=1)


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(data.DataError, match="does not exist.*lm-align tokenizer train"):
        data.make_tokenizer(f"sentencepiece:{tmp_path}/missing.model")
    with pytest.raises(data.DataError, match="'byte'.*sentencepiece:"):
        data.make_tokenizer("gpt2")
    with pytest.raises(data.DataError, match="Vocabulary size too high.*vocab_size=5000"):
        data.train_sentencepiece(corpus(20), str(tmp_path / "big"), 5000)


def test_cli_tokenizer_train(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(corpus()) + "\n")
    prefix = tmp_path / "out" / "sp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_align.cli",
            "tokenizer",
            "train",
            "--config",
            DEFAULT_EXPERIMENT,
            f"--config.data.source=text:{text}",
            "--vocab-size",
            "30",
            "--output",
            str(prefix),
            "--max-documents",
            "200",
        ],
        env=env_with_devices(1),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    model = f"{prefix}.model"
    assert os.path.isfile(model)
    assert "from 200 documents" in proc.stdout
    assert (
        f"--config.data.tokenizer=sentencepiece:{model} --config.model.vocab_size=30" in proc.stdout
    )
    assert data.make_tokenizer(f"sentencepiece:{model}").vocab_size == 30
