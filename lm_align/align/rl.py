"""Online RL with verifiable rewards: `lm-align rl --config experiments/rl_arithmetic.py:grpo`.

A policy (from a checkpoint, or LoRA adapters on it) samples ``rl.group_size``
responses to each of ``train.batch_size`` prompts of the data source's train
split with the KV-cache sampler (`lm_align.sampling.generate`); the task's
verifier (``rl.scorer``) rewards each response; the policy is then updated on
that rollout with the clipped group-relative objective of
`lm_align.losses.rl` (GRPO, Dr. GRPO, DAPO, RLOO: :data:`ALGORITHMS`), and the
next rollout is sampled from the updated policy.

One step of the run is one optimizer update. A rollout of B x G responses
feeds ``rl.epochs x rl.minibatches`` updates (an epoch is one pass over the
rollout in ``rl.minibatches`` shuffled minibatches); with more than one, the
importance ratios ``pi / pi_old`` of the later updates are taken against the
policy that sampled. ``train.grad_accum_steps`` splits each minibatch into
micro-batches whose losses and gradients add up to the minibatch's exactly
(the aggregation weights are computed over the minibatch:
`lm_align.losses.rl.aggregation_weights`).

Per rollout, before any update and without gradient: the sampling policy's
log-prob of every response token (``old_logp``; recomputed by the trainer's
forward pass, so with one update per rollout every ratio is exactly 1), the
reference's (for the KL term when ``rl.kl_coef > 0``, and the ``kl`` metric in
every run; with LoRA the reference
is the base, adapters off) and the entropy of each sampled position. DAPO's
dynamic sampling (``rl.dynamic_sampling``) draws further prompt batches until
B groups whose rewards differ are found (at most ``rl.max_sampling_rounds``
batches; groups still missing are filled with degenerate ones, weight 0).

Resuming: the run is checkpointed and resumed like every trainer
(`lm_align.train.run.Run`); the prompt order and the sampling keys are
functions of the seed and the rollout number, and a rollout whose updates
span a checkpoint is kept in WORKDIR/rollout.npz, so a resumed run repeats
the uninterrupted one's losses exactly.

Metrics (docs/rl.md): loss, reward (mean over the rollout's responses),
pass_rate (fraction with reward > 0.5), clip_fraction, kl (per-token estimate
to the reference), entropy, ratio_mean, response_length, degenerate_groups
(fraction of sampled groups with equal rewards), and at eval steps greedy
accuracy, pass@k and KL on the eval split (`lm_align.align.policy_eval`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from lm_align import data as data_lib
from lm_align import parallel
from lm_align.align.logprobs import masked_token_logprobs
from lm_align.align.rl_config import (  # noqa: F401  (the recipes, re-exported)
    ALGORITHMS,
    RL_DEFAULTS,
    check_rl,
    matching_algorithm,
    rl_base_config,
    updates_per_rollout,
)
from lm_align.align.setup import AlignSetup, initial_state, setup
from lm_align.config import ConfigError
from lm_align.losses import rl as rl_losses
from lm_align.models.lora import describe as describe_lora
from lm_align.sampling import generate, prompt_ids
from lm_align.train.run import Loop, Run, TrainResult
from lm_align.train.step import apply_update
from lm_align.utils import log

NONFINITE_FIX = "Lower optimizer.lr, or set train.nonfinite=skip."


# ---------------------------------------------------------------------------
# Rollouts: sampling, rewards, rows.


@dataclasses.dataclass
class Rollout:
    """B prompts x G responses, as rows the trainer scores, with their rewards."""

    rows: dict[str, np.ndarray]  # five features [B * G, L] (row b * G + g)
    rewards: np.ndarray  # float32 [B, G], after reward shaping
    valid: np.ndarray  # bool [B]: groups trained on (False: dynamic-sampling filler)
    stats: dict[str, float]  # reward, pass_rate, response_length, degenerate_groups, ...
    prompts: list[str]
    responses: list[list[str]]

    def arrays(self) -> dict[str, np.ndarray]:
        return {**{f"rows/{k}": v for k, v in self.rows.items()}, "rewards": self.rewards,
                "valid": self.valid}  # fmt: skip


def response_rows(
    tokenizer, prompts: list[str], responses: list[list[list[int]]], max_len: int
) -> dict[str, np.ndarray]:
    """Rows ``[bos] + prompt + response`` (right-padded to `max_len`) of each
    response, in the layout of `lm_align.data.preference.to_batch`: inputs =
    doc[:-1], targets = doc[1:], loss_mask 1 exactly on the response's targets
    (its eos included), segment_ids 1 on tokens, positions 0...."""
    R = sum(len(rs) for rs in responses)
    out = {
        "inputs": np.full((R, max_len), tokenizer.pad_id, np.int32),
        "targets": np.full((R, max_len), tokenizer.pad_id, np.int32),
        "loss_mask": np.zeros((R, max_len), np.float32),
        "segment_ids": np.zeros((R, max_len), np.int32),
        "positions": np.zeros((R, max_len), np.int32),
    }
    r = 0
    for prompt, group in zip(prompts, responses, strict=True):
        head = prompt_ids(tokenizer, prompt)
        for ids in group:
            doc = head + list(ids)
            n = len(doc) - 1
            if n > max_len:
                raise ConfigError(
                    f"prompt {prompt!r} ({len(head)} tokens) + {len(ids)} response tokens "
                    f"exceed rl.max_len={max_len}; raise rl.max_len to at least {n}"
                )
            out["inputs"][r, :n] = doc[:-1]
            out["targets"][r, :n] = doc[1:]
            out["loss_mask"][r, len(head) - 1 : n] = 1.0
            out["segment_ids"][r, :n] = 1
            out["positions"][r, :n] = np.arange(n)
            r += 1
    return out


class PromptOrder:
    """Which train prompts each prompt batch holds: seeded epochs of permutations of
    the source, or for a source too large to permute (a generated task's index
    space) independent uniform draws. The state (batches dealt) is saved with
    checkpoints; batch k depends on the seed and k only."""

    PERMUTE_UP_TO = 1 << 24

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise ConfigError(
                f"train.batch_size={batch_size} prompts per rollout but the train split has "
                f"only {n}; lower train.batch_size to at most {n}"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.dealt = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def __next__(self) -> np.ndarray:
        k, self.dealt = self.dealt, self.dealt + 1
        if self.n > self.PERMUTE_UP_TO:
            return np.random.default_rng([self.seed, k]).integers(0, self.n, self.batch_size)
        per_epoch = self.n // self.batch_size
        epoch, position = divmod(k, per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1][position * self.batch_size : (position + 1) * self.batch_size]

    def get_state(self) -> dict:
        return {"dealt": self.dealt}

    def set_state(self, state: dict) -> None:
        self.dealt = int(state["dealt"])


class Sampler:
    """Draws rollouts from a policy on the train split's prompts (`Rollout`)."""

    def __init__(self, s: AlignSetup, tokenizer, scorer, source, order: PromptOrder):
        self.s, self.r = s, s.cfg.rl
        self.tokenizer, self.scorer, self.source, self.order = tokenizer, scorer, source, order
        self.key = jax.random.key(s.cfg.train.seed)

    def _draw(self, policy_params, number: int, round_: int):
        r, tok = self.r, self.tokenizer
        prompts = [self.source[int(i)]["prompt"] for i in next(self.order)]
        out = generate(
            self.s.policy_model, policy_params, [prompt_ids(tok, p) for p in prompts],
            max_new_tokens=r.max_new_tokens, num_samples=r.group_size,
            rng=jax.random.fold_in(jax.random.fold_in(self.key, number), round_),
            temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
            stop_tokens=[tok.eos_id], pad_id=tok.pad_id, mesh=self.s.mesh,
            vocab_size=tok.vocab_size,
        )  # fmt: skip
        tokens = np.asarray(jax.device_get(out.tokens))
        lengths = np.asarray(jax.device_get(out.lengths))
        G = r.group_size
        ids = [[tokens[b * G + g, : lengths[b * G + g]].tolist() for g in range(G)]
               for b in range(len(prompts))]  # fmt: skip
        texts = [[self._decode(x) for x in group] for group in ids]
        flat_prompts = [p for p in prompts for _ in range(G)]
        raw = np.asarray(self.scorer(flat_prompts, [t for g in texts for t in g]), np.float32)
        return prompts, ids, texts, raw.reshape(len(prompts), G), lengths.reshape(-1, G)

    def _decode(self, ids):
        from lm_align.sampling import decode_response

        return decode_response(self.tokenizer, ids)

    def rollout(self, policy_params, number: int) -> Rollout:
        """Rollout `number` (0, 1, ...): one prompt batch, or with dynamic sampling as many
        as it takes (at most rl.max_sampling_rounds) to fill B groups whose rewards differ."""
        r, B = self.r, self.s.cfg.train.batch_size
        kept: list[tuple] = []
        spare: list[tuple] = []
        drawn = degenerate = 0
        all_raw = []
        for round_ in range(r.max_sampling_rounds if r.dynamic_sampling else 1):
            prompts, ids, texts, raw, lengths = self._draw(policy_params, number, round_)
            all_raw.append(raw)
            flat = np.asarray(rl_losses.degenerate_groups(raw))
            drawn += len(prompts)
            degenerate += int(flat.sum())
            for b in range(len(prompts)):
                group = (prompts[b], ids[b], texts[b], raw[b], lengths[b])
                (spare if (r.dynamic_sampling and flat[b]) else kept).append(group)
            if len(kept) >= B:
                break
        valid = np.arange(B) < len(kept)
        groups = (kept + spare)[:B]
        prompts = [g[0] for g in groups]
        raw = np.stack([g[3] for g in groups])
        lengths = np.stack([g[4] for g in groups])
        rewards = raw.copy()
        if r.overlong_buffer:
            rewards += np.asarray(rl_losses.overlong_penalty(
                lengths, max_tokens=r.max_new_tokens, buffer=r.overlong_buffer))  # fmt: skip
        sampled = np.concatenate(all_raw)
        stats = {
            "reward": float(np.mean(rewards[valid])) if valid.any() else float("nan"),
            "pass_rate": float(np.mean(sampled > 0.5)),
            "response_length": float(np.mean(lengths)),
            "degenerate_groups": degenerate / drawn,
            "sampling_rounds": len(all_raw),
            "groups_kept": float(np.mean(valid)),
        }
        rows = response_rows(self.tokenizer, prompts, [g[1] for g in groups], r.max_len)
        return Rollout(rows, rewards.astype(np.float32), valid, stats, prompts,
                       [g[2] for g in groups])  # fmt: skip


# ---------------------------------------------------------------------------
# The jitted pieces: scoring a rollout, one update.


def make_prepare(s: AlignSetup):
    """`(policy_params, ref_params, rows, rewards, valid) -> dict` of per-row arrays the
    updates consume: old_logp, ref_logp, entropy [R, L], adv [R], mask [R, L] (0 on
    dropped groups), all without gradient. The reference is scored whatever
    `rl.kl_coef`: the `kl` metric estimates the KL to it in every run."""
    r = s.cfg.rl
    constrain = _constrain(s)

    def prepare(policy_params, ref_params, rows, rewards, valid):
        old = masked_token_logprobs(s.policy_model, policy_params, rows, constrain_BLD=constrain,
                                    entropy=True)  # fmt: skip
        G = r.group_size
        adv = rl_losses.advantages(rewards, kind=r.advantage).reshape(-1)
        mask = rows["loss_mask"] * jnp.repeat(valid.astype(jnp.float32), G)[:, None]
        out = {"old_logp": old.logps, "entropy": old.entropy, "adv": adv, "mask": mask}
        # The reference's log-probs: the KL term's (rl.kl_coef > 0), and the `kl` metric's
        # either way.
        ref = masked_token_logprobs(s.policy_model, ref_params, rows, constrain_BLD=constrain)
        out["ref_logp"] = ref.logps
        return jax.lax.stop_gradient(out)

    return prepare


def _constrain(s: AlignSetup):
    batch_sh = s.batch_sharding
    return lambda x: jax.lax.with_sharding_constraint(x, batch_sh)


def make_rl_step(s: AlignSetup):
    """`(state, minibatch, frozen) -> (state, metrics)`: one update on a minibatch.

    The minibatch holds ``rows`` (five features [M, L]), ``old_logp``,
    ``ref_logp`` (with a KL term), ``mask`` [M, L] and ``adv`` [M]; it is split
    into ``train.grad_accum_steps`` micro-batches (row i in micro-batch
    i mod k) whose losses use the minibatch's aggregation weights, so their
    sum is the minibatch loss and its gradient exactly. `frozen` is the LoRA
    base (or None).
    """
    r, t = s.cfg.rl, s.cfg.train
    k = t.grad_accum_steps
    merge = None if s.lora is None else s.lora.merge
    constrain = _constrain(s)
    normalizer = r.constant_normalizer or r.max_new_tokens

    def loss_fn(params, micro, frozen):
        policy = params if merge is None else merge(frozen, params)
        logp = masked_token_logprobs(s.policy_model, policy, micro["rows"],
                                     constrain_BLD=constrain).logps  # fmt: skip
        out = rl_losses.policy_loss(
            logp, micro["old_logp"], micro["adv"], micro["mask"], eps_low=r.eps_low,
            eps_high=r.eps_high, ref_logp=micro.get("ref_logp"), kl_coef=r.kl_coef,
            kl_estimator=r.kl_estimator, weights=micro["weights"],
        )  # fmt: skip
        tokens = jnp.sum(micro["mask"])
        stats = {"clip_fraction": out.clip_fraction * tokens, "kl": out.kl * tokens,
                 "ratio_mean": out.ratio_mean * tokens}  # fmt: skip
        return out.loss, stats

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, mb, frozen=None):
        mb = dict(mb)
        mb["weights"] = rl_losses.aggregation_weights(mb["mask"], r.aggregation, normalizer)
        # [M, ...] -> [k, M / k, ...] with row i in micro-batch i mod k: each device keeps
        # its rows of every micro-batch.
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, k, *x.shape[1:]), 0, 1), mb)

        def body(acc, m):
            (loss, stats), g = grad_fn(state.params, m, frozen)
            return jax.tree.map(jnp.add, acc, (loss, stats, g)), None

        zero_stats = {n: jnp.zeros((), jnp.float32) for n in ("clip_fraction", "kl", "ratio_mean")}
        zeros = (jnp.zeros((), jnp.float32), zero_stats, jax.tree.map(jnp.zeros_like, state.params))
        (loss, stats, grads), _ = jax.lax.scan(body, zeros, micro)
        tokens = jnp.maximum(jnp.sum(mb["mask"]), 1.0)
        new, update_metrics, _ = apply_update(state, grads, loss, s.tx, s.schedule,
                                              nonfinite=t.nonfinite)  # fmt: skip
        metrics = {"loss": loss, **{n: v / tokens for n, v in stats.items()}, **update_metrics}
        return new, metrics

    return step


# ---------------------------------------------------------------------------
# The run.


class _Rollouts:
    """The current rollout, scored, and the minibatches it deals; resumable at any update.

    With several updates per rollout the scored rollout is kept in
    WORKDIR/rollout.npz, so that a run resumed between two of its updates
    trains on the same rollout (the policy that sampled it is gone).
    """

    def __init__(self, s: AlignSetup, sampler: Sampler, prepare, workdir: str):
        self.s, self.r, self.sampler, self.prepare = s, s.cfg.rl, sampler, prepare
        self.path = os.path.join(workdir, "rollout.npz")
        self.U = updates_per_rollout(self.r)
        self.number = -1  # the rollout held
        self.prepared: dict = {}
        self.stats: dict[str, float] = {}

    def minibatch(self, step: int, policy_params: Callable[[], Any], ref_params) -> dict:
        """The minibatch of update `step` (1-based), sampling a rollout when one starts
        (`policy_params()`, called only then, gives the sampling policy's parameters)."""
        number, within = divmod(step - 1, self.U)
        if number != self.number:
            if within:
                self._load(number)
            else:
                self._sample(number, policy_params(), ref_params)
        r = self.r
        epoch, part = divmod(within, r.minibatches)
        R = len(self.prepared["adv"])
        if r.minibatches == 1:
            return self.prepared
        size = R // r.minibatches
        perm = np.random.default_rng([self.s.cfg.train.seed, number, epoch]).permutation(R)
        index = perm[part * size : (part + 1) * size]
        return jax.tree.map(lambda x: x[index], self.prepared)

    def _sample(self, number: int, policy_params, ref_params) -> None:
        rollout = self.sampler.rollout(policy_params, number)
        rows = jax.device_put(rollout.rows, self.s.batch_sharding)
        scored = jax.device_get(
            self.prepare(policy_params, ref_params, rows, rollout.rewards, rollout.valid)
        )
        entropy = scored.pop("entropy")
        self.prepared = {**scored, "rows": rollout.rows}
        self.stats = {**rollout.stats, "entropy": _masked_mean(entropy, scored["mask"])}
        self.number = number
        if self.U > 1 and jax.process_index() == 0:
            flat = {k: v for k, v in scored.items()}
            flat.update({f"rows/{k}": v for k, v in rollout.rows.items()})
            tmp = self.path + ".tmp.npz"
            np.savez(tmp, number=np.array(number), stats=np.array(json.dumps(self.stats)), **flat)
            os.replace(tmp, self.path)

    def _load(self, number: int) -> None:
        if not os.path.exists(self.path):
            raise ConfigError(
                f"the checkpoint is inside rollout {number} but {self.path} is missing; "
                "restore it or start the run over in a new workdir"
            )
        saved = np.load(self.path)
        if int(saved["number"]) != number:
            raise ConfigError(
                f"{self.path} holds rollout {int(saved['number'])} but the checkpoint is "
                f"inside rollout {number}; restore the matching file or start over"
            )
        self.prepared = {k: saved[k] for k in saved.files if k not in ("number", "stats")
                         and not k.startswith("rows/")}  # fmt: skip
        self.prepared["rows"] = {k[5:]: saved[k] for k in saved.files if k.startswith("rows/")}
        self.stats = json.loads(str(saved["stats"]))
        self.number = number


def _describe_start(s: AlignSetup, n_prompts: int, devices) -> str:
    r, t = s.cfg.rl, s.cfg.train
    U = updates_per_rollout(r)
    return (
        f"policy: {s.policy_model.num_params():,} params; {matching_algorithm(r)} "
        f"(advantage {r.advantage}, aggregation {r.aggregation}, clip [{1 - r.eps_low:g}, "
        f"{1 + r.eps_high:g}], kl {r.kl_coef:g}"
        + (", dynamic sampling" if r.dynamic_sampling else "")
        + f"); {t.batch_size} prompts x {r.group_size} responses per rollout, {U} update(s) "
        f"each, {-(-t.steps // U)} rollouts; {n_prompts:,} train prompts; mesh {dict(s.mesh.shape)} "
        f"on {len(devices)} {devices[0].platform} device(s)"
        + (f"; starting from {r.policy_checkpoint}" if r.policy_checkpoint else "; fresh init")
        + ("" if s.lora is None else "\n" + describe_lora(s.lora, s.policy_model,
                                                          r.policy_checkpoint)
           + "; the reference is the base (adapters off)")
    )  # fmt: skip


def _jit(s: AlignSetup, with_frozen: bool):
    """The jitted update (donating the state) and rollout scoring, sharded on `s.mesh`."""
    step_fn = jax.jit(
        parallel.in_mesh(make_rl_step(s), s.mesh),
        in_shardings=(
            s.state_shardings,
            s.batch_sharding,
            s.policy_shardings if with_frozen else None,
        ),
        out_shardings=(s.state_shardings, parallel.replicated(s.mesh)),
        donate_argnums=(0,),
    )
    prepare = jax.jit(
        parallel.in_mesh(make_prepare(s), s.mesh), out_shardings=parallel.replicated(s.mesh)
    )
    return step_fn, prepare


def _evaluator(s: AlignSetup, tokenizer, scorer, ref_params):
    """`params -> {"eval_...": value}`: greedy accuracy (per slice), pass@1, pass@k and
    KL to the reference on `rl.eval_prompts` held-out problems (distinct ones on
    arithmetic: `lm_align.align.experiment.held_out_prompts`); None without prompts."""
    from lm_align.align.experiment import held_out_prompts
    from lm_align.align.policy_eval import evaluate_policy

    r, t = s.cfg.rl, s.cfg.train
    prompts, slices = held_out_prompts(s.cfg.data, r.eval_prompts) if r.eval_prompts else ([], None)
    if not prompts:
        return None

    def run_eval(params):
        report = evaluate_policy(
            s.policy_model, s.model_params(params, ref_params), tokenizer, prompts, scorer,
            num_samples=r.eval_samples, ks=sorted({1, r.eval_samples}),
            max_new_tokens=r.max_new_tokens, seed=t.seed, reference_params=ref_params,
            slices=slices,
        )  # fmt: skip
        row = {f"eval_{k}": v for k, v in report.items() if isinstance(v, (int, float))}
        for name, cell in report.get("slices", {}).items():
            row[f"eval_greedy_accuracy/{name}"] = cell["greedy_accuracy"]
        return row

    return run_eval


def rl(cfg, workdir: str, *, devices=None) -> TrainResult:
    """Trains (or resumes) the online-RL experiment `cfg` in `workdir`."""
    from lm_align.data.scorers import make_scorer

    devices = list(jax.devices() if devices is None else devices)
    s = setup(cfg, devices, group="rl")
    run = Run(s.cfg, workdir)
    r, t = s.cfg.rl, s.cfg.train
    tokenizer = data_lib.make_tokenizer(s.cfg.data.tokenizer)
    scorer = make_scorer(r.scorer)
    train_src = data_lib.make_source(s.cfg.data, "train")
    order = PromptOrder(len(train_src), t.batch_size, t.seed)
    ref_params = s.reference_params()
    start, state, finished = run.restore_or_init(
        s.abstract_state, lambda: initial_state(s, s.init_params(), t.seed), order.set_state
    )
    if finished is not None:
        return TrainResult(start, None, finished, workdir, state)
    log(_describe_start(s, len(train_src), devices))
    frozen = ref_params if s.lora is not None else None
    step_fn, prepare = _jit(s, frozen is not None)
    rollouts = _Rollouts(s, Sampler(s, tokenizer, scorer, train_src, order), prepare, workdir)
    holder = {"state": state, "step": start}

    def next_batch():
        holder["step"] += 1
        policy = lambda: s.model_params(holder["state"].params, ref_params)
        mb = rollouts.minibatch(holder["step"], policy, ref_params)
        return parallel.global_batch(mb, s.batch_sharding)

    def train_step(state, batch):
        new, metrics = step_fn(state, batch, frozen)
        holder["state"] = new
        return new, {**metrics, **rollouts.stats}

    run_eval = _evaluator(s, tokenizer, scorer, ref_params)
    if start == 0 and r.eval_at_start and run_eval is not None:
        log("start: " + describe_eval(run.writer.write(0, run_eval(state.params))))
    loop = Loop(
        train_step=train_step,
        next_batch=next_batch,
        data_state=order.get_state,
        run_eval=run_eval or (lambda params: {}),
        describe=lambda m: (
            f"loss {float(m['loss']):.4f}  reward {float(m['reward']):.3f}  "
            f"clip {float(m['clip_fraction']):.3f}  kl {float(m['kl']):.4f}  "
            f"lr {float(m['lr']):.2e}"
        ),
        tokens_per_step=int(t.batch_size * r.group_size * r.max_len // r.minibatches),
        nonfinite_fix=NONFINITE_FIX,
    )
    state, stopped_by, row = run.loop(state, start, loop)
    result = run.finish(state, stopped_by, row)
    if result.stopped_by is None and result.final_step == t.steps and run_eval is not None:
        log("end: " + describe_eval(result.metrics))
    return result


def _masked_mean(x, mask) -> float:
    return float(np.sum(x * mask) / max(float(np.sum(mask)), 1.0))


def describe_eval(row: dict) -> str:
    keys = [k for k in row if k.startswith("eval_pass@")]
    parts = [f"greedy accuracy {row.get('eval_greedy_accuracy', float('nan')):.3f}"]
    parts += [f"{k[5:]} {row[k]:.3f}" for k in sorted(keys)]
    if "eval_kl" in row:
        parts.append(f"KL to reference {row['eval_kl']:.3f}")
    return ", ".join(parts)
