"""Knowledge-graph facts: fully controlled training data for hallucination studies.

A seeded synthetic graph of ``num_entities`` entities with pronounceable,
unique names (2-3 consonant-vowel syllables, e.g. "Bazoka") and
``num_relations`` relations. Every entity is the subject of
``facts_per_entity`` facts, each with a different relation, and every
(subject, relation) pair has exactly one object, another entity drawn
uniformly::

  fact (s, r, o) -> statement  "The capital of Bazoka is Tumeli."
                 -> QA record  {"prompt": "Q: What is the capital of Bazoka? A:",
                                "completion": " Tumeli"}

Splits (``records(split)``):

  train: every fact as ``repeats`` statements ``{"text": ...}`` (repeat j uses
         paraphrase template j mod #templates of the relation), plus the QA
         records of a ``qa_train_fraction`` of the facts (so the model learns
         the question format).
  eval:  the QA records of all other facts. Each was seen in training only as
         statements, never as a question: eval measures whether knowledge
         transfers from statements to answers.

Hallucination rate = fraction of wrong answers to questions about facts that
were seen in training (all facts are): ``1 - mean(score)``.

  >>> kg = KnowledgeGraph(seed=0, num_entities=50, num_relations=3,
  ...                     facts_per_entity=2)
  >>> rec = kg.records("eval")[0]
  >>> kg.score(rec["prompt"], rec["completion"])
  1
  >>> kg_facts_exact(kg)([rec["prompt"]] * 2, [rec["completion"], " Nobody"]).tolist()
  [1.0, 0.0]

Determinism: the graph is a pure function of the constructor arguments
(``numpy.random.default_rng([seed, stream])``), independent of process and
Python hash seed.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from lm_align.data import config
from lm_align.data.errors import DataError
from lm_align.data.scorers import Scorer, batched
from lm_align.data.sources import RandomAccessSource, register_source


@dataclasses.dataclass(frozen=True)
class Relation:
    """A relation: statement paraphrase templates and a question template."""

    name: str
    statements: tuple[str, ...]  # each with {s} (subject) and {o} (object)
    question: str  # with {s}


RELATIONS = (
    Relation(
        "capital",
        ("The capital of {s} is {o}.", "{o} is the capital of {s}.", "{s} has its capital in {o}."),
        "What is the capital of {s}?",
    ),
    Relation(
        "founder",
        ("{s} was founded by {o}.", "{o} founded {s}.", "The founder of {s} is {o}."),
        "Who founded {s}?",
    ),
    Relation(
        "mentor",
        ("The mentor of {s} is {o}.", "{o} mentored {s}.", "{s} was mentored by {o}."),
        "Who is the mentor of {s}?",
    ),
    Relation(
        "birthplace",
        ("{s} was born in {o}.", "The birthplace of {s} is {o}.", "{o} is where {s} was born."),
        "Where was {s} born?",
    ),
    Relation(
        "rival",
        (
            "The rival of {s} is {o}.",
            "{o} is the great rival of {s}.",
            "{s} and its rival {o} never agree.",
        ),
        "Who is the rival of {s}?",
    ),
    Relation(
        "language",
        ("People in {s} speak {o}.", "The language of {s} is {o}.", "{o} is spoken in {s}."),
        "What language is spoken in {s}?",
    ),
    Relation(
        "author",
        ("{s} was written by {o}.", "The author of {s} is {o}.", "{o} wrote {s}."),
        "Who wrote {s}?",
    ),
    Relation(
        "currency",
        (
            "The currency of {s} is the {o}.",
            "In {s} people pay with the {o}.",
            "The {o} is the money of {s}.",
        ),
        "What is the currency of {s}?",
    ),
)

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)  # 70
_MIN_SYLLABLES, _MAX_SYLLABLES = 2, 3
MAX_ENTITIES = 100_000  # well below the 70**2 + 70**3 possible names
_NAME_STREAM, _FACT_STREAM, _QA_STREAM = 0, 1, 2  # independent rng streams
QA_PREFIX, QA_SUFFIX = "Q: ", " A:"


@dataclasses.dataclass(frozen=True)
class Fact:
    subject: str
    relation: Relation
    object: str


def entity_names(seed: int, num_entities: int) -> list[str]:
    """``num_entities`` unique capitalised names of 2-3 CV syllables (seeded)."""
    rng = np.random.default_rng([seed, _NAME_STREAM])
    names, seen = [], set()
    while len(names) < num_entities:
        n = int(rng.integers(_MIN_SYLLABLES, _MAX_SYLLABLES + 1))
        name = "".join(_SYLLABLES[i] for i in rng.integers(len(_SYLLABLES), size=n))
        if name not in seen:
            seen.add(name)
            names.append(name.capitalize())
    return names


class KnowledgeGraph:
    """A seeded synthetic knowledge graph, its text records and a verifier.

    Args:
      seed: graph seed (names, facts, QA split).
      num_entities: entities (>= 2, <= MAX_ENTITIES).
      num_relations: relations used, the first ones of ``RELATIONS`` (1..8).
      facts_per_entity: facts per subject, each a distinct relation
        (1..num_relations); so ``num_entities * facts_per_entity`` facts.
      repeats: statements per fact in train (paraphrases cycle), >= 1.
      qa_train_fraction: fraction of facts whose QA record is in train, [0, 1).
    """

    def __init__(
        self,
        seed: int = 0,
        num_entities: int = 200,
        num_relations: int = 4,
        facts_per_entity: int = 2,
        *,
        repeats: int = 1,
        qa_train_fraction: float = 0.5,
    ):
        for name, value, low, high in [
            ("seed", seed, 0, None),
            ("num_entities", num_entities, 2, MAX_ENTITIES),
            ("num_relations", num_relations, 1, len(RELATIONS)),
            ("facts_per_entity", facts_per_entity, 1, num_relations),
            ("repeats", repeats, 1, None),
        ]:
            if (
                not isinstance(value, (int, np.integer))
                or isinstance(value, bool)
                or value < low
                or (high is not None and value > high)
            ):
                bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
                raise DataError(f"kg {name}={value!r}; use an integer {bound}.")
        if not 0.0 <= qa_train_fraction < 1.0:
            raise DataError(
                f"kg qa_train_fraction={qa_train_fraction!r}; use a value in [0, 1) "
                "(1 would leave no questions for eval)."
            )
        self.seed, self.num_entities = int(seed), int(num_entities)
        self.num_relations, self.facts_per_entity = int(num_relations), int(facts_per_entity)
        self.repeats, self.qa_train_fraction = int(repeats), float(qa_train_fraction)
        self.entities = entity_names(self.seed, self.num_entities)
        self.relations = RELATIONS[: self.num_relations]
        self.facts = self._draw_facts()
        order = np.random.default_rng([self.seed, _QA_STREAM]).permutation(len(self.facts))
        num_qa_train = round(self.qa_train_fraction * len(self.facts))
        self.qa_train_facts = [self.facts[i] for i in sorted(order[:num_qa_train])]
        self.qa_eval_facts = [self.facts[i] for i in sorted(order[num_qa_train:])]
        self._answers = {self.question(f): f.object for f in self.facts}
        self._records = {
            "train": [
                {"text": self.statement(f, j)} for f in self.facts for j in range(self.repeats)
            ]
            + [self.qa_record(f) for f in self.qa_train_facts],
            "eval": [self.qa_record(f) for f in self.qa_eval_facts],
        }

    def _draw_facts(self) -> list[Fact]:
        rng = np.random.default_rng([self.seed, _FACT_STREAM])
        facts = []
        for s, subject in enumerate(self.entities):
            relations = sorted(rng.choice(self.num_relations, self.facts_per_entity, replace=False))
            for r in relations:
                o = int(rng.integers(self.num_entities - 1))
                o += o >= s  # any entity but the subject
                facts.append(Fact(subject, self.relations[r], self.entities[o]))
        return facts

    def __repr__(self) -> str:
        return (
            f"KnowledgeGraph(seed={self.seed}, num_entities={self.num_entities}, "
            f"num_relations={self.num_relations}, facts_per_entity="
            f"{self.facts_per_entity}, repeats={self.repeats}, "
            f"qa_train_fraction={self.qa_train_fraction})"
        )

    @staticmethod
    def statement(fact: Fact, paraphrase: int = 0) -> str:
        """Paraphrase ``paraphrase mod #templates`` of the fact as a sentence."""
        templates = fact.relation.statements
        return templates[paraphrase % len(templates)].format(s=fact.subject, o=fact.object)

    @staticmethod
    def question(fact: Fact) -> str:
        """The QA prompt: ``"Q: What is the capital of Bazoka? A:"``."""
        return QA_PREFIX + fact.relation.question.format(s=fact.subject) + QA_SUFFIX

    def qa_record(self, fact: Fact) -> dict[str, str]:
        """``{"prompt": question(fact), "completion": " " + object}``."""
        return {"prompt": self.question(fact), "completion": " " + fact.object}

    def records(self, split: str) -> list[dict[str, str]]:
        """The records of ``split`` ("train" or "eval"); see the module docstring."""
        if split not in self._records:
            raise DataError(f"split={split!r}; valid splits: {sorted(self._records)}.")
        return self._records[split]

    def answer(self, prompt: str) -> str:
        """The true object of the fact ``prompt`` asks about."""
        try:
            return self._answers[prompt.strip()]
        except KeyError:
            raise DataError(
                f"{prompt!r} is not a question about a fact of {self!r}; expected "
                f"e.g. {self.question(self.facts[0])!r}."
            ) from None

    def score(self, prompt: str, completion: str) -> int:
        """Exact match: 1 iff ``completion.strip() == answer(prompt)``, else 0."""
        return int(completion.strip() == self.answer(prompt))

    def hallucination_rate(self, prompts: Sequence[str], completions: Sequence[str]) -> float:
        """Fraction of wrong answers: ``1 - mean_i score(prompts[i], completions[i])``.

        Every prompt must ask about a fact of the graph, and every fact was seen in
        training (as statements), so each wrong answer is a hallucination.
        """
        if len(prompts) != len(completions) or not prompts:
            raise DataError(
                f"got {len(prompts)} prompts and {len(completions)} completions; "
                "pass equally many, at least one."
            )
        scores = [self.score(p, c) for p, c in zip(prompts, completions)]
        return 1.0 - sum(scores) / len(scores)

    def summary(self) -> str:
        """One line: graph size and what each split holds."""
        return (
            f"knowledge graph: {self.num_entities} entities, {self.num_relations} "
            f"relations, {len(self.facts)} facts; train = "
            f"{len(self.facts) * self.repeats} statements ({self.repeats} per fact) "
            f"+ {len(self.qa_train_facts)} QA; eval = "
            f"{len(self.qa_eval_facts)} QA on facts seen only as statements"
        )


class KnowledgeGraphSource:
    """The records of one split of a ``KnowledgeGraph`` (random access)."""

    def __init__(self, graph: KnowledgeGraph, split: str):
        self.graph, self.split = graph, split
        self._records = graph.records(split)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, str]:
        return dict(self._records[index])

    def summary(self) -> str:
        return self.graph.summary()

    def __repr__(self) -> str:
        return f"KnowledgeGraphSource({self.graph!r}, {self.split!r})"


def kg_facts_exact(graph: KnowledgeGraph) -> Scorer:
    """The graph's verifier as a scorer: ``(prompts, responses) -> float64 [N]``,
    1.0 where ``graph.score(prompt, response)`` (exact match with the fact's
    object), else 0.0; a prompt that asks about no fact of the graph is an error.
    """
    return batched(lambda p, r: float(graph.score(p, r)), "kg_facts_exact")


def graph_from_config(data_cfg: Any) -> KnowledgeGraph:
    """The ``KnowledgeGraph`` described by the ``kg_*`` fields of ``data_cfg``."""
    return KnowledgeGraph(
        seed=config.get(data_cfg, "kg_seed"),
        num_entities=config.get(data_cfg, "kg_entities"),
        num_relations=config.get(data_cfg, "kg_relations"),
        facts_per_entity=config.get(data_cfg, "kg_facts_per_entity"),
        repeats=config.get(data_cfg, "kg_repeats"),
        qa_train_fraction=config.get(data_cfg, "kg_qa_train_fraction"),
    )


@register_source("kg_facts")
def _kg_facts(data_cfg: Any, split: str, arg: str) -> RandomAccessSource:
    if arg:
        raise DataError(
            f"source 'kg_facts:{arg}' takes no argument; set the kg_* fields of "
            "the data config instead."
        )
    return KnowledgeGraphSource(graph_from_config(data_cfg), split)
