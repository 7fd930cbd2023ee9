"""The preference trainer: `lm-align align --config experiments/x.py`.

A policy initialised from a checkpoint is trained on preference records
(pairs or lists, JSON Lines) with the loss `align.loss` against a frozen
reference; `align.loss = bradley_terry` trains a reward model (the policy's
Transformer with a scalar head) on pairs instead. The step is sharded and
jitted like pretraining (params by their logical axes, the batch over
data/fsdp), and the run is checkpointed and resumable the same way
(`lm_align.train.loop.run_loop`): SIGTERM saves at the next step boundary and
rerunning the command continues exactly.

Every batch is a list batch: rows [B, K, L] (pairs are K = 2 lists, chosen
first), labels [B, K] (pairs: [p, 1 - p]) and a response mask, so pairwise
losses, listwise losses on lists and listwise losses on pairs share one step.
Reference log-probs are computed once for the whole data set
(`align.precompute_reference`, cached in WORKDIR/reference_logps.npz) or in
every step.

Metrics (docs/metrics.md): loss, reward_accuracy (fraction of label-ordered
response pairs whose implicit reward beta * (log pi - log ref) is ordered the
same way), reward_margin, reward_chosen / reward_rejected (pairs), and at eval
steps the same on held-out records plus, on policy samples for held-out
prompts, the KL estimate to the reference, the mean response length, the
samples' reward under `align.eval_scorer`, and greedy exact match.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lm_align import config as config_lib
from lm_align import data as data_lib
from lm_align import distributed, optim, parallel
from lm_align.align import checkpoints
from lm_align.align.config import (
    LISTWISE_LOSSES,
    PAIRWISE_LOSSES,
    POLICY_GRADIENT_LOSSES,
    REWARD_LOSSES,
    check_align,
    resolved_format,
)
from lm_align.align.logprobs import sequence_logprobs
from lm_align.config import ConfigError
from lm_align.data import preference as pref_data
from lm_align.data.jsonl import match_files
from lm_align.losses import listwise, policy_gradient, preference
from lm_align.models.pure import PureModel
from lm_align.train import evaluate
from lm_align.train.checkpoint import Checkpointer
from lm_align.train.loop import TrainResult, _jsonable, _log, restore_or_init, run_loop
from lm_align.train.metrics import MetricWriter
from lm_align.train.step import NONFINITE_MODES, TrainState, state_shardings, with_shardings
from lm_align.train.validate import check_config, make_parameterization

# ---------------------------------------------------------------------------
# Objectives: per-example loss and metrics from row scores [B, K].


def _pair_metrics(s_BK, labels_BK, mask_BK) -> dict[str, jax.Array]:
    """Per list: accuracy and margin of the implicit scores over label-ordered pairs.

    For every pair (i, j) of real responses with labels_i > labels_j:
    accuracy = mean(1[s_i > s_j] + 0.5 * 1[s_i == s_j]), margin = mean(s_i - s_j).
    """
    valid = mask_BK[:, :, None] & mask_BK[:, None, :]
    ordered = (labels_BK[:, :, None] > labels_BK[:, None, :]) & valid  # [B, K, K], i beats j
    diff = s_BK[:, :, None] - s_BK[:, None, :]
    n = jnp.maximum(jnp.sum(ordered, axis=(1, 2)), 1)
    return {
        # A tie counts as half right, so identical policy and reference give 0.5.
        "reward_accuracy": jnp.sum(ordered * ((diff > 0) + 0.5 * (diff == 0)), axis=(1, 2)) / n,
        "reward_margin": jnp.sum(jnp.where(ordered, diff, 0.0), axis=(1, 2)) / n,
    }


def objective(a, scores_BK, ref_BK, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss [B], metrics {name: [B]}) of `align.loss` for row scores.

    `scores_BK`: policy log-probs (or reward-model rewards for bradley_terry);
    `ref_BK`: reference log-probs (ignored for bradley_terry). For pairs,
    column 0 is the chosen and column 1 the rejected response.
    """
    labels, mask = batch["labels"], batch["mask"]
    if a.loss in REWARD_LOSSES:
        implicit = scores_BK
        r_w, r_l = scores_BK[:, 0], scores_BK[:, 1]
        loss = preference.bradley_terry(r_w, r_l, margin=a.reward_margin)
        if a.reward_centering:
            loss = loss + a.reward_centering * preference.reward_centering(r_w, r_l)
    else:
        implicit = a.beta * (scores_BK - ref_BK)
        if a.loss in POLICY_GRADIENT_LOSSES:  # labels are the samples' rewards
            loss = getattr(policy_gradient, a.loss)(scores_BK, labels, mask)
        elif a.loss in LISTWISE_LOSSES:
            fn = {
                "lipo_lambda": functools.partial(listwise.lipo_lambda, reduction=a.lipo_reduction),
                "list_mle": listwise.list_mle,
                "softmax": listwise.softmax_cross_entropy,
                "pair_logistic": listwise.pair_logistic,
                "pair_hinge": listwise.pair_hinge,
                "point_mse": listwise.point_mse,
                "point_sigmoid": listwise.point_sigmoid,
            }[a.loss]
            loss = fn(implicit, labels, mask)
        else:
            lp_w, lp_l, lr_w, lr_l = scores_BK[:, 0], scores_BK[:, 1], ref_BK[:, 0], ref_BK[:, 1]
            four = (lp_w, lp_l, lr_w, lr_l)
            if a.loss == "dpo":
                loss = preference.dpo(*four, beta=a.beta, label_smoothing=a.label_smoothing)
            elif a.loss == "ipo":
                lengths = batch["lengths"]
                normalized = a.ipo_length_normalized
                loss = preference.ipo(
                    *four,
                    beta=a.beta,
                    chosen_lengths=lengths[:, 0] if normalized else None,
                    rejected_lengths=lengths[:, 1] if normalized else None,
                )
            elif a.loss == "slic":
                # SLiC-HF: hinge on the policy margin plus lambda * NLL of the chosen
                # (the best-ranked) response.
                loss = preference.slic(lp_w, lp_l, margin=a.margin) - a.slic_reg_weight * lp_w
            elif a.loss == "rso_hinge":
                loss = preference.rso_hinge(lp_w, lp_l, gamma=a.gamma)
            elif a.loss == "rso_hinge_norm":
                loss = preference.rso_hinge_norm(*four, gamma=a.gamma)
            elif a.loss == "rso_sigmoid_norm":
                loss = preference.rso_sigmoid_norm(*four, gamma=a.gamma)
            elif a.loss == "geometric_dpo":
                loss = preference.geometric_dpo(*four, beta=a.beta, soft_labels=batch["soft_label"])
            else:  # pragma: no cover - check_align rejects unknown losses
                raise ValueError(a.loss)
    metrics = _pair_metrics(jax.lax.stop_gradient(implicit), labels, mask)
    if a.nll_weight and a.loss not in REWARD_LOSSES:
        # NLL per token of the best-labelled response (pairs: the chosen), as in
        # iterative RPO (Pang et al. 2024): keeps the chosen likelihood from falling.
        best = jnp.argmax(jnp.where(mask, labels, -jnp.inf), axis=1)
        lp_best = jnp.take_along_axis(scores_BK, best[:, None], axis=1)[:, 0]
        n_best = jnp.take_along_axis(batch["lengths"], best[:, None], axis=1)[:, 0]
        nll = -lp_best / jnp.maximum(n_best, 1.0)
        loss = loss + a.nll_weight * nll
        metrics["nll"] = nll
    if scores_BK.shape[1] == 2 and a.loss in PAIRWISE_LOSSES + REWARD_LOSSES:
        metrics["reward_chosen"] = implicit[:, 0]
        metrics["reward_rejected"] = implicit[:, 1]
        metrics["logp_chosen"] = scores_BK[:, 0]
        metrics["logp_rejected"] = scores_BK[:, 1]
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def _weighted_means(loss_B, metrics, weight_B):
    total = jnp.maximum(jnp.sum(weight_B), 1.0)
    out = {"loss": jnp.sum(loss_B * weight_B) / total}
    out.update({k: jnp.sum(v * weight_B) / total for k, v in metrics.items()})
    return out


def make_align_step(
    a,
    score_rows: Callable,
    tx: optax.GradientTransformation,
    schedule: Callable,
    *,
    nonfinite: str = "halt",
    online_reference: bool = False,
) -> Callable:
    """`(state, batch[, ref_params]) -> (state, metrics)`: one preference update.

    `score_rows(params, rows [B, K, L]) -> [B, K]` (sequence log-probs, or
    rewards). Without `online_reference` the batch carries `ref_logps` [B, K];
    with it, they are computed from `ref_params` (no gradient).
    """
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite={nonfinite!r}: use one of {NONFINITE_MODES}")

    def loss_fn(params, batch, ref_params):
        scores = score_rows(params, batch["rows"])
        if online_reference:
            ref = jax.lax.stop_gradient(score_rows(ref_params, batch["rows"]))
        else:
            ref = batch.get("ref_logps", jnp.zeros_like(scores))
        loss_B, metrics = objective(a, scores, ref, batch)
        out = _weighted_means(loss_B, metrics, batch["weight"])
        return out["loss"], out

    def step(state: TrainState, batch, ref_params=None):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, ref_params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        lr = schedule(state.step - state.skipped)
        new = TrainState(state.step + 1, params, opt_state, state.rng, state.skipped)
        if nonfinite == "skip":

            def keep(n, o):
                return jnp.where(finite, n, o)

            new = new._replace(
                params=jax.tree.map(keep, params, state.params),
                opt_state=jax.tree.map(keep, opt_state, state.opt_state),
                skipped=state.skipped + (~finite).astype(jnp.int32),
            )
        metrics.update(grad_norm=grad_norm, lr=lr, finite=finite, skipped=new.skipped)
        return new, metrics

    return step


def make_align_eval(a, score_rows: Callable, *, online_reference: bool = False) -> Callable:
    """`(params, batch[, ref_params]) -> sums`: weighted sums over held-out records."""

    def eval_fn(params, batch, ref_params=None):
        scores = score_rows(params, batch["rows"])
        if online_reference:
            ref = score_rows(ref_params, batch["rows"])
        else:
            ref = batch.get("ref_logps", jnp.zeros_like(scores))
        loss_B, metrics = objective(a, scores, ref, batch)
        w = batch["weight"]
        sums = {"loss": jnp.sum(loss_B * w)}
        sums.update({k: jnp.sum(v * w) for k, v in metrics.items()})
        sums["count"] = jnp.sum(w)
        return sums

    return eval_fn


# ---------------------------------------------------------------------------
# Data: records tokenized once; batches are index sets.


@dataclasses.dataclass
class PreferenceArrays:
    """All records of a file as list arrays (pairs are K = 2 lists)."""

    rows: dict[str, np.ndarray]  # five features [N, K, L]
    labels: np.ndarray  # float32 [N, K]
    mask: np.ndarray  # bool [N, K]
    soft_label: np.ndarray  # float32 [N] (1.0 for hard pairs and for lists)
    lengths: np.ndarray  # float32 [N, K] completion tokens (eos included)
    prompts: list[str]
    ref_logps: np.ndarray | None = None  # float32 [N, K] once computed

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> dict[str, Any]:
        batch = {
            "rows": {k: v[index] for k, v in self.rows.items()},
            "labels": self.labels[index],
            "mask": self.mask[index],
            "soft_label": self.soft_label[index],
            "lengths": self.lengths[index],
            "weight": np.ones(len(index), np.float32),
        }
        if self.ref_logps is not None:
            batch["ref_logps"] = self.ref_logps[index]
        return batch


def load_preferences(path: str, a, tokenizer, *, num_responses: int | None = None):
    """Reads and tokenizes a pairwise or listwise JSON Lines file per `align`."""
    fmt = resolved_format(a)
    if fmt == "pairwise":
        records = pref_data.load_pairwise(path, on_tie=a.on_tie)
        b = pref_data.to_batch(records, tokenizer, a.max_len, overlong=a.overlong)
        rows = {k: np.stack([b["chosen"][k], b["rejected"][k]], axis=1) for k in b["chosen"]}
        p = b["soft_label"]
        labels = np.stack([p, 1.0 - p], axis=1).astype(np.float32)
        mask = np.ones_like(labels, bool)
        soft = p.astype(np.float32)
    else:
        if fmt == "samples":
            records = pref_data.load_samples(path)
        else:
            records = pref_data.load_listwise(path, on_tie=a.on_tie)
        b = pref_data.to_batch(
            records, tokenizer, a.max_len, num_responses=num_responses, overlong=a.overlong
        )
        rows, labels, mask = b["responses"], b["labels"], b["response_mask"]
        soft = np.ones(len(records), np.float32)
    lengths = rows["loss_mask"].sum(-1).astype(np.float32)
    return PreferenceArrays(rows, labels, mask, soft, lengths, [r.prompt for r in records])


class BatchOrder:
    """Epochs of seeded permutations of N records, cut into global batches of B.

    Each process takes its contiguous slice of every global batch. The state
    (epoch, batch within the epoch) is saved with checkpoints, so a resumed run
    sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shard_index: int, shard_count: int):
        if n < batch_size:
            raise ConfigError(
                f"train.batch_size={batch_size} but the preference file has only {n} records; "
                f"lower train.batch_size to at most {n} or add records"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.local = batch_size // shard_count
        self.shard_index = shard_index
        self.epoch, self.position = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def __next__(self) -> np.ndarray:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        start = self.position * self.batch_size + self.shard_index * self.local
        self.position += 1
        return perm[start : start + self.local]

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def _sharded(batch, sharding):
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), batch)


def map_records(fn: Callable, data: PreferenceArrays, batch_size: int, sharding) -> list:
    """`fn(global batch)` over all records in order, the last batch padded (weight 0).

    Returns the host outputs per batch. Each process feeds its slice of every
    global batch; `fn`'s outputs must be replicated.
    """
    n, outs = len(data), []
    local = batch_size // jax.process_count()
    lo = jax.process_index() * local
    for start in range(0, n, batch_size):
        index = np.arange(start, start + batch_size)
        weight = (index < n).astype(np.float32)
        index = np.where(index < n, index, 0)
        batch = data.take(index[lo : lo + local])
        batch["weight"] = weight[lo : lo + local]
        out = jax.device_get(fn(_sharded(batch, sharding)))
        outs.append((out, int(min(batch_size, n - start))))
    return outs


# ---------------------------------------------------------------------------
# The run.


def _resolve_config(cfg, devices) -> tuple[Any, Any]:
    """Takes model/param from the policy checkpoint; validates everything.

    Returns (cfg, policy checkpoint ref or None).
    """
    if "align" not in cfg:
        raise ConfigError(
            "config has no `align` group; start get_config() from "
            "lm_align.align.config.align_base_config()"
        )
    errors = check_align(cfg.align)
    if cfg.train.grad_accum_steps != 1:
        errors.append(
            f"train.grad_accum_steps={cfg.train.grad_accum_steps}; the preference trainer "
            "takes whole batches (set it to 1 and lower train.batch_size instead)"
        )
    ref = None
    if cfg.align.policy_checkpoint:
        try:
            ref = checkpoints.resolve(cfg.align.policy_checkpoint)
            saved = checkpoints.saved_config(ref)
        except FileNotFoundError as e:
            errors.append(f"align.policy_checkpoint={cfg.align.policy_checkpoint!r}: {e}")
        else:
            if saved.get("align", {}).get("loss") in REWARD_LOSSES:
                errors.append(
                    f"align.policy_checkpoint={cfg.align.policy_checkpoint!r} is a reward model; "
                    "start from a policy (an `lm-align train` or `lm-align align` run)"
                )
            if saved.data.tokenizer != cfg.data.tokenizer:
                errors.append(
                    f"data.tokenizer={cfg.data.tokenizer!r} but the policy checkpoint was trained "
                    f"with {saved.data.tokenizer!r}; set data.tokenizer to match"
                )
            d = cfg.to_dict()
            d["model"], d["param"] = saved.model.to_dict(), saved.param.to_dict()
            cfg = config_lib.from_dict(d)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    return cfg, ref


@dataclasses.dataclass
class AlignSetup:
    """Everything `align` builds before stepping (also used by bench and tests)."""

    cfg: ml_collections.ConfigDict
    model: Any  # PureModel (policy) or RewardModel
    policy_model: PureModel
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    schedule: Callable
    state_shardings: Any
    abstract_state: Any
    batch_sharding: Any
    score_rows: Callable
    init_params: Callable[[], Any]  # () -> starting params (sharded)
    reference_params: Callable[[], Any]  # () -> frozen reference params (sharded) or None
    jitted: dict = dataclasses.field(default_factory=dict)  # compiled helpers by name


def setup(cfg, devices=None) -> AlignSetup:
    """Validates `cfg` and builds the model, optimizer, shardings and score function."""
    devices = list(jax.devices() if devices is None else devices)
    cfg, policy_ref = _resolve_config(cfg, devices)
    a, t = cfg.align, cfg.train
    model_cfg = check_config(
        cfg,
        num_devices=len(devices),
        process_count=jax.process_count(),
        extra_groups_allowed=("align",),
    )
    mesh = parallel.make_mesh(cfg.mesh, devices)
    param = make_parameterization(cfg, model_cfg)
    policy = PureModel(model_cfg, param)
    is_reward = a.loss in REWARD_LOSSES
    if is_reward:
        from lm_align.align.reward import RewardModel

        model = RewardModel(model_cfg, param)
        score_rows = model.rewards
    else:
        model = policy

        def score_rows(params, rows):
            return sequence_logprobs(policy, params, rows).logps

    opt = optim.make_optimizer(
        cfg.optimizer,
        total_steps=t.steps,
        lr_scales=param.lr_scales(model.abstract_params, model.logical_axes)
        if not is_reward
        else None,
    )
    abstract, state_sh = state_shardings(model, opt.tx, mesh, t.seed)
    policy_abstract = with_shardings(
        policy.abstract_params,
        parallel.logical_to_sharding(policy.logical_axes, policy.abstract_params, mesh),
    )

    def load_policy(path_ref):
        return checkpoints.load_params(path_ref, policy_abstract)

    def init_params():
        if policy_ref is None:
            return jax.jit(model.init, static_argnums=0, out_shardings=state_sh.params)(t.seed)
        params = load_policy(policy_ref)
        if is_reward:
            return jax.jit(model.from_policy, out_shardings=state_sh.params)(params)
        return params

    def reference_params():
        if is_reward:
            return None
        if a.reference_checkpoint:
            return load_policy(checkpoints.resolve(a.reference_checkpoint))
        return init_params()

    return AlignSetup(
        cfg,
        model,
        policy,
        mesh,
        opt.tx,
        opt.schedule,
        state_sh,
        with_shardings(abstract, state_sh),
        parallel.batch_sharding(mesh),
        score_rows,
        init_params,
        reference_params,
    )


def initial_state(s: AlignSetup, params, seed: int) -> TrainState:
    """Step 0 of training `params` (already sharded): fresh optimizer state."""
    init = jax.jit(
        lambda p: TrainState(
            jnp.zeros((), jnp.int32),
            p,
            s.tx.init(p),
            jax.random.key_data(jax.random.key(seed + 1)),
            jnp.zeros((), jnp.int32),
        ),
        out_shardings=s.state_shardings,
    )
    return init(params)


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_stamp(pattern: str) -> list:
    return [(p, os.path.getsize(p), os.path.getmtime(p)) for p in match_files(pattern)]


def precompute_reference(
    s: AlignSetup, ref_params, datasets: dict[str, PreferenceArrays], workdir: str, key: str
) -> None:
    """Fills each data set's `ref_logps`, cached in WORKDIR/reference_logps.npz under `key`."""
    path = os.path.join(workdir, "reference_logps.npz")
    if os.path.exists(path):
        cached = np.load(path)
        if str(cached["key"]) == key and all(name in cached for name in datasets):
            for name, data in datasets.items():
                data.ref_logps = cached[name]
            _log(f"reference log-probs: loaded from {path}")
            return
    fn = jax.jit(s.score_rows, out_shardings=parallel.replicated(s.mesh))
    batch_size = s.cfg.train.batch_size
    for data in datasets.values():
        outs = map_records(lambda b: fn(ref_params, b["rows"]), data, batch_size, s.batch_sharding)
        data.ref_logps = np.concatenate([o[:n] for o, n in outs]).astype(np.float32)
    if jax.process_index() == 0:
        tmp = path + ".tmp.npz"
        np.savez(tmp, key=np.array(key), **{n: d.ref_logps for n, d in datasets.items()})
        os.replace(tmp, path)
    _log(f"reference log-probs: computed for {sum(len(d) for d in datasets.values())} records")


def _eval_prompts(cfg) -> list[str]:
    """Held-out prompts for sampling: the data source's eval split (if it has prompts)."""
    try:
        records = data_lib.make_source(cfg.data, "eval")
    except ValueError:
        return []
    n = min(cfg.align.eval_prompts, len(records))
    out = [records[i] for i in range(n)]
    return [r["prompt"] for r in out] if out and "prompt" in out[0] else []


def sample_metrics(model, params, ref_params, tokenizer, prompts, a, *, seed: int = 0) -> dict:
    """KL(policy || reference), response length and reward on policy samples.

    `eval_samples` samples per prompt at `eval_temperature`. The KL estimate
    is mean over samples of log pi(y|x) - log ref(y|x) (summed over response
    tokens); it is unbiased at temperature 1. Response length counts tokens
    before the eos.
    """
    from lm_align.align.datagen import make_scorer
    from lm_align.align.policy_eval import rescore, sample

    out = sample(
        model, params, tokenizer, prompts, num_samples=a.eval_samples,
        max_new_tokens=a.eval_max_new_tokens, temperature=a.eval_temperature, seed=seed,
    )  # fmt: skip
    ref_logps = rescore(model, ref_params, tokenizer, prompts, out["token_ids"])
    result = {
        "kl": float(np.mean(out["logps"] - ref_logps)),
        "response_length": float(np.mean(out["lengths"])),
    }
    if a.eval_scorer:
        flat_prompts = [p for p, rs in zip(prompts, out["responses"], strict=True) for _ in rs]
        flat = [r for rs in out["responses"] for r in rs]
        result["sample_reward"] = float(np.mean(make_scorer(a.eval_scorer)(flat_prompts, flat)))
    return result


def evaluate_policy(s: AlignSetup, params, ref_params, eval_data, *, seed: int = 0) -> dict:
    """Eval metrics (keys `eval_*`) of `params`: held-out records, samples, greedy accuracy."""
    cfg, a = s.cfg, s.cfg.align
    online = not a.precompute_reference and ref_params is not None
    out: dict[str, Any] = {}
    if eval_data is not None:
        fn = _eval_fn(s, online)
        sums = None
        for o, _ in map_records(
            lambda b: fn(params, b, ref_params) if online else fn(params, b),
            eval_data,
            cfg.train.batch_size,
            s.batch_sharding,
        ):
            sums = o if sums is None else jax.tree.map(np.add, sums, o)
        count = max(float(sums.pop("count")), 1.0)
        out.update({f"eval_{k}": float(v) / count for k, v in sums.items()})
    if a.loss in REWARD_LOSSES:
        return out
    tokenizer = data_lib.make_tokenizer(cfg.data.tokenizer)
    prompts = _eval_prompts(cfg)
    if prompts and a.eval_prompts:
        m = sample_metrics(s.policy_model, params, ref_params, tokenizer, prompts, a, seed=seed)
        out.update({f"eval_{k}": v for k, v in m.items()})
    if cfg.train.answer_eval_examples:
        acc = evaluate.answer_accuracy(
            s.policy_model,
            params,
            cfg.data,
            num_examples=cfg.train.answer_eval_examples,
            max_new_tokens=cfg.train.answer_max_new_tokens,
        )
        if acc:
            out["eval_answer_exact_match"] = acc["answer_exact_match"]
    return out


def _eval_fn(s: AlignSetup, online: bool):
    name = f"eval_online={online}"
    if name not in s.jitted:
        fn = make_align_eval(s.cfg.align, s.score_rows, online_reference=online)
        s.jitted[name] = jax.jit(fn, out_shardings=parallel.replicated(s.mesh))
    return s.jitted[name]


def align(cfg, workdir: str, *, devices=None) -> TrainResult:
    """Trains (or resumes) the preference experiment `cfg` in `workdir`."""
    devices = list(jax.devices() if devices is None else devices)
    distributed.check_startup(config_lib.to_json(cfg), workdir)
    s = setup(cfg, devices)
    cfg, a, t = s.cfg, s.cfg.align, s.cfg.train
    os.makedirs(workdir, exist_ok=True)
    config_dict = cfg.to_dict()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(cfg))

    tokenizer = data_lib.make_tokenizer(cfg.data.tokenizer)
    train_data = load_preferences(a.train_file, a, tokenizer, num_responses=a.num_responses or None)
    K = train_data.labels.shape[1]
    eval_data = (
        load_preferences(a.eval_file, a, tokenizer, num_responses=K) if a.eval_file else None
    )
    order = BatchOrder(
        len(train_data), t.batch_size, t.seed, jax.process_index(), jax.process_count()
    )
    is_reward = a.loss in REWARD_LOSSES
    ref_params = s.reference_params()
    online = not is_reward and not a.precompute_reference
    if not is_reward and a.precompute_reference:
        ref_source = (
            str(checkpoints.resolve(a.reference_checkpoint or a.policy_checkpoint))
            if (a.reference_checkpoint or a.policy_checkpoint)
            else f"init seed {t.seed}"
        )
        key = _fingerprint(
            ref_source,
            _file_stamp(a.train_file),
            a.eval_file and _file_stamp(a.eval_file),
            a.max_len,
            K,
            a.format,
            a.loss in LISTWISE_LOSSES,
            cfg.model.to_dict(),
        )
        sets = {"train": train_data, **({"eval": eval_data} if eval_data else {})}
        precompute_reference(s, ref_params, sets, workdir, key)

    step_fn = make_align_step(
        a, s.score_rows, s.tx, s.schedule, nonfinite=t.nonfinite, online_reference=online
    )
    rep = parallel.replicated(s.mesh)
    if online:
        jitted = jax.jit(
            step_fn,
            in_shardings=(s.state_shardings, s.batch_sharding, s.state_shardings.params),
            out_shardings=(s.state_shardings, rep),
            donate_argnums=(0,),
        )

        def train_step(state, batch):
            return jitted(state, batch, ref_params)
    else:
        train_step = jax.jit(
            step_fn,
            in_shardings=(s.state_shardings, s.batch_sharding),
            out_shardings=(s.state_shardings, rep),
            donate_argnums=(0,),
        )

    def init_state():
        return initial_state(s, s.init_params(), t.seed)

    ckpt = Checkpointer(workdir, keep=t.keep_checkpoints, async_save=t.async_checkpointing)
    start, state, finished = restore_or_init(
        ckpt, workdir, t.steps, s.abstract_state, init_state, order.set_state, config_dict
    )
    if finished is not None:
        return TrainResult(start, None, finished, workdir, state)
    kind = "reward model" if is_reward else "policy"
    _log(
        f"{kind}: {s.model.num_params():,} params; loss {a.loss}; "
        f"{len(train_data)} {resolved_format(a)} records (K={K})"
        + (f", {len(eval_data)} held out" if eval_data else "")
        + f"; mesh {dict(s.mesh.shape)} on {len(devices)} {devices[0].platform} device(s)"
        + (f"; starting from {a.policy_checkpoint}" if a.policy_checkpoint else "; fresh init")
    )

    writer = MetricWriter(workdir, tensorboard=t.tensorboard, resume_step=start)

    def run_eval(params):
        return evaluate_policy(s, params, ref_params, eval_data, seed=t.seed)

    if start == 0 and a.eval_at_start:  # every process: the eval runs collectives
        row = run_eval(state.params)
        writer.write(0, row)
        _log("start: " + _describe_eval(row))

    tokens_per_step = int(t.batch_size * K * a.max_len)
    state, stopped_by, last_row = run_loop(
        t,
        state,
        start,
        train_step=train_step,
        next_batch=lambda: _sharded(train_data.take(next(order)), s.batch_sharding),
        data_state=order.get_state,
        ckpt=ckpt,
        config_dict=config_dict,
        writer=writer,
        tokens_per_step=tokens_per_step,
        describe=lambda m: (
            f"loss {float(m['loss']):.4f}  reward_acc {float(m['reward_accuracy']):.3f}  "
            f"margin {float(m['reward_margin']):.3f}  lr {float(m['lr']):.2e}"
        ),
        run_eval=run_eval,
        nonfinite_fix="Lower optimizer.lr or align.beta, or set train.nonfinite=skip.",
    )
    final_step = int(jax.device_get(state.step))
    result = dict(last_row)
    if stopped_by is None and final_step == t.steps:
        _log("end: " + _describe_eval(result))
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "final.json"), "w") as f:
                json.dump({k: _jsonable(v) for k, v in result.items()}, f, indent=2)
    return TrainResult(final_step, stopped_by, result, workdir, state)


def _describe_eval(row: dict) -> str:
    names = (
        ("eval_answer_exact_match", "greedy accuracy"),
        ("eval_sample_reward", "sample reward"),
        ("eval_kl", "KL"),
        ("eval_response_length", "length"),
        ("eval_reward_accuracy", "held-out reward acc"),
        ("eval_loss", "held-out loss"),
    )
    parts = [f"{label} {row[k]:.4g}" for k, label in names if k in row]
    return ", ".join(parts) or "no eval metrics"


def load_model(path: str, devices=None):
    """(model, params, cfg) of a policy or reward-model checkpoint, unsharded use.

    For a reward model (`align.loss = bradley_terry`) the model is a
    `RewardModel`; otherwise a `PureModel`.
    """
    devices = list(jax.devices() if devices is None else devices)
    ref = checkpoints.resolve(path)
    cfg = checkpoints.saved_config(ref)
    d = cfg.to_dict()
    d["mesh"] = {"data": -1, "fsdp": 1, "tensor": 1}
    cfg = config_lib.from_dict(d)
    model_cfg = check_config(
        cfg,
        num_devices=len(devices),
        process_count=jax.process_count(),
        extra_groups_allowed=("align",),
    )
    param = make_parameterization(cfg, model_cfg)
    model: Any = PureModel(model_cfg, param)
    if cfg.get("align", {}).get("loss") in REWARD_LOSSES:
        from lm_align.align.reward import RewardModel

        model = RewardModel(model_cfg, param)
    mesh = parallel.make_mesh(cfg.mesh, devices)
    abstract = with_shardings(
        model.abstract_params,
        parallel.logical_to_sharding(model.logical_axes, model.abstract_params, mesh),
    )
    return model, checkpoints.load_params(ref, abstract), cfg
