"""Preference data from samples: scorers, pairing methods, soft labels, lists, the pipeline."""

import math

import numpy as np
import pytest

from lm_align.align.datagen import (
    PreferenceStats,
    build_listwise,
    build_pairwise,
    form_pairs,
    make_preferences,
    soft_label,
)
from lm_align.data import DataError
from lm_align.data.arithmetic import ArithmeticTask, arithmetic_exact, arithmetic_graded
from lm_align.data.preference import (
    PairwiseRecord,
    load_listwise,
    load_pairwise,
    write_records,
)
from lm_align.data.scorers import SCORERS, make_scorer, reference_scorer, score_lists
from lm_align.data.tokenizers import make_tokenizer
from lm_align.models import TransformerConfig
from lm_align.models.pure import PureModel
from lm_align.sampling import sample_texts

# ----------------------------------------------------------------------------
# Verifiers and scorers
# ----------------------------------------------------------------------------


def test_arithmetic_exact_on_worked_cases():
    assert arithmetic_exact("37+5=", "42") == 1.0
    assert arithmetic_exact("37+5=", " 42\n") == 1.0  # surrounding whitespace is ignored
    assert arithmetic_exact("37+5=", "41") == 0.0
    assert arithmetic_exact("37+5=", "x") == 0.0
    assert arithmetic_exact("37+5=", "-3") == 0.0
    assert arithmetic_exact("12-30+4=", "-14") == 1.0  # negative answers


def test_arithmetic_graded_on_worked_cases():
    assert arithmetic_graded("37+5=", "42") == 1.0
    assert arithmetic_graded("37+5=", " 42\n") == 1.0
    # |41 - 42| / 42: 0.5 * (1 - 1/42) = 41/84.
    assert arithmetic_graded("37+5=", "41") == pytest.approx(41 / 84)
    assert arithmetic_graded("37+5=", "x") == 0.0
    # |-3 - 42| / 42 > 1: as bad as garbage.
    assert arithmetic_graded("37+5=", "-3") == 0.0
    # truth 0: the denominator is max(|0|, 1) = 1, so 1 off is already worth 0.
    assert arithmetic_graded("5-5=", "1") == 0.0
    # truth -14: off by 7 is half the magnitude: 0.5 * (1 - 7/14) = 0.25.
    assert arithmetic_graded("12-30+4=", "-7") == pytest.approx(0.25)


def test_graded_ranks_exact_over_near_over_far_over_garbage():
    exact, near, far, garbage = (
        arithmetic_graded("37+5=", r) for r in ("42", "43", "60", "forty-two")
    )
    assert exact > near > far > garbage == 0.0


def test_make_scorer_is_batched_and_names_valid_scorers():
    scorer = make_scorer("arithmetic_graded")
    scores = scorer(["37+5=", "37+5=", "2*3="], ["42", "41", "6"])
    np.testing.assert_allclose(scores, [1.0, 41 / 84, 1.0])
    assert scores.dtype == np.float64
    np.testing.assert_array_equal(
        make_scorer("arithmetic_exact")(["37+5=", "37+5="], ["42", "41"]), [1.0, 0.0]
    )
    with pytest.raises(ValueError, match="arithmetic_exact.*arithmetic_graded"):
        make_scorer("exact")
    assert sorted(SCORERS) == ["arithmetic_exact", "arithmetic_graded"]


def test_arithmetic_exact_is_the_tasks_verifier_on_its_own_records():
    task = ArithmeticTask(seed=3, num_digits=3, operators="+-*", num_terms=3)
    for i in range(20):
        rec = task.record("train", i)
        assert arithmetic_exact(rec["prompt"], rec["completion"]) == 1.0
        off_by_one = str(int(rec["completion"]) + 1)
        assert (
            arithmetic_exact(rec["prompt"], off_by_one)
            == 0.0
            == task.score(rec["prompt"], off_by_one)
        )
    with pytest.raises(DataError, match="not an arithmetic prompt"):
        arithmetic_exact("hello", "5")


def test_reference_scorer_and_score_lists():
    records = [{"prompt": "Q1", "completion": " Tumeli"}, {"prompt": "Q2", "completion": "7"}]
    scorer = reference_scorer(records)
    np.testing.assert_array_equal(scorer(["Q1", "Q2", "Q1"], ["Tumeli\n", "8", "x"]), [1, 0, 0])
    with pytest.raises(ValueError, match="'Q3' has no reference"):
        scorer(["Q3"], ["a"])
    with pytest.raises(ValueError, match="two reference completions"):
        reference_scorer([*records, {"prompt": "Q1", "completion": "Bazoka"}])
    # One call for all pairs; the scores come back per prompt, in order.
    calls = []

    def length(prompts, responses):
        calls.append(len(responses))
        return np.array([float(len(r)) for r in responses])

    per_prompt = score_lists(length, ["a", "b", "c"], [["x", "yy"], [], ["zzz"]])
    assert calls == [3] and [s.tolist() for s in per_prompt] == [[1.0, 2.0], [], [3.0]]
    with pytest.raises(ValueError, match="one score per response"):
        score_lists(lambda p, r: np.zeros(1), ["a"], [["x", "y"]])


# ----------------------------------------------------------------------------
# Pairing methods
# ----------------------------------------------------------------------------


def test_first_round_pairs_neighbours_of_the_shuffle():
    # The draw the method makes: default_rng(0).permutation(6) = [3, 2, 5, 4, 0, 1].
    assert np.random.default_rng(0).permutation(6).tolist() == [3, 2, 5, 4, 0, 1]
    scores = [0.0, 1.0, 0.5, 0.5, 0.2, 0.9]
    # Neighbours (3, 2): tie, dropped; (5, 4): 0.9 > 0.2; (0, 1): 1.0 wins.
    pairs = form_pairs(scores, method="first_round", rng=np.random.default_rng(0))
    assert pairs == [(5, 4), (1, 0)]
    # Odd count: default_rng(1).permutation(7) = [5, 0, 1, 4, 2, 6, 3]; 3 sits out.
    assert np.random.default_rng(1).permutation(7).tolist() == [5, 0, 1, 4, 2, 6, 3]
    pairs = form_pairs([0, 1, 2, 3, 4, 5, 6], method="first_round", rng=np.random.default_rng(1))
    assert pairs == [(5, 0), (4, 1), (6, 2)]


@pytest.mark.parametrize("n", [2, 5, 8, 11])
def test_tournament_has_n_minus_1_matches_and_the_best_never_loses(n):
    scores = np.random.default_rng(n).permutation(n) * 0.1  # n distinct scores
    pairs = form_pairs(scores, method="tournament", rng=np.random.default_rng(0))
    assert len(pairs) == n - 1
    losers = [lose for _, lose in pairs]
    assert len(set(losers)) == n - 1  # single elimination: everyone but one loses once
    assert int(np.argmax(scores)) not in losers
    assert all(scores[win] > scores[lose] for win, lose in pairs)


def test_tournament_ties_give_no_pair():
    assert form_pairs([1, 1, 1, 1], method="tournament", rng=np.random.default_rng(0)) == []
    scores = [1, 1, 0, 0, 0]
    for seed in range(10):
        pairs = form_pairs(scores, method="tournament", rng=np.random.default_rng(seed))
        # One of the 1s wins overall, so at least one decided match; 4 matches at most.
        assert 1 <= len(pairs) <= 4
        assert all(scores[win] > scores[lose] for win, lose in pairs)


def test_best_worst_is_one_pair_of_a_highest_and_a_lowest():
    scores = [0.2, 1.0, 0.0, 1.0, 0.0]
    for seed in range(10):
        [(win, lose)] = form_pairs(scores, method="best_worst", rng=np.random.default_rng(seed))
        assert win in (1, 3) and lose in (2, 4)
    assert form_pairs([0.3, 0.3], method="best_worst", rng=np.random.default_rng(0)) == []


def test_all_pairs_every_pair_with_different_scores():
    scores = [1.0, 0.0, 1.0, 0.5]
    # i < j: (0,1) (0,3) (1,2) (1,3) (2,3) differ; (0,2) ties.
    pairs = form_pairs(scores, method="all", rng=np.random.default_rng(0))
    assert sorted(pairs) == sorted([(0, 1), (0, 3), (2, 1), (3, 1), (2, 3)])


@pytest.mark.parametrize("method", ["first_round", "tournament", "best_worst", "all"])
def test_winners_always_score_strictly_higher(method):
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 3, size=int(rng.integers(1, 9))).astype(float)
        for win, lose in form_pairs(scores, method=method, rng=rng):
            assert scores[win] > scores[lose]


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ValueError, match="first_round.*tournament.*best_worst.*all"):
        form_pairs([0, 1], method="random", rng=np.random.default_rng(0))


# ----------------------------------------------------------------------------
# Soft labels, pairwise and listwise records
# ----------------------------------------------------------------------------


def test_soft_label_closed_form():
    assert soft_label(0.7, 0.7, 1.0) == 0.5
    assert soft_label(1.0, 0.5, 0.25) == pytest.approx(1 / (1 + math.exp(-2.0)))  # 0.8808
    assert soft_label(1.0, 0.0, 0.01) == pytest.approx(1.0, abs=1e-12)
    assert soft_label(0.0, 1.0, 0.1) == 0.5  # a disagreeing label never reverses the pair
    assert soft_label(1.0, 0.0, None) is None
    with pytest.raises(ValueError, match="temperature"):
        soft_label(1.0, 0.0, 0.0)


def test_build_pairwise_dedupes_and_counts():
    prompts = ["a?", "b?", "c?", "d?"]
    responses = [
        ["x", "x", "y", "x", " "],  # "x" twice more (dropped), " " blank (dropped)
        ["u", "v", "w"],  # all equal scores
        ["s", "s"],  # one distinct response
        ["p", "q"],
    ]
    scores = [[1.0, 0.0, 0.5, 0.2, 1.0], [1, 1, 1], [1, 0], [0, 1]]
    records, stats = build_pairwise(prompts, responses, scores, method="all")
    # The first "x" (1.0) beats "y" (0.5); its duplicates' scores are not used.
    assert records == [
        PairwiseRecord("a?", "x", "y", None, "prompt 0"),
        PairwiseRecord("d?", "q", "p", None, "prompt 3"),
    ]
    # Mean over all 12 samples: (2.7 + 3 + 1 + 1) / 12.
    assert stats.mean_score == pytest.approx(7.7 / 12)
    assert stats == PreferenceStats(
        num_prompts=4,
        num_samples=12,
        mean_score=stats.mean_score,
        duplicates_removed=3,
        blank_removed=1,
        prompts_too_few=1,
        prompts_all_equal=1,
        prompts_with_records=2,
        num_records=2,
    )
    assert stats.fraction_with_records == 0.5
    assert stats.as_dict()["fraction_with_records"] == 0.5


def test_identical_responses_are_never_paired():
    rng = np.random.default_rng(0)
    pool = ["1", "2", "3"]
    responses = [[pool[i] for i in rng.integers(0, 3, size=6)] for _ in range(30)]
    scores = [rng.random(6) for _ in range(30)]  # duplicates get different scores
    for method in ["first_round", "tournament", "best_worst", "all"]:
        records, _ = build_pairwise(["q"] * 30, responses, scores, method=method)
        assert records and all(r.chosen != r.rejected for r in records)


def test_soft_labels_from_a_label_scorer_and_pair_cap():
    # Exact match picks the winner; graded scores say how sure the label is.
    responses = [["42", "41", "x"]]
    exact = make_scorer("arithmetic_exact")(["37+5="] * 3, responses[0])
    graded = make_scorer("arithmetic_graded")(["37+5="] * 3, responses[0])
    records, stats = build_pairwise(
        ["37+5="],
        responses,
        [exact],
        method="all",
        soft_label_temperature=0.5,
        label_scores=[graded],
    )
    by_rejected = {r.rejected: r.soft_label for r in records}
    assert set(by_rejected) == {"41", "x"}  # "41" vs "x" tie under exact: no pair
    assert by_rejected["41"] == pytest.approx(1 / (1 + math.exp(-(1 - 41 / 84) / 0.5)))
    assert by_rejected["x"] == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert stats.label_disagreements == 0
    capped, stats = build_pairwise(
        ["q"], [["a", "b", "c", "d"]], [[0, 1, 2, 3]], method="all", max_pairs_per_prompt=2
    )
    assert len(capped) == 2 and stats.num_records == 2


def test_build_listwise_labels_dedup_and_drops():
    prompts = ["a?", "b?", "c?"]
    responses = [["x", "y", "x", "z"], ["u", "v"], ["s", "s"]]
    scores = [[1.0, 0.25, 0.0, 0.5], [0.5, 0.5], [1.0, 0.0]]
    records, stats = build_listwise(prompts, responses, scores)
    assert len(records) == 1
    assert records[0].responses == ["x", "y", "z"]
    np.testing.assert_array_equal(records[0].labels, [1.0, 0.25, 0.5])
    assert (stats.prompts_all_equal, stats.prompts_too_few, stats.duplicates_removed) == (1, 1, 2)
    capped, _ = build_listwise(["q"], [list("abcdef")], [np.linspace(0, 1, 6)], max_responses=3)
    assert len(capped[0].responses) == 3
    assert set(capped[0].responses) <= set("abcdef")


def test_build_listwise_rejects_labels_outside_0_1():
    with pytest.raises(ValueError, match=r"\[0, 1\].*prompt 0 response 1 scored 1.5.*rescale"):
        build_listwise(["q"], [["a", "b"]], [[0.0, 1.5]])
    with pytest.raises(ValueError, match="one score per response"):
        build_pairwise(["q"], [["a", "b"]], [[0.0]])


# ----------------------------------------------------------------------------
# The pipeline, with a tiny untrained model
# ----------------------------------------------------------------------------

PROMPTS = ["1+2=", "3+4=", "5+6=", "7+8=", "9+1="]  # 5 prompts: not a multiple of 2
SAMPLING = dict(num_samples=3, max_new_tokens=6, batch_size=2)


@pytest.fixture(scope="module")
def tiny():
    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, vocab_size=259)
    model = PureModel(cfg)
    return model, model.init(0), make_tokenizer("byte")


def _even_length(prompts, responses):
    return np.array([float(len(r) % 2 == 0) for r in responses])


def test_make_preferences_end_to_end(tiny, tmp_path):
    model, params, tok = tiny
    records, stats = make_preferences(
        model, params, tok, PROMPTS, scorer=_even_length, pairing="all", seed=0, **SAMPLING
    )
    # The same draws through the sampler: the pairs are the hand-formed ones.
    texts = sample_texts(model, params, tok, PROMPTS, seed=0, **SAMPLING).responses
    scores = [_even_length(None, r) for r in texts]
    assert stats.mean_score == pytest.approx(np.mean(np.concatenate(scores)))
    assert 0.0 < stats.mean_score < 1.0
    want = set()
    for p, rs, sc in zip(PROMPTS, texts, scores, strict=True):
        distinct = {r: s for r, s in reversed(list(zip(rs, sc, strict=True))) if r.strip()}
        want |= {(p, a, b) for a in distinct for b in distinct if distinct[a] > distinct[b]}
    assert {(r.prompt, r.chosen, r.rejected) for r in records} == want and want
    assert stats.num_records == len(records) == len(want)
    assert stats.fraction_with_records == stats.prompts_with_records / 5 > 0
    write_records(records, tmp_path / "pairs.jsonl")
    loaded = load_pairwise(str(tmp_path / "pairs.jsonl"))
    assert [(r.chosen, r.rejected) for r in loaded] == [(r.chosen, r.rejected) for r in records]

    lists, stats = make_preferences(
        model, params, tok, PROMPTS, scorer=_even_length, format="lists", seed=0, **SAMPLING
    )
    assert lists and all(len(set(r.labels.tolist())) == 2 for r in lists)
    write_records(lists, tmp_path / "lists.jsonl")
    assert len(load_listwise(str(tmp_path / "lists.jsonl"))) == len(lists)


def test_make_preferences_checks_settings_before_sampling(tiny):
    model, params, tok = tiny
    with pytest.raises(ValueError, match="pairs.*lists"):
        make_preferences(model, params, tok, PROMPTS, scorer=_even_length, format="x", **SAMPLING)
    with pytest.raises(ValueError, match="first_round"):
        make_preferences(model, params, tok, PROMPTS, scorer=_even_length, pairing="x", **SAMPLING)


def test_direct_pairs_take_the_reference_over_the_first_wrong_sample():
    from lm_align.align.direct import direct_pairs

    prompts = ["1+1=", "2+2=", "3+3=", "4+4="]
    golds = ["2", "4", "6", "8"]
    samples = [["2", "3", "5"], ["4", "4"], ["", "7", "9"], ["9", "8"]]
    scores = [np.array([1.0, 0.0, 0.0]), np.array([1.0, 1.0]), np.array([0.0, 0.0, 0.0]),
              np.array([0.5, 1.0])]  # fmt: skip
    records, stats = direct_pairs(prompts, golds, samples, scores)
    # prompt 0: first wrong is "3"; prompt 1: none wrong; prompt 2: the blank one is skipped,
    # "7" is first; prompt 3: 0.5 counts as wrong.
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [
        ("1+1=", "2", "3"), ("3+3=", "6", "7"), ("4+4=", "8", "9"),
    ]  # fmt: skip
    assert (stats.num_prompts, stats.num_samples, stats.num_records) == (4, 10, 3)
    assert stats.mean_score == pytest.approx(4.5 / 10)
