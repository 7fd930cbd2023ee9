"""The alignment objectives by name: `align.loss` -> per-example loss from row scores.

Every objective sees the same `Scores` of a list batch [B, K] (pairs are
K = 2 lists, chosen first) and returns the loss per example [B]:

| kind            | names | trains on | loss of |
|-----------------|-------|-----------|---------|
| pairwise        | dpo, ipo, slic, rso_hinge, rso_hinge_norm, rso_sigmoid_norm, geometric_dpo | pairs | policy and reference log-probs (`lm_align.losses.preference`) |
| listwise        | lipo_lambda, list_mle, softmax, pair_logistic, pair_hinge, point_mse, point_sigmoid | lists (or pairs) | implicit rewards beta * (log pi - log ref) (`lm_align.losses.listwise`) |
| reward          | bradley_terry | pairs | a reward model's scalar rewards |
| policy_gradient | reinforce, bon_rlb, bon_rlb_p, bon_aware_sft, bon_imitation, bon_sft | sampled responses with rewards | policy log-probs (`lm_align.losses.policy_gradient`) |

The loss formulas, their papers and worked numbers are in docs/alignment.md,
docs/listwise.md and docs/self_improvement.md (the BoN-aware losses of Chow et
al. 2024: `bon_rlb` is BoN-RLB, `bon_rlb_p` BoN-RLB(P), `bon_aware_sft` the
paper's BoN-SFT). A new objective is one function registered here with
`register(name, kind)`; the config's list of valid losses and the data
layout it trains on follow from the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lm_align.losses import listwise, policy_gradient, preference

KINDS = ("pairwise", "listwise", "reward", "policy_gradient")


@dataclasses.dataclass(frozen=True)
class Scores:
    """Row scores of one batch. For pairs, column 0 is the chosen response."""

    policy: jax.Array  # [B, K] sequence log-probs (a reward model: its rewards)
    reference: jax.Array  # [B, K] the frozen reference's log-probs (zeros when unused)
    batch: dict  # labels [B, K], mask [B, K], lengths [B, K], soft_label [B], ...
    beta: float

    @property
    def implicit(self) -> jax.Array:
        """[B, K] implicit rewards beta * (log pi - log ref)."""
        return self.beta * (self.policy - self.reference)

    @property
    def pair(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(policy chosen, policy rejected, reference chosen, reference rejected), each [B]."""
        return self.policy[:, 0], self.policy[:, 1], self.reference[:, 0], self.reference[:, 1]


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    kind: str  # one of KINDS
    fn: Callable[[Any, Scores], jax.Array]  # (align config, scores) -> loss [B]
    uses_reference: bool = True  # False: the loss ignores the reference log-probs


OBJECTIVES: dict[str, Objective] = {}


def register(name: str, kind: str, *, uses_reference: bool = True):
    """Decorator: registers `fn(a, scores) -> loss [B]` as the objective `name`."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; use one of {KINDS}")

    def add(fn):
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is registered twice")
        OBJECTIVES[name] = Objective(name, kind, fn, uses_reference)
        return fn

    return add


def names(kind: str) -> tuple[str, ...]:
    """The registered objectives of `kind`, in registration order."""
    return tuple(o.name for o in OBJECTIVES.values() if o.kind == kind)


# ---------------------------------------------------------------------------
# Pairwise: log-probs of the chosen and the rejected response.


@register("dpo", "pairwise")
def _dpo(a, s: Scores):
    return preference.dpo(*s.pair, beta=a.beta, label_smoothing=a.label_smoothing)


@register("ipo", "pairwise")
def _ipo(a, s: Scores):
    lengths = s.batch["lengths"] if a.ipo_length_normalized else None
    return preference.ipo(
        *s.pair,
        beta=a.beta,
        chosen_lengths=None if lengths is None else lengths[:, 0],
        rejected_lengths=None if lengths is None else lengths[:, 1],
    )


@register("slic", "pairwise", uses_reference=False)
def _slic(a, s: Scores):
    # SLiC-HF: hinge on the policy margin plus lambda * NLL of the chosen response.
    chosen, rejected = s.policy[:, 0], s.policy[:, 1]
    return preference.slic(chosen, rejected, margin=a.margin) - a.slic_reg_weight * chosen


@register("rso_hinge", "pairwise", uses_reference=False)
def _rso_hinge(a, s: Scores):
    return preference.rso_hinge(s.policy[:, 0], s.policy[:, 1], gamma=a.gamma)


@register("rso_hinge_norm", "pairwise")
def _rso_hinge_norm(a, s: Scores):
    return preference.rso_hinge_norm(*s.pair, gamma=a.gamma)


@register("rso_sigmoid_norm", "pairwise")
def _rso_sigmoid_norm(a, s: Scores):
    return preference.rso_sigmoid_norm(*s.pair, gamma=a.gamma)


@register("geometric_dpo", "pairwise")
def _geometric_dpo(a, s: Scores):
    return preference.geometric_dpo(*s.pair, beta=a.beta, soft_labels=s.batch["soft_label"])


# ---------------------------------------------------------------------------
# Listwise: ranking losses on the implicit rewards of a list.


@register("lipo_lambda", "listwise")
def _lipo_lambda(a, s: Scores):
    b = s.batch
    return listwise.lipo_lambda(s.implicit, b["labels"], b["mask"], reduction=a.lipo_reduction)


def _register_listwise(name: str, fn: Callable) -> None:
    register(name, "listwise")(lambda a, s: fn(s.implicit, s.batch["labels"], s.batch["mask"]))


_register_listwise("list_mle", listwise.list_mle)
_register_listwise("softmax", listwise.softmax_cross_entropy)
_register_listwise("pair_logistic", listwise.pair_logistic)
_register_listwise("pair_hinge", listwise.pair_hinge)
_register_listwise("point_mse", listwise.point_mse)
_register_listwise("point_sigmoid", listwise.point_sigmoid)


# ---------------------------------------------------------------------------
# Reward model: Bradley-Terry on the scalar rewards of a pair.


@register("bradley_terry", "reward", uses_reference=False)
def _bradley_terry(a, s: Scores):
    r_w, r_l = s.policy[:, 0], s.policy[:, 1]
    loss = preference.bradley_terry(r_w, r_l, margin=a.reward_margin)
    if a.reward_centering:
        loss = loss + a.reward_centering * preference.reward_centering(r_w, r_l)
    return loss


# ---------------------------------------------------------------------------
# Policy gradient on sampled responses; the labels are the samples' rewards.


def _register_policy_gradient(name: str) -> None:
    fn = getattr(policy_gradient, name)
    register(name, "policy_gradient", uses_reference=False)(
        lambda a, s: fn(s.policy, s.batch["labels"], s.batch["mask"])
    )


for _name in ("reinforce", "bon_rlb", "bon_rlb_p", "bon_aware_sft", "bon_imitation", "bon_sft"):
    _register_policy_gradient(_name)


# ---------------------------------------------------------------------------


# Metrics averaged only over the records where another metric is 1: a list
# whose labels are all equal has no label-ordered pair, so no reward accuracy.
METRIC_WEIGHTS = {"reward_accuracy": "reward_pairs", "reward_margin": "reward_pairs"}


def pair_metrics(s_BK, labels_BK, mask_BK) -> dict[str, jax.Array]:
    """Per list: accuracy and margin of the scores over label-ordered pairs.

    For every pair (i, j) of real responses with labels_i > labels_j:
    accuracy = mean(1[s_i > s_j] + 0.5 * 1[s_i == s_j]), margin = mean(s_i - s_j).
    A tie counts as half right, so identical policy and reference give 0.5.
    ``reward_pairs`` is 1 where the list has at least one such pair, else 0;
    the list's accuracy and margin are then undefined (returned as 0) and the
    batch means leave it out (``METRIC_WEIGHTS``, ``weighted_sums``).
    """
    valid = mask_BK[:, :, None] & mask_BK[:, None, :]
    ordered = (labels_BK[:, :, None] > labels_BK[:, None, :]) & valid  # [B, K, K], i beats j
    diff = s_BK[:, :, None] - s_BK[:, None, :]
    count = jnp.sum(ordered, axis=(1, 2))
    n = jnp.maximum(count, 1)
    return {
        "reward_accuracy": jnp.sum(ordered * ((diff > 0) + 0.5 * (diff == 0)), axis=(1, 2)) / n,
        "reward_margin": jnp.sum(jnp.where(ordered, diff, 0.0), axis=(1, 2)) / n,
        "reward_pairs": (count > 0).astype(jnp.float32),
    }


def weighted_sums(loss_B, metrics, weight_B) -> dict[str, jax.Array]:
    """Sums over a batch, with each metric's own count: `{name: sum, name/count: count}`.

    `loss` and every metric sum `v * weight_B`; a metric in `METRIC_WEIGHTS`
    sums `v * weight_B * metrics[its weight]` instead (records without a
    label-ordered pair leave reward accuracy and margin). Sums of several
    batches add up; `means_of_sums` divides.
    """
    out = {"loss": jnp.sum(loss_B * weight_B), "loss/count": jnp.sum(weight_B)}
    for k, v in metrics.items():
        w = weight_B * metrics[METRIC_WEIGHTS[k]] if k in METRIC_WEIGHTS else weight_B
        out[k], out[f"{k}/count"] = jnp.sum(v * w), jnp.sum(w)
    return out


def means_of_sums(sums: dict) -> dict:
    """`sum / max(count, 1)` per name of `weighted_sums` output (summed over batches)."""
    names = [k for k in sums if not k.endswith("/count")]
    return {k: sums[k] / jnp.maximum(sums[f"{k}/count"], 1.0) for k in names}


def weighted_means(loss_B, metrics, weight_B) -> dict[str, jax.Array]:
    """Batch means with per-example weights (padding rows weigh 0) and `METRIC_WEIGHTS`."""
    return means_of_sums(weighted_sums(loss_B, metrics, weight_B))


def objective(a, scores_BK, ref_BK, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss [B], metrics {name: [B]}) of the objective `a.loss` for row scores.

    `scores_BK`: policy log-probs (a reward model's rewards for kind
    "reward"); `ref_BK`: reference log-probs (ignored where the objective does
    not use them). Metrics: reward accuracy and margin of the implicit rewards
    (`pair_metrics`), for pairs the chosen/rejected rewards and log-probs, and
    with ``a.nll_weight`` the anchor's NLL, which is added to the loss: the
    per-token NLL of the best-labelled response (pairs: the chosen), as in
    iterative RPO (Pang et al. 2024, arXiv:2404.19733).
    """
    obj = OBJECTIVES[a.loss]
    s = Scores(scores_BK, ref_BK, batch, a.beta)
    loss = obj.fn(a, s)
    implicit = scores_BK if obj.kind == "reward" else s.implicit
    labels, mask = batch["labels"], batch["mask"]
    metrics = pair_metrics(jax.lax.stop_gradient(implicit), labels, mask)
    if a.nll_weight and obj.kind != "reward":
        best = jnp.argmax(jnp.where(mask, labels, -jnp.inf), axis=1)
        lp_best = jnp.take_along_axis(scores_BK, best[:, None], axis=1)[:, 0]
        n_best = jnp.take_along_axis(batch["lengths"], best[:, None], axis=1)[:, 0]
        nll = -lp_best / jnp.maximum(n_best, 1.0)
        loss = loss + a.nll_weight * nll
        metrics["nll"] = nll
    if scores_BK.shape[1] == 2 and obj.kind in ("pairwise", "reward"):
        metrics["reward_chosen"] = implicit[:, 0]
        metrics["reward_rejected"] = implicit[:, 1]
        metrics["logp_chosen"] = scores_BK[:, 0]
        metrics["logp_rejected"] = scores_BK[:, 1]
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
