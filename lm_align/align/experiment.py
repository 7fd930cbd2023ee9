"""What the multi-stage commands (align-study, rest-em, bon) share.

An experiment file gives `get_config(stage[,arg])` per stage and one
`get_<name>(arg)` dict of settings; `open_experiment` loads both, and
`start_policy` trains (or finds) the start policy and its task's prompts.
On arithmetic the held-out prompts are distinct problems
(`ArithmeticTask.distinct_problems`: each eval problem at most once, uniform
over problems) and evaluations report per-slice accuracy
(`arithmetic.problem_slices`); other sources give the first prompts of their
eval split.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from lm_align import config as config_lib
from lm_align import data as data_lib
from lm_align.utils import write_json


@dataclasses.dataclass
class Experiment:
    path: str
    arg: str | None
    spec: dict[str, Any]
    overrides: list[str]

    def load(self, stage: str, extra=()) -> Any:
        """`get_config("<stage>[,<arg>]")` with the command-line overrides, then `extra`."""
        cfg = config_lib.load_config(f"{self.path}:{stage}" + (f",{self.arg}" if self.arg else ""))
        return config_lib.apply_overrides(cfg, [*self.overrides, *extra])


def open_experiment(
    config_path: str, getter: str, defaults: dict | None, overrides, see: str
) -> Experiment:
    """Loads `config_path[:arg]` and its `getter(arg)` settings, checked against `defaults`."""
    path, _, arg = config_path.partition(":")
    module = config_lib.load_experiment_module(path)
    if not hasattr(module, getter):
        raise config_lib.ConfigError(f"{path} has no {getter}(arg); see {see}")
    spec = dict(getattr(module, getter)(arg or None))
    if defaults is not None:
        unknown = sorted(set(spec) - set(defaults))
        if unknown:
            raise config_lib.ConfigError(
                f"{getter}() fields {unknown} are unknown; valid: {sorted(defaults)}"
            )
        spec = {**defaults, **spec}
    return Experiment(path, arg or None, spec, list(overrides))


@dataclasses.dataclass
class StartPolicy:
    directory: str  # its workdir
    tokenizer: Any
    train_source: Any  # records with "prompt" (and "completion")
    eval_prompts: list[str]  # held-out prompts, distinct problems on arithmetic
    slices: Callable[[str], list[str]] | None = None  # prompt -> its eval slices


def held_out_prompts(data_cfg, count: int) -> tuple[list[str], Callable | None]:
    """`task_prompts` of the eval split: up to `count` held-out prompts and their slices."""
    return task_prompts(data_cfg, "eval", count)


def task_prompts(data_cfg, split: str, count: int) -> tuple[list[str], Callable | None]:
    """Up to `count` prompts of a data config's `split`, and their slice function.

    Arithmetic: `count` distinct problems, uniform over problems, with
    `arithmetic.problem_slices`. Other sources: the first `count` prompts of
    the split, no slices.
    """
    from lm_align.data.arithmetic import ArithmeticTask, problem_slices

    src = data_lib.make_source(data_cfg, split)
    task = getattr(src, "task", None)
    if isinstance(task, ArithmeticTask):
        return [r["prompt"] for r in task.distinct_problems(split, count)], problem_slices
    return [src[i]["prompt"] for i in range(min(count, len(src)))], None


def start_policy(exp: Experiment, workdir: str, *, eval_problems: int, log) -> StartPolicy:
    """`spec["base_checkpoint"]`, or `get_config("base")` trained in WORKDIR/base."""
    from lm_align.train.checkpoint import resolve, saved_config
    from lm_align.train.loop import train

    directory = exp.spec.get("base_checkpoint") or os.path.join(workdir, "base")
    if not exp.spec.get("base_checkpoint"):
        log(f"== start policy -> {directory}")
        train(exp.load("base"), directory)
    cfg = saved_config(resolve(directory))
    prompts, slices = held_out_prompts(cfg.data, eval_problems)
    return StartPolicy(
        directory,
        data_lib.make_tokenizer(cfg.data.tokenizer),
        data_lib.make_source(cfg.data, "train"),
        prompts,
        slices,
    )


def cached(path: str, compute: Callable[[], dict]) -> dict:
    """The JSON at `path`, or `compute()` written there atomically."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = compute()
    write_json(path, result)
    return result


def evaluate_run(run_dir: str, out_path: str, start: StartPolicy, scorer, **kwargs) -> dict:
    """`evaluate_policy` of the run's params on the start policy's held-out prompts
    (with its slices), cached in `out_path` (a rerun reads it back)."""
    from lm_align.align.policy_eval import evaluate_policy
    from lm_align.align.setup import load_model

    def compute():
        model, params, _ = load_model(run_dir)
        return evaluate_policy(
            model, params, start.tokenizer, start.eval_prompts, scorer,
            **{"slices": start.slices, **kwargs},
        )  # fmt: skip

    return cached(out_path, compute)


def reward_model_selector(path: str, tokenizer, prompts) -> Callable:
    """bon@k's selector for `evaluate_policy`: the reward model of run `path` scores
    each prompt's samples, [P, n], in rows of the length it was trained with or, for
    longer samples, of the longest one (scored once per set of samples, whatever k)."""
    import numpy as np

    from lm_align.align.reward import RewardModel, reward_model_scorer
    from lm_align.align.setup import load_model
    from lm_align.data.scorers import score_lists

    rm, rm_params, rm_cfg = load_model(path)
    if not isinstance(rm, RewardModel):
        raise ValueError(f"{path} is a policy, not a reward model (align.loss=bradley_terry)")
    last: dict[int, np.ndarray] = {}

    def select(samples, k):
        if id(samples) not in last:
            longest = max(len(tokenizer.encode(p)) + len(tokenizer.encode(r))
                          for p, rs in zip(prompts, samples.responses, strict=True) for r in rs)
            max_len = max(rm_cfg.align.max_len, longest + 1)  # + bos, eos; rows hold max_len + 1
            rm_score = reward_model_scorer(rm, rm_params, tokenizer, max_len=max_len)
            last.clear()
            last[id(samples)] = np.stack(score_lists(rm_score, prompts, samples.responses))
        return last[id(samples)]

    return select
