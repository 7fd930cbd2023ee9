"""Tests for the kg_facts source: a seeded knowledge graph, its splits and verifier.

Each test doubles as an example of how to use ``lm_align.data.KnowledgeGraph``.
"""

import json
import math
import os
import re

import numpy as np
import pytest

from lm_align import data
from lm_align.data import kg_facts

SMALL = {"seed": 0, "num_entities": 40, "num_relations": 3, "facts_per_entity": 2}


def test_graph_is_deterministic_in_seed():
    a, b = data.KnowledgeGraph(**SMALL), data.KnowledgeGraph(**SMALL)
    c = data.KnowledgeGraph(**{**SMALL, "seed": 1})
    assert a.entities == b.entities and a.facts == b.facts
    assert a.records("train") == b.records("train")
    assert a.records("eval") == b.records("eval")
    assert a.records("train") != c.records("train")


def test_entities_are_unique_pronounceable_names():
    kg = data.KnowledgeGraph(seed=3, num_entities=500, num_relations=8, facts_per_entity=8)
    assert len(set(kg.entities)) == 500
    # 2-3 consonant-vowel syllables, capitalised: "Bazo", "Tumeli".
    assert all(
        re.fullmatch(r"[BDFGKLMNPRSTVZ][aeiou]([bdfgklmnprstvz][aeiou]){1,2}", n)
        for n in kg.entities
    )


def test_each_subject_relation_has_exactly_one_object():
    kg = data.KnowledgeGraph(**SMALL)
    keys = [(f.subject, f.relation.name) for f in kg.facts]
    assert len(keys) == len(set(keys)) == 40 * 2
    assert all(f.subject != f.object for f in kg.facts)
    assert {f.relation.name for f in kg.facts} <= {"capital", "founder", "mentor"}


def test_splits_statements_train_and_unseen_questions_eval():
    kg = data.KnowledgeGraph(**SMALL, repeats=2, qa_train_fraction=0.25)
    train, evals = kg.records("train"), kg.records("eval")
    statements = [r["text"] for r in train if "text" in r]
    train_qa = [r for r in train if "prompt" in r]
    assert len(statements) == 2 * len(kg.facts)  # every fact, 2 paraphrases
    assert len(train_qa) == round(0.25 * len(kg.facts))
    assert len(train_qa) + len(evals) == len(kg.facts)
    # Eval questions are never train questions ...
    assert not {r["prompt"] for r in train_qa} & {r["prompt"] for r in evals}
    # ... but every eval fact was seen in training as statements (both paraphrases).
    for fact in kg.qa_eval_facts:
        assert kg.statement(fact, 0) in statements and kg.statement(fact, 1) in statements
        assert kg.statement(fact, 0) != kg.statement(fact, 1)
        assert fact.object in kg.statement(fact, 0) and fact.subject in kg.statement(fact, 1)
    rec = evals[0]
    assert rec["prompt"].startswith("Q: ") and rec["prompt"].endswith("? A:")
    assert rec["completion"].startswith(" ")


def test_verifier_and_hallucination_rate_on_hand_made_answers():
    kg = data.KnowledgeGraph(**SMALL)
    evals = kg.records("eval")[:4]
    prompts = [r["prompt"] for r in evals]
    truth = [r["completion"] for r in evals]
    assert [kg.score(p, c) for p, c in zip(prompts, truth)] == [1, 1, 1, 1]
    assert kg.score(prompts[0], truth[0].strip() + "\n") == 1  # whitespace ignored
    wrong = kg.entities[0] if kg.entities[0] != truth[1].strip() else kg.entities[1]
    assert kg.score(prompts[1], " " + wrong) == 0
    assert kg.score(prompts[1], truth[1] + " and more") == 0  # exact match only
    answers = [truth[0], " " + wrong, "", truth[3]]
    assert kg.hallucination_rate(prompts, answers) == pytest.approx(0.5)
    assert kg.hallucination_rate(prompts, truth) == 0.0
    with pytest.raises(data.DataError, match="not a question about a fact"):
        kg.score("Q: What is the capital of Atlantis? A:", "Nowhere")
    with pytest.raises(data.DataError, match="equally many"):
        kg.hallucination_rate(prompts, truth[:2])


def test_kg_facts_exact_scores_a_batch_like_the_graph():
    kg = data.KnowledgeGraph(**SMALL)
    evals = kg.records("eval")[:3]
    prompts = [r["prompt"] for r in evals]
    wrong = next(e for e in kg.entities if e != evals[1]["completion"].strip())
    answers = [evals[0]["completion"], " " + wrong, evals[2]["completion"].strip() + "\n"]
    scores = kg_facts.kg_facts_exact(kg)(prompts, answers)
    assert scores.dtype == np.float64 and scores.tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(data.DataError, match="not a question about a fact"):
        kg_facts.kg_facts_exact(kg)(["Q: Who founded Atlantis? A:"], [" Nobody"])


def test_bad_knobs_are_errors():
    with pytest.raises(data.DataError, match="num_relations"):
        data.KnowledgeGraph(num_relations=len(kg_facts.RELATIONS) + 1)
    with pytest.raises(data.DataError, match="facts_per_entity"):
        data.KnowledgeGraph(num_relations=2, facts_per_entity=3)
    with pytest.raises(data.DataError, match="qa_train_fraction"):
        data.KnowledgeGraph(qa_train_fraction=1.0)
    with pytest.raises(data.DataError, match="kg_qa_train_fraction=1.0"):
        data.config.check({"source": "kg_facts", "kg_qa_train_fraction": 1.0})
    with pytest.raises(data.DataError, match="kg_entities=1"):
        data.config.check({"source": "kg_facts", "kg_entities": 1})
    with pytest.raises(data.DataError, match="takes no argument"):
        data.make_source({"source": "kg_facts:big"}, "train")


def test_source_batches_and_description():
    cfg = {"source": "kg_facts", "kg_entities": 30, "completion_only_loss": True}
    assert len(data.make_source(cfg, "train")) == 30 * 2 + 30  # statements + QA
    assert len(data.make_source(cfg, "eval")) == 30
    it = data.make_batch_iterator(cfg, split="train", seq_len=64, batch_size=4, seed=0)
    batch = next(it)
    assert batch["inputs"].shape == (4, 64) and batch["loss_mask"].sum() > 0
    text = data.describe_source(cfg)
    assert "records: train 90, eval 30" in text and "30 entities" in text


def test_end_to_end_train_steps(tmp_path):
    """kg_facts into the real trainer: a few steps, finite losses in metrics.jsonl."""
    from lm_align import config as config_lib
    from lm_align.train import train
    from tests.helpers import DEFAULT_EXPERIMENT, TINY, losses

    cfg = config_lib.apply_overrides(
        config_lib.load_config(DEFAULT_EXPERIMENT),
        TINY
        + [
            "train.steps=3",
            "optimizer.warmup_steps=1",
            "data.seq_len=64",
            "data.source=kg_facts",
            "data.kg_entities=50",
            "data.kg_repeats=2",
            "data.completion_only_loss=true",
        ],
    )
    result = train(cfg, str(tmp_path))
    assert result.final_step == 3
    got = losses(tmp_path)
    assert sorted(got) == [1, 2, 3] and all(math.isfinite(v) for v in got.values())
    assert os.path.exists(tmp_path / "final.json")
    with open(tmp_path / "final.json") as f:
        assert math.isfinite(json.load(f)["unigram_baseline_loss"])
