"""evaluate_policy's best-of-n selectors and per-slice accuracy; the held-out prompts
of the multi-stage commands (distinct problems on arithmetic)."""

import json

import numpy as np
import pytest

from lm_align.align.experiment import held_out_prompts
from lm_align.align.policy_eval import evaluate_policy
from lm_align.data.arithmetic import ArithmeticTask, problem_slices
from lm_align.data.tokenizers import make_tokenizer
from lm_align.models import TransformerConfig
from lm_align.models.pure import PureModel

PROMPTS = [f"{a}+{b}=" for a, b in [(1, 2), (30, 4), (5, 67), (8, 8), (12, 21), (9, 9)]]


def _first_byte_even(prompts, responses):
    """Accepts responses whose first byte is even: about half the samples of an
    untrained byte model, so both outcomes occur."""
    return np.array([float(bool(r) and r.encode("utf-8")[0] % 2 == 0) for r in responses])


@pytest.fixture(scope="module")
def tiny():
    model = PureModel(TransformerConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    return model, model.init(0), make_tokenizer("byte")


def _evaluate(tiny, **kwargs):
    model, params, tok = tiny
    return evaluate_policy(
        model, params, tok, PROMPTS, _first_byte_even, num_samples=4, ks=(1, 2, 4), seed=3,
        **kwargs,
    )  # fmt: skip


def test_bon_is_verifier_selected_and_bon_likelihood_is_the_models_choice(tiny):
    drawn = []

    def capture(samples, k):  # any callable selector: here the verifier's scores again
        drawn.append(samples)
        flat = [r for rs in samples.responses for r in rs]
        return _first_byte_even(None, flat).reshape(len(PROMPTS), -1)

    _evaluate(tiny, selector=capture)
    s = drawn[0]  # the same seed draws the same samples in every call below
    correct = np.array([[_first_byte_even(None, [x])[0] for x in rs] for rs in s.responses])
    mean_token_logp = s.logps / np.maximum(s.lengths, 1)

    r = _evaluate(tiny)
    assert r["bon_selector"] == "verifier"
    for k in (1, 2, 4):
        # A binary verifier picks a correct sample whenever one of the first k is.
        assert r[f"bon@{k}"] == pytest.approx(np.mean(correct[:, :k].any(axis=1)))
        picked = np.argmax(mean_token_logp[:, :k], axis=1)
        want = np.mean(correct[np.arange(len(PROMPTS)), picked])
        assert r[f"bon_likelihood@{k}"] == pytest.approx(want)
    # The two selectors disagree somewhere, or this test could not tell them apart.
    assert r["bon_likelihood@4"] < r["bon@4"]
    assert r["bon@4"] == pytest.approx(np.mean(correct.sum(axis=1) > 0)) == r["pass@4"]

    lik = _evaluate(tiny, selector="likelihood")
    assert lik["bon_selector"] == "likelihood"
    assert all(lik[f"bon@{k}"] == r[f"bon_likelihood@{k}"] for k in (1, 2, 4))
    assert _evaluate(tiny, selector=capture)["bon_selector"] == "custom"
    with pytest.raises(ValueError, match="selector='oracle'"):
        _evaluate(tiny, selector="oracle")


def test_slices_report_count_greedy_accuracy_and_pass_at_1(tiny):
    # Each prompt is also its own slice, so the named slices can be checked
    # against the per-prompt numbers by hand.
    r = _evaluate(tiny, slices=lambda p: [p, *problem_slices(p)])
    sl = r["slices"]
    per_prompt = {p: sl[p] for p in PROMPTS}
    assert all(v["count"] == 1 for v in per_prompt.values())
    groups = {
        "carry": ["5+67=", "8+8=", "9+9="],
        "no_carry": ["1+2=", "30+4=", "12+21="],
        "digits=1": ["1+2=", "8+8=", "9+9="],
        "digits=2": ["30+4=", "5+67=", "12+21="],
        "op=+": PROMPTS,
    }
    for name, members in groups.items():
        assert sl[name]["count"] == len(members)
        for metric in ("greedy_accuracy", "pass@1"):
            want = np.mean([per_prompt[p][metric] for p in members])
            assert sl[name][metric] == pytest.approx(want)
    assert np.mean([v["greedy_accuracy"] for v in per_prompt.values()]) == pytest.approx(
        r["greedy_accuracy"]
    )
    assert np.mean([v["pass@1"] for v in per_prompt.values()]) == pytest.approx(r["pass@1"])
    assert set(sl) == set(PROMPTS) | set(groups)
    json.dumps(r)  # the report stays JSON
    assert "slices" not in _evaluate(tiny)


def test_held_out_prompts_are_distinct_problems_on_arithmetic(tmp_path):
    prompts, slices = held_out_prompts({"source": "arithmetic"}, 512)
    assert len(prompts) == len(set(prompts)) == 512 and slices is problem_slices
    task = ArithmeticTask()
    assert all(task.in_split(p, "eval") for p in prompts)
    assert prompts == [r["prompt"] for r in task.distinct_problems("eval", 512)]
    # Fewer problems than asked: all of them, once.
    few, _ = held_out_prompts({"source": "arithmetic", "arithmetic_digits": 1}, 512)
    assert sorted(few) == sorted(
        r["prompt"] for r in ArithmeticTask(num_digits=1).distinct_problems()
    )

    # Other sources: the first prompts of the eval split, no slices.
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"q": f"question {i}?", "a": str(i)}) + "\n" for i in range(60))
    )
    cfg = {"source": f"jsonl:{path}", "jsonl_prompt_field": "q", "jsonl_completion_field": "a"}
    prompts, slices = held_out_prompts(cfg, 2)
    assert prompts == ["question 0?", "question 20?"] and slices is None


def test_the_align_trainers_eval_samples_use_distinct_problems():
    from types import SimpleNamespace

    from lm_align.align.held_out import _eval_prompts

    cfg = SimpleNamespace(data={"source": "arithmetic"}, align=SimpleNamespace(eval_prompts=64))
    prompts = _eval_prompts(cfg)
    assert prompts == held_out_prompts({"source": "arithmetic"}, 64)[0]
    assert len(set(prompts)) == 64
    cfg.align.eval_prompts = 0
    assert _eval_prompts(cfg) == []
