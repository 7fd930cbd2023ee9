"""seqio sources: tasks registered in a module of your own, with a SentencePiece
vocabulary trained here, read through `seqio:NAME` into a train step.

The module written by the `tasks` fixture is exactly what a user writes
(docs/data.md, "seqio: train on a task of your own"); `seqio_imports` names it.
Importing seqio pulls TensorFlow, so everything here shares one module-scoped
fixture, which imports it (the test extra installs seqio: a missing one fails).
"""

import json
import sys
import textwrap

import numpy as np
import pytest

from lm_align import config as config_lib
from lm_align import data
from lm_align.data import seqio_source
from tests.helpers import DEFAULT_EXPERIMENT, TINY

MODULE = "lm_align_test_tasks"
WORDS = "the cat sat on a mat while dogs ran over green hills".split()


def line(i):
    return " ".join(WORDS[(i * k + k) % len(WORDS)] for k in range(1, 9))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Writes a corpus, trains a SentencePiece model on it, and writes the task
    module; yields the tokenizer spec. Tasks are removed again afterwards."""
    import seqio  # imported here, not at collection: it pulls in TensorFlow

    root = tmp_path_factory.mktemp("seqio")
    for split, lines in (("train", range(120)), ("validation", range(120, 140))):
        (root / f"{split}.txt").write_text("\n".join(line(i) for i in lines) + "\n")
    tok = data.train_sentencepiece((line(i) for i in range(120)), str(root / "sp"), 24)
    (root / f"{MODULE}.py").write_text(
        textwrap.dedent(f'''
      """Registers the test tasks (what `seqio_imports` imports)."""
      import functools
      import seqio
      import tensorflow as tf

      VOCAB = seqio.SentencePieceVocabulary({tok.model_path!r})

      def lines_to_targets(ds):
        return ds.map(lambda text: {{"targets": text}})

      seqio.TaskRegistry.add(
          "lm_align_test_lm",  # plain text: records {{"text": ...}}
          source=seqio.TextLineDataSource({{
              "train": {str(root / "train.txt")!r},
              "validation": {str(root / "validation.txt")!r}}}),
          preprocessors=[lines_to_targets, seqio.preprocessors.tokenize,
                         seqio.preprocessors.append_eos],
          output_features={{"targets": seqio.Feature(VOCAB, add_eos=True)}})

      def qa_dataset(split, shuffle_files):
        del shuffle_files
        n = 40 if split == "train" else 8
        return tf.data.Dataset.from_tensor_slices({{
            "question": [f"the cat {{'sat ' * (i % 3)}}on" for i in range(n)],
            "answer": ["a mat" if i % 2 else "green hills" for i in range(n)]}})

      seqio.TaskRegistry.add(
          "lm_align_test_qa",  # inputs + targets: prompt/completion records
          source=seqio.FunctionDataSource(qa_dataset, splits=["train", "validation"]),
          preprocessors=[
              functools.partial(seqio.preprocessors.rekey,
                                key_map={{"inputs": "question", "targets": "answer"}}),
              seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
          output_features={{"inputs": seqio.Feature(VOCAB, add_eos=False),
                            "targets": seqio.Feature(VOCAB, add_eos=True)}})

      seqio.MixtureRegistry.add("lm_align_test_mix", [("lm_align_test_lm", 1.0)])
  ''')
    )
    sys.path.insert(0, str(root))
    yield f"sentencepiece:{tok.model_path}"
    sys.path.remove(str(root))
    sys.modules.pop(MODULE, None)
    seqio.MixtureRegistry.remove("lm_align_test_mix")
    for name in ("lm_align_test_lm", "lm_align_test_qa"):
        seqio.TaskRegistry.remove(name)


def seqio_cfg(tokenizer, task="lm_align_test_lm", **fields):
    return {"source": f"seqio:{task}", "seqio_imports": MODULE, "tokenizer": tokenizer, **fields}


def test_records_are_the_task_text_and_ids_agree(tasks):
    import seqio

    train = data.make_source(seqio_cfg(tasks), "train")
    assert len(train) == 120 and train[5] == {"text": line(5)}
    assert len(data.make_source(seqio_cfg(tasks), "eval")) == 20
    qa = data.make_source(seqio_cfg(tasks, "lm_align_test_qa"), "train")
    assert qa[1] == {"prompt": "the cat sat on", "completion": "a mat"}
    mix = data.make_source(seqio_cfg(tasks, "lm_align_test_mix", seqio_max_examples=50), "train")
    assert len(mix) == 50  # the first seqio_max_examples examples only
    # lm_align re-tokenises the text with the task's own SentencePiece model:
    # the ids are the task's ids (without the eos seqio appends).
    tok = data.make_tokenizer(tasks)
    task_ds = seqio.get_mixture_or_task("lm_align_test_lm").get_dataset(
        sequence_length=None, split="train", shuffle=False
    )
    for i, example in enumerate(task_ds.as_numpy_iterator()):
        assert tok.encode(train[i]["text"]) == example["targets"][:-1].tolist()


def test_resume_is_exact_and_restart_rebuilds_the_same_records(tasks):
    cfg = seqio_cfg(tasks, "lm_align_test_qa", completion_only_loss=True)
    kwargs = {"split": "train", "seq_len": 32, "batch_size": 4, "seed": 0}
    it = data.make_batch_iterator(cfg, **kwargs)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(8)]
    seqio_source._CACHE.clear()  # what a new process does: materialise again
    resumed = data.make_batch_iterator(cfg, **kwargs)
    resumed.set_state(state)
    for a, b in zip(want, [next(resumed) for _ in range(8)]):
        for key in data.FEATURE_DTYPES:
            np.testing.assert_array_equal(a[key], b[key])


def test_trains_end_to_end(tasks, tmp_path):
    from lm_align.train import train

    vocab_size = data.make_tokenizer(tasks).vocab_size
    cfg = config_lib.apply_overrides(
        config_lib.load_config(DEFAULT_EXPERIMENT),
        TINY
        + [
            "train.steps=3",
            "model.n_layers=1",
            "data.source=seqio:lm_align_test_qa",
            f"data.seqio_imports={MODULE}",
            f"data.tokenizer={tasks}",
            f"model.vocab_size={vocab_size}",
        ],
    )
    result = train(cfg, str(tmp_path / "run"))
    assert result.final_step == 3
    assert np.isfinite(result.metrics["loss"]) and np.isfinite(result.metrics["eval_loss"])


def test_errors_say_what_to_do(tasks):
    with pytest.raises(data.DataError, match=r"close registered names: \['lm_align_test_lm'"):
        data.make_source(seqio_cfg(tasks, "lm_align_test_lmm"), "train")
    with pytest.raises(data.DataError, match=r"--config.data.tokenizer=sentencepiece:.*sp.model"):
        data.make_source(seqio_cfg("byte"), "train")
    with pytest.raises(data.DataError, match=r"splits are \['train', 'validation'\]"):
        data.make_source(seqio_cfg(tasks, seqio_eval_split="test"), "train")
    with pytest.raises(data.DataError, match=r"cannot import 'no_such_tasks'.*PYTHONPATH"):
        data.make_source(seqio_cfg(tasks, seqio_imports="no_such_tasks"), "train")


def test_seqio_not_installed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "seqio", None)  # `import seqio` now fails
    with pytest.raises(data.DataError, match=r'pip install -e "\.\[seqio\]"'):
        data.make_source({"source": "seqio:anything"}, "train")
