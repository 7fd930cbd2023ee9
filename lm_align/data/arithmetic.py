"""Arithmetic: a built-in, download-free task with an exact-match verifier.

Each record is a prompt ``"37+5="`` and its completion ``"42"``. Operands are
non-negative integers with 1..``num_digits`` digits (the digit count is drawn
uniformly, then the value uniformly among numbers with that many digits, so
short and long operands are equally common). Operators are drawn uniformly
from ``operators`` (a subset of ``"+-*"``); ``*`` binds tighter than ``+``/``-``
(Python precedence) and subtraction may give negative answers::

  >>> task = ArithmeticTask(seed=0, num_digits=2, operators="+-", num_terms=3)
  >>> rec = task.record("train", 0)
  >>> sorted(rec)
  ['completion', 'prompt']
  >>> task.score("12-30+4=", "-14"), task.score("12-30+4=", " -14\\n")
  (1, 1)
  >>> task.score("12-30+4=", "14")
  0

Scorers for sampled responses (registered by name in ``lm_align.data.scorers``):
``arithmetic_exact`` (1.0 / 0.0, the task's verifier) and ``arithmetic_graded``
(partial credit for near misses, for soft labels and list labels).

Determinism: ``record(split, index)`` is a pure function of
``(seed, num_digits, operators, num_terms, eval_fraction, split, index)``. It
draws problems from ``numpy.random.default_rng([seed, split_id, index])`` until
one lands in ``split``.

Train/eval disjointness: a problem belongs to eval iff
``blake2b(prompt) / 2**64 < eval_fraction``. The hash depends only on the
prompt string (not on ``seed`` or Python's salted ``hash()``), so no eval
problem is ever a train problem, for any seed, in any process.

Distinct problems: ``record(split, i)`` draws the digit count first, so short
operands repeat (512 eval records of 2-digit addition hold about 252 distinct
problems; ``0+5=`` appears 16 times). ``distinct_problems(split, count)``
returns each problem of the split at most once, uniformly over problems (every
operand value equally likely), in a seeded order::

  >>> len(ArithmeticTask(num_digits=1).distinct_problems("eval"))   # of 100
  10
  >>> problem_slices("58+67="), problem_slices("12-3*4=")
  (['op=+', 'digits=2', 'carry'], ['op=-*', 'digits=2'])

Corrupted demonstrations: with ``corruption`` set, a fraction
``corruption_rate`` of the eligible *train* problems get a systematically
wrong completion (``CORRUPTIONS``); the eval split, ``solve`` and ``score``
always use the true answer, so the verifier sees the error that the
demonstrations teach::

  >>> task = ArithmeticTask(corruption="dropped_carry", corruption_rate=1.0)
  >>> task.demonstration("58+67="), task.solve("58+67="), task.demonstration("12+34=")
  ('115', '125', '46')

- ``dropped_carry``: addition-only problems with a carry; the completion is
  the sum with its lowest carry dropped (the carry out of the lowest column
  that has one is not added to the next column): ``58+67`` -> ``115``,
  ``95+5`` -> ``90``. Problems without a carry, or with ``-``/``*``, are
  never changed.
- ``off_by_one``: every problem is eligible; the completion is the answer + 1.

Which problems are corrupted is a pure function of the prompt:
``blake2b(prompt, person="lm_align.corrupt") / 2**64 < corruption_rate``, a
hash independent of the split hash, so raising the rate only adds problems.
"""

import hashlib
import itertools
import re

import numpy as np

from lm_align.data.errors import DataError

SPLIT_IDS = {"train": 0, "eval": 1}
VALID_OPERATORS = "+-*"
_HASH_BYTES = 8  # 64-bit bucket hash.
_MAX_DIGITS = 18  # operands are drawn as int64: 10**18 < 2**63.
_MAX_DRAWS = 10_000  # rejection-sampling budget before declaring a split empty.
# Problem spaces up to this size are enumerated by distinct_problems.
_MAX_ENUMERATED = 100_000
# Systematic errors of the train demonstrations (ArithmeticTask corruption).
CORRUPTIONS = ("none", "dropped_carry", "off_by_one")
_PROMPT_RE = re.compile(r"^\d+([+\-*]\d+)+=$")
_INTEGER_RE = re.compile(r"[+-]?[0-9]+")


def evaluate(operands: list[int], ops: list[str]) -> int:
    """Value of ``o0 op0 o1 op1 ... on`` with ``*`` before ``+``/``-``.

    Multiplications are folded into terms first, then the signed terms summed:
    e.g. ``2+3*4-5 = 2 + 12 - 5 = 9``.
    """
    terms, signs = [operands[0]], [1]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] *= x
        else:
            terms.append(x)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


def parse_prompt(prompt: str) -> tuple[list[int], list[str]]:
    """Splits ``"37+5="`` into operands ``[37, 5]`` and operators ``['+']``."""
    if not _PROMPT_RE.match(prompt):
        raise DataError(
            f"not an arithmetic prompt: {prompt!r}; expected digits joined by "
            f"operators from {VALID_OPERATORS!r} and ending in '=', e.g. '37+5='."
        )
    tokens = re.findall(r"\d+|[+\-*]", prompt[:-1])
    return [int(t) for t in tokens[0::2]], tokens[1::2]


def bucket(prompt: str, person: bytes = b"") -> float:
    """Stable hash in [0, 1): ``blake2b(prompt, 8 bytes, person) / 2**64``.

    ``person=b""`` is the split hash; other values give independent hashes of
    the same prompt (``b"lm_align.corrupt"`` picks corrupted demonstrations).
    """
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=_HASH_BYTES, person=person)
    return int.from_bytes(digest.digest(), "big") / 2.0 ** (8 * _HASH_BYTES)


def lowest_carry(operands: list[int]) -> tuple[int, int] | None:
    """``(column, carry)`` of the lowest column whose digit sum carries, or None.

    Column 0 is the units. Adds the non-negative ``operands`` column by
    column, as by hand: ``s = carry_in + sum of the column's digits``, carry
    out ``s // 10`` (more than 1 with three or more operands).

    >>> lowest_carry([58, 67]), lowest_carry([12, 34]), lowest_carry([50, 70])
    ((0, 1), None, (1, 1))
    """
    carry, column = 0, 0
    while any(x // 10**column for x in operands) or carry:
        s = carry + sum(x // 10**column % 10 for x in operands)
        carry = s // 10
        if carry:
            return column, carry
        column += 1
    return None


def dropped_carry_answer(operands: list[int]) -> int | None:
    """The sum of ``operands`` with its lowest carry dropped, or None without a carry.

    Dropping the carry ``c`` out of column ``i`` removes ``c * 10**(i + 1)``
    from the sum (addition is linear; the later columns carry as they would):

    >>> dropped_carry_answer([58, 67]), dropped_carry_answer([95, 5]), dropped_carry_answer([1, 2])
    (115, 90, None)
    """
    found = lowest_carry(operands)
    if found is None:
        return None
    column, carry = found
    return sum(operands) - carry * 10 ** (column + 1)


def problem_slices(prompt: str) -> list[str]:
    """The evaluation slices ``prompt`` belongs to.

    ``op=OPS`` (the distinct operators, in "+-*" order), ``digits=D`` (the
    longest operand's digit count) and, for addition-only problems,
    ``carry`` or ``no_carry`` (``lowest_carry``).

    >>> problem_slices("7+5="), problem_slices("12+34+1="), problem_slices("3*40-1=")
    (['op=+', 'digits=1', 'carry'], ['op=+', 'digits=2', 'no_carry'], ['op=-*', 'digits=2'])
    """
    operands, ops = parse_prompt(prompt)
    out = ["op=" + "".join(o for o in VALID_OPERATORS if o in ops)]
    out.append(f"digits={max(len(str(x)) for x in operands)}")
    if set(ops) == {"+"}:
        out.append("no_carry" if lowest_carry(operands) is None else "carry")
    return out


def check_corruption(kind: str, rate: float, names=("corruption", "corruption_rate")) -> None:
    """Raises DataError unless ``kind`` is in CORRUPTIONS and ``rate`` in [0, 1].

    ``names`` are the two settings' names in the messages (the data config's
    are ``arithmetic_corruption``, ``arithmetic_corruption_rate``).
    """
    kind_name, rate_name = names
    if kind not in CORRUPTIONS:
        raise DataError(
            f"{kind_name}={kind!r}; use one of {CORRUPTIONS}, e.g. 'dropped_carry' "
            "(see lm_align.data.arithmetic)."
        )
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise DataError(
            f"{rate_name}={rate!r}; use a fraction in [0, 1] of the eligible train "
            "problems to corrupt, e.g. 0.8."
        )
    if kind == "none" and rate > 0:
        raise DataError(
            f"{rate_name}={rate!r} with {kind_name}='none' corrupts nothing; set "
            f"{kind_name} to one of {CORRUPTIONS[1:]} or the rate to 0."
        )


class ArithmeticTask:
    """Index-addressable arithmetic problems with a verifier.

    Args:
      seed: record stream seed (train and eval streams both depend on it).
      num_digits: operands have 1..num_digits digits (1..18).
      operators: characters from "+-*", each drawn with equal probability.
      num_terms: operands per problem (>= 2).
      eval_fraction: fraction of the problem space reserved for eval, in (0, 1).
      corruption: systematic error of the train completions, one of
        CORRUPTIONS ("none" keeps every completion true; see the module doc).
      corruption_rate: fraction of the eligible train problems corrupted, in [0, 1].
    """

    def __init__(
        self,
        seed: int = 0,
        num_digits: int = 2,
        operators: str = "+",
        num_terms: int = 2,
        eval_fraction: float = 0.1,
        corruption: str = "none",
        corruption_rate: float = 0.0,
    ):
        if not 1 <= num_digits <= _MAX_DIGITS:
            raise DataError(f"num_digits={num_digits}; use an integer in [1, {_MAX_DIGITS}].")
        if not operators or set(operators) - set(VALID_OPERATORS):
            raise DataError(
                f"operators={operators!r}; use a non-empty subset of "
                f"{VALID_OPERATORS!r}, e.g. '+-'."
            )
        if num_terms < 2:
            raise DataError(f"num_terms={num_terms}; use an integer >= 2.")
        if not 0.0 < eval_fraction < 1.0:
            raise DataError(f"eval_fraction={eval_fraction}; use a value in (0, 1), e.g. 0.1.")
        if seed < 0:
            raise DataError(f"seed={seed}; use a non-negative integer.")
        check_corruption(corruption, corruption_rate)
        self.seed = int(seed)
        self.num_digits = int(num_digits)
        self.operators = "".join(sorted(set(operators), key=operators.index))
        self.num_terms = int(num_terms)
        self.eval_fraction = float(eval_fraction)
        self.corruption = corruption
        self.corruption_rate = float(corruption_rate)

    def __repr__(self) -> str:
        corrupt = (
            f", corruption={self.corruption!r}, corruption_rate={self.corruption_rate}"
            if self.corruption != "none"
            else ""
        )
        return (
            f"ArithmeticTask(seed={self.seed}, num_digits={self.num_digits}, "
            f"operators={self.operators!r}, num_terms={self.num_terms}, "
            f"eval_fraction={self.eval_fraction}{corrupt})"
        )

    def _draw_operand(self, rng: np.random.Generator) -> int:
        # Scalar draws: ~2us each, 4x faster than one vectorised draw of 5 values.
        digits = int(rng.integers(1, self.num_digits + 1))
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return int(rng.integers(low, 10**digits))

    def _draw_prompt(self, rng: np.random.Generator) -> str:
        parts = [str(self._draw_operand(rng))]
        for _ in range(self.num_terms - 1):
            parts.append(self.operators[int(rng.integers(len(self.operators)))])
            parts.append(str(self._draw_operand(rng)))
        return "".join(parts) + "="

    def in_split(self, prompt: str, split: str) -> bool:
        """True iff ``prompt`` belongs to ``split`` (eval iff bucket < fraction)."""
        return (bucket(prompt) < self.eval_fraction) == (split == "eval")

    def record(self, split: str, index: int) -> dict[str, str]:
        """Problem ``index`` of ``split``: ``{"prompt": "37+5=", "completion": "42"}``."""
        if split not in SPLIT_IDS:
            raise DataError(f"split={split!r}; valid splits: {sorted(SPLIT_IDS)}.")
        if index < 0:
            raise DataError(f"index={index}; use a non-negative integer.")
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], int(index)])
        for _ in range(_MAX_DRAWS):
            prompt = self._draw_prompt(rng)
            if self.in_split(prompt, split):
                return self._record(prompt, split)
        raise DataError(
            f"{self!r} found no {split!r} problem in {_MAX_DRAWS} draws; the "
            "problem space is too small for this eval_fraction. Increase "
            "num_digits/num_terms or move eval_fraction away from 0 or 1."
        )

    def _record(self, prompt: str, split: str) -> dict[str, str]:
        completion = self.demonstration(prompt) if split == "train" else self.solve(prompt)
        return {"prompt": prompt, "completion": completion}

    def corrupted(self, prompt: str) -> bool:
        """Is the train completion of ``prompt`` corrupted (see the module doc)?"""
        if self.corruption == "none" or self.corruption_rate <= 0.0:
            return False
        if self.corruption == "dropped_carry":
            operands, ops = parse_prompt(prompt)
            if set(ops) != {"+"} or lowest_carry(operands) is None:
                return False
        return bucket(prompt, person=b"lm_align.corrupt") < self.corruption_rate

    def demonstration(self, prompt: str) -> str:
        """The train completion of ``prompt``: ``solve(prompt)``, unless ``corrupted``."""
        if not self.corrupted(prompt):
            return self.solve(prompt)
        operands, ops = parse_prompt(prompt)
        if self.corruption == "dropped_carry":
            return str(dropped_carry_answer(operands))
        return str(evaluate(operands, ops) + 1)  # off_by_one

    def problem_space_size(self) -> int:
        """Distinct problems over both splits: ``10**(D T) * len(operators)**(T - 1)``."""
        return 10 ** (self.num_digits * self.num_terms) * len(self.operators) ** (
            self.num_terms - 1
        )

    def distinct_problems(self, split: str = "eval", count: int | None = None) -> list[dict]:
        """Distinct problems of ``split``, each at most once, as records.

        Uniform over problems: every operand value in ``[0, 10**num_digits)``
        and every operator equally likely (unlike ``record``, which draws the
        digit count first). The order is a permutation seeded by ``seed``;
        ``count`` problems are its first ``count`` (all of them when
        ``count`` is None or exceeds the split). Problem spaces of up to
        100,000 problems are enumerated; larger ones are sampled without
        replacement (then ``count`` is required). Train records carry the
        (possibly corrupted) demonstrations, like ``record``.
        """
        if split not in SPLIT_IDS:
            raise DataError(f"split={split!r}; valid splits: {sorted(SPLIT_IDS)}.")
        if count is not None and count < 0:
            raise DataError(f"count={count}; use a non-negative integer or None (all).")
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], 2**32 - 1])
        if self.problem_space_size() <= _MAX_ENUMERATED:
            prompts = [p for p in self._all_prompts() if self.in_split(p, split)]
            order = rng.permutation(len(prompts))[:count]
            return [self._record(prompts[i], split) for i in order]
        if count is None:
            raise DataError(
                f"{self!r} has {self.problem_space_size():.3g} problems, too many to list "
                f"every {split!r} problem; pass count, e.g. count=512."
            )
        seen: dict[str, None] = {}
        for _ in range(_MAX_DRAWS * max(count, 1)):
            if len(seen) == count:
                break
            prompt = self._draw_uniform_prompt(rng)
            if self.in_split(prompt, split):
                seen.setdefault(prompt)
        return [self._record(p, split) for p in seen]

    def _all_prompts(self):
        """Every prompt of the problem space, in lexicographic order of (operands, ops)."""
        values = range(10**self.num_digits)
        for operands in itertools.product(values, repeat=self.num_terms):
            for ops in itertools.product(self.operators, repeat=self.num_terms - 1):
                parts = [str(operands[0])]
                for op, x in zip(ops, operands[1:]):
                    parts += [op, str(x)]
                yield "".join(parts) + "="

    def _draw_uniform_prompt(self, rng: np.random.Generator) -> str:
        parts = [str(int(rng.integers(10**self.num_digits)))]
        for _ in range(self.num_terms - 1):
            parts.append(self.operators[int(rng.integers(len(self.operators)))])
            parts.append(str(int(rng.integers(10**self.num_digits))))
        return "".join(parts) + "="

    @staticmethod
    def solve(prompt: str) -> str:
        """The true completion of ``prompt``: ``str(evaluate(parse_prompt(p)))``."""
        return str(evaluate(*parse_prompt(prompt)))

    @staticmethod
    def score(prompt: str, completion: str) -> int:
        """Exact-match reward: 1 iff ``completion.strip() == solve(prompt)``, else 0.

        The answer depends on the prompt alone, so any task (any seed or
        settings) scores any arithmetic prompt the same.
        """
        return int(completion.strip() == ArithmeticTask.solve(prompt))


def arithmetic_exact(prompt: str, response: str) -> float:
    """``ArithmeticTask.score`` as a float: 1.0 iff ``response.strip()`` is the answer.

    >>> arithmetic_exact("37+5=", " 42\\n"), arithmetic_exact("37+5=", "41")
    (1.0, 0.0)
    """
    return float(ArithmeticTask.score(prompt, response))


def arithmetic_graded(prompt: str, response: str) -> float:
    """Exact answer 1.0; an integer ``pred`` gets partial credit; anything else 0.0.

    With ``truth`` the true answer, a response that is not exactly right
    (``ArithmeticTask.score`` 0) but whose stripped text is an integer scores::

        0.5 * max(0, 1 - |pred - truth| / max(|truth|, 1))

    so near misses rank above far misses, and far misses (off by at least
    ``|truth|``) tie with garbage at 0. Every score lies in [0, 1], so the
    scores can be soft-label scores or list labels directly.

    >>> arithmetic_graded("37+5=", "42"), round(arithmetic_graded("37+5=", "41"), 4)
    (1.0, 0.4881)
    >>> arithmetic_graded("37+5=", "-3"), arithmetic_graded("37+5=", "x")
    (0.0, 0.0)
    """
    if ArithmeticTask.score(prompt, response):
        return 1.0
    text = response.strip()
    if not _INTEGER_RE.fullmatch(text):
        return 0.0
    truth = int(ArithmeticTask.solve(prompt))
    relative_error = abs(int(text) - truth) / max(abs(truth), 1)
    return 0.5 * max(0.0, 1.0 - relative_error)
