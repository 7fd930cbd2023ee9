"""The arithmetic task for alignment studies: distinct eval problems, slices, and
corrupted demonstrations (a systematic error the verifier can see)."""

import math
import os

import pytest

from lm_align import config as config_lib
from lm_align import data
from lm_align.data import arithmetic
from lm_align.data.arithmetic import ArithmeticTask, arithmetic_exact, problem_slices
from lm_align.data.sources import arithmetic_task
from tests.helpers import REPO


def _has_carry(a: int, b: int) -> bool:
    """By hand: some column's two digits sum to 10 or more (the lowest carry has no carry-in)."""
    return any(a // 10**i % 10 + b // 10**i % 10 >= 10 for i in range(19))


def _operands(prompt):
    return arithmetic.parse_prompt(prompt)[0]


# ------------------------------------------------------------------ defaults


def test_default_records_are_the_ones_before_corruption_existed():
    # Generated from the task at the commit before corruption and distinct
    # problems were added: the defaults must reproduce it bit for bit.
    task = ArithmeticTask()
    train = [task.record("train", i) for i in range(6)]
    evals = [task.record("eval", i) for i in range(6)]
    assert [r["prompt"] + r["completion"] for r in train] == [
        "67+34=101", "50+3=53", "6+4=10", "4+96=100", "9+50=59", "96+1=97",
    ]  # fmt: skip
    assert [r["prompt"] + r["completion"] for r in evals] == [
        "9+1=10", "73+91=164", "28+2=30", "0+5=5", "7+7=14", "30+1=31",
    ]  # fmt: skip
    assert data.DEFAULTS["arithmetic_corruption"] == "none"
    assert data.DEFAULTS["arithmetic_corruption_rate"] == 0.0
    assert repr(task) == (
        "ArithmeticTask(seed=0, num_digits=2, operators='+', num_terms=2, eval_fraction=0.1)"
    )


# -------------------------------------------------------------- corruption


def test_dropped_carry_by_hand():
    task = ArithmeticTask(corruption="dropped_carry", corruption_rate=1.0)
    # 58+67: 8+7 = 15, drop its carry: 5+6 = 11 -> 115 (true 125).
    # 95+5: 5+5 = 10, drop: 9+0 = 9 -> 90 (true 100).
    # 99+99: 9+9 = 18, drop: 9+9 = 18 -> 188 (true 198).
    # 50+70: the carry is out of the tens: 0, then 5+7 = 12 without its carry -> 20.
    for prompt, wrong, right in [
        ("58+67=", "115", "125"),
        ("95+5=", "90", "100"),
        ("99+99=", "188", "198"),
        ("50+70=", "20", "120"),
    ]:
        assert task.demonstration(prompt) == wrong and task.solve(prompt) == right
        assert task.score(prompt, wrong) == 0 and arithmetic_exact(prompt, wrong) == 0.0
    # No carry, or not addition: never changed.
    for prompt in ("12+34=", "40+59=", "0+0="):
        assert task.demonstration(prompt) == task.solve(prompt)
    sub = ArithmeticTask(operators="+-", corruption="dropped_carry", corruption_rate=1.0)
    assert sub.demonstration("58-67=") == "-9"


@pytest.mark.parametrize("rate", [0.3, 0.8])
def test_dropped_carry_rate_is_honoured_on_carry_problems_only(rate):
    task = ArithmeticTask(corruption="dropped_carry", corruption_rate=rate)
    records = [task.record("train", i) for i in range(4000)]
    carry = [r for r in records if _has_carry(*_operands(r["prompt"]))]
    plain = [r for r in records if not _has_carry(*_operands(r["prompt"]))]
    assert len(carry) > 1000 and len(plain) > 1000
    # Problems without a carry keep their true answer.
    assert all(r["completion"] == task.solve(r["prompt"]) for r in plain)
    wrong = [r for r in carry if r["completion"] != task.solve(r["prompt"])]
    # Binomial tolerance: 4 standard deviations (the records repeat problems,
    # which only widens the spread a little; 4 sigma leaves room for it).
    sigma = math.sqrt(rate * (1 - rate) / len(carry))
    assert abs(len(wrong) / len(carry) - rate) < 4 * sigma + 0.02
    for r in wrong:
        a, b = _operands(r["prompt"])
        i = min(i for i in range(19) if a // 10**i % 10 + b // 10**i % 10 >= 10)
        assert int(r["completion"]) == a + b - 10 ** (i + 1)  # the lowest carry dropped
        assert arithmetic_exact(r["prompt"], r["completion"]) == 0.0  # the verifier sees it


def test_corruption_is_a_function_of_the_prompt_nested_in_the_rate():
    low = ArithmeticTask(corruption="dropped_carry", corruption_rate=0.3)
    high = ArithmeticTask(seed=5, corruption="dropped_carry", corruption_rate=0.8)
    prompts = [ArithmeticTask().record("train", i)["prompt"] for i in range(2000)]
    low_set = {p for p in prompts if low.corrupted(p)}
    high_set = {p for p in prompts if high.corrupted(p)}
    assert low_set and low_set < high_set  # any seed; a higher rate only adds problems


def test_off_by_one_corrupts_every_kind_of_problem():
    task = ArithmeticTask(operators="+-*", corruption="off_by_one", corruption_rate=1.0)
    for i in range(200):
        r = task.record("train", i)
        assert int(r["completion"]) == int(task.solve(r["prompt"])) + 1
    half = ArithmeticTask(operators="+-*", corruption="off_by_one", corruption_rate=0.5)
    n = 4000
    wrong = sum(
        r["completion"] != half.solve(r["prompt"])
        for r in (half.record("train", i) for i in range(n))
    )
    assert abs(wrong / n - 0.5) < 4 * math.sqrt(0.25 / n) + 0.02


@pytest.mark.parametrize("kind", ["dropped_carry", "off_by_one"])
def test_eval_split_is_never_corrupted(kind):
    task = ArithmeticTask(corruption=kind, corruption_rate=1.0)
    for i in range(500):
        r = task.record("eval", i)
        assert r["completion"] == task.solve(r["prompt"])
    for r in task.distinct_problems("eval"):
        assert r["completion"] == task.solve(r["prompt"])
    # The same problems in train would be corrupted at rate 1.
    assert any(task.corrupted(r["prompt"]) for r in task.distinct_problems("eval"))


def test_bad_corruption_settings_name_the_value_and_the_fix():
    with pytest.raises(data.DataError, match=r"corruption='dropped_cary'.*dropped_carry"):
        ArithmeticTask(corruption="dropped_cary", corruption_rate=0.5)
    with pytest.raises(data.DataError, match=r"corruption_rate=1\.5; use a fraction in \[0, 1\]"):
        ArithmeticTask(corruption="off_by_one", corruption_rate=1.5)
    with pytest.raises(data.DataError, match="corrupts nothing"):
        ArithmeticTask(corruption_rate=0.5)
    with pytest.raises(data.DataError, match="arithmetic_corruption_rate=-0.1"):
        data.config.check(
            {"arithmetic_corruption": "off_by_one", "arithmetic_corruption_rate": -0.1}
        )
    data.config.check({"arithmetic_corruption": "dropped_carry", "arithmetic_corruption_rate": 0.8})
    cfg = config_lib.load_config(os.path.join(REPO, "experiments", "default.py"))
    cfg = config_lib.apply_overrides(cfg, ["data.arithmetic_corruption=carry"])
    from lm_align.train.validate import check_config

    with pytest.raises(config_lib.ConfigError, match=r"arithmetic_corruption='carry'; use one of"):
        check_config(cfg, num_devices=1)


# -------------------------------------------------------- distinct problems


def test_distinct_problems_are_every_eval_problem_once():
    task = ArithmeticTask(num_digits=2)
    by_hand = {
        f"{a}+{b}=" for a in range(100) for b in range(100)
        if arithmetic.bucket(f"{a}+{b}=") < 0.1
    }  # fmt: skip
    problems = task.distinct_problems("eval")
    prompts = [r["prompt"] for r in problems]
    assert len(prompts) == len(set(prompts)) == len(by_hand) and set(prompts) == by_hand
    assert all(r["completion"] == task.solve(r["prompt"]) for r in problems)
    # count takes a prefix of one seeded order; the order is deterministic.
    assert [r["prompt"] for r in task.distinct_problems("eval", count=50)] == prompts[:50]
    assert task.distinct_problems("eval") == problems
    other = ArithmeticTask(num_digits=2, seed=1).distinct_problems("eval")
    assert {r["prompt"] for r in other} == by_hand and other != problems
    # The index-addressed eval split repeats problems; this does not.
    indexed = [task.record("eval", i)["prompt"] for i in range(512)]
    assert len(set(indexed)) < 300


def test_distinct_problems_of_a_large_space_are_sampled_without_repeats():
    task = ArithmeticTask(num_digits=6, operators="+-")
    problems = task.distinct_problems("eval", count=300)
    prompts = [r["prompt"] for r in problems]
    assert len(set(prompts)) == 300 and all(task.in_split(p, "eval") for p in prompts)
    # Uniform over operand values: about 90% of 6-digit-range operands have 6 digits.
    six = sum(len(str(x)) == 6 for p in prompts for x in _operands(p)) / 600
    assert 0.8 < six < 0.97
    assert task.distinct_problems("eval", count=300) == problems
    with pytest.raises(data.DataError, match="pass count"):
        task.distinct_problems("eval")


def test_problem_slices():
    assert problem_slices("58+67=") == ["op=+", "digits=2", "carry"]
    assert problem_slices("5+3=") == ["op=+", "digits=1", "no_carry"]
    assert problem_slices("99+1=") == ["op=+", "digits=2", "carry"]
    assert problem_slices("12-30+4=") == ["op=+-", "digits=2"]
    assert problem_slices("7*8=") == ["op=*", "digits=1"]


def test_the_task_of_a_data_config_reads_every_arithmetic_field():
    cfg = {
        "arithmetic_seed": 3, "arithmetic_digits": 3, "arithmetic_operators": "+-",
        "arithmetic_terms": 3, "arithmetic_eval_fraction": 0.2,
        "arithmetic_corruption": "off_by_one", "arithmetic_corruption_rate": 0.25,
    }  # fmt: skip
    task = arithmetic_task(cfg)
    assert repr(task) == (
        "ArithmeticTask(seed=3, num_digits=3, operators='+-', num_terms=3, eval_fraction=0.2, "
        "corruption='off_by_one', corruption_rate=0.25)"
    )
    assert repr(arithmetic_task({})) == repr(ArithmeticTask())


def test_the_arithmetic_source_carries_the_corruption():
    cfg = {
        "source": "arithmetic",
        "arithmetic_corruption": "dropped_carry",
        "arithmetic_corruption_rate": 1.0,
    }
    train, evals = data.make_source(cfg, "train"), data.make_source(cfg, "eval")
    records = [train[i] for i in range(200)]
    wrong = [r for r in records if r["completion"] != ArithmeticTask.solve(r["prompt"])]
    assert wrong and all(_has_carry(*_operands(r["prompt"])) for r in wrong)
    assert all(evals[i]["completion"] == ArithmeticTask.solve(evals[i]["prompt"]) for i in range(200))
