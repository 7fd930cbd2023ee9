"""tfds sources: a dataset built offline by a builder defined here, read back
as array_record through `tfds:NAME` (no TensorFlow), into a train step.

This file is also the recipe for preparing your own tfds dataset offline:
define a `GeneratorBasedBuilder`, call
`download_and_prepare(file_format="array_record")` into a data_dir, then train
with `--config.data.source=tfds:NAME --config.data.tfds_data_dir=DIR`.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lm_align import config as config_lib
from lm_align import data
from tests.helpers import DEFAULT_EXPERIMENT, REPO, TINY, env_with_devices

NAME = "lm_align_test_corpus"  # tfds's snake_case of the class name below
WORDS = "the cat sat on a mat while dogs ran over green hills".split()


def sentence(i):
    return " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 8)) + f" {i}"


class LmAlignTestCorpus(tfds.core.GeneratorBasedBuilder):
    """200 train and 20 validation sentences, with a title and an int id."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "title": tfds.features.Text(),
                    "id": np.int64,
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data is generated here
        return {
            "train": self._generate_examples(0, 200),
            "validation": self._generate_examples(200, 220),
        }

    def _generate_examples(self, start, stop):
        for i in range(start, stop):
            yield i, {"text": sentence(i), "title": f"doc {i}", "id": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    LmAlignTestCorpus(data_dir=path, file_format="array_record").download_and_prepare()
    return path


def tfds_cfg(data_dir, **fields):
    return {"source": f"tfds:{NAME}", "tfds_data_dir": data_dir, **fields}


def test_reads_prepared_array_record_splits(data_dir):
    train = data.make_source(tfds_cfg(data_dir), "train")
    evals = data.make_source(tfds_cfg(data_dir), "eval")
    assert (len(train), len(evals)) == (200, 20)
    texts = {train[i]["text"] for i in range(len(train))}
    assert texts == {sentence(i) for i in range(200)}  # bytes decoded to str
    assert {evals[i]["text"] for i in range(20)} == {sentence(i) for i in range(200, 220)}
    # A version pin and tfds split slices work too.
    cfg = tfds_cfg(
        data_dir,
        source=f"tfds:{NAME}:1.0.0",
        tfds_train_split="train[:150]",
        tfds_eval_split="train[150:]",
    )
    assert (len(data.make_source(cfg, "train")), len(data.make_source(cfg, "eval"))) == (150, 50)


def test_prompt_completion_fields(data_dir):
    record = data.make_source(tfds_cfg(data_dir, tfds_text_field="title,text"), "eval")[0]
    assert set(record) == {"prompt", "completion"}
    assert record["prompt"] == "doc " + record["completion"].rsplit(" ", 1)[1]


def test_errors_say_what_to_do(data_dir, tmp_path):
    with pytest.raises(data.DataError, match=r"not prepared in data_dir .*download_and_prepare"):
        data.make_source(tfds_cfg(str(tmp_path)), "train")
    with pytest.raises(data.DataError, match=r"found only \['lm_align_test_corpus/1.0.0'\]"):
        data.make_source(tfds_cfg(data_dir, source=f"tfds:{NAME}:9.0.0"), "train")
    with pytest.raises(data.DataError, match=r"its features are .*'title'"):
        data.make_source(tfds_cfg(data_dir, tfds_text_field="body"), "train")
    with pytest.raises(data.DataError, match=r"splits are \['train', 'validation'\].*train\[:1%\]"):
        data.make_source(tfds_cfg(data_dir, tfds_eval_split="test"), "train")


def test_resume_is_exact(data_dir):
    kwargs = {"split": "train", "seq_len": 32, "batch_size": 4, "seed": 3}
    it = data.make_batch_iterator(tfds_cfg(data_dir), **kwargs)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(30)]  # crosses an epoch boundary
    resumed = data.make_batch_iterator(tfds_cfg(data_dir), **kwargs)
    resumed.set_state(state)
    for a, b in zip(want, [next(resumed) for _ in range(30)]):
        for key in data.FEATURE_DTYPES:
            np.testing.assert_array_equal(a[key], b[key])


def test_trains_end_to_end(data_dir, tmp_path):
    from lm_align.train import train

    cfg = config_lib.apply_overrides(
        config_lib.load_config(DEFAULT_EXPERIMENT),
        TINY
        + [
            "train.steps=3",
            "model.n_layers=1",
            f"data.source=tfds:{NAME}",
            f"data.tfds_data_dir={data_dir}",
        ],
    )
    result = train(cfg, str(tmp_path / "run"))
    assert result.final_step == 3
    assert np.isfinite(result.metrics["loss"]) and np.isfinite(result.metrics["eval_loss"])


BENCH_KEYS = {
    "source",
    "tokenizer",
    "packing",
    "grain_workers",
    "batch_size",
    "seq_len",
    "batches",
    "first_batch_s",
    "batches_per_s",
    "examples_per_s",
    "tokens_per_s",
    "total_tokens_per_s",
    "tokens_per_example",
    "padding_fraction",
}


def test_bench_data_only_cli(data_dir):
    # A fresh process without the builder class: tfds reads the prepared files alone.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_align.cli",
            "bench",
            "--data-only",
            "--json",
            "--batches",
            "20",
            "--config",
            DEFAULT_EXPERIMENT,
            f"--config.data.source=tfds:{NAME}",
            f"--config.data.tfds_data_dir={data_dir}",
        ],
        env=env_with_devices(1),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == BENCH_KEYS
    for key in (
        "first_batch_s",
        "batches_per_s",
        "examples_per_s",
        "tokens_per_s",
        "total_tokens_per_s",
        "tokens_per_example",
    ):
        assert report[key] > 0, key
    assert report["source"] == f"tfds:{NAME}" and report["batches"] == 20
