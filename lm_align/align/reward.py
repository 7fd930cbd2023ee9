"""Reward model: a Transformer backbone with a scalar head, r(x, y) in R.

Shape legend: B rows, L tokens per row, D model dim, N scored pairs.

A (prompt x, response y) pair is the row of :func:`lm_align.data.preference.to_batch`:
``inputs = [bos] + x + y`` right-padded to L (``segment_ids`` 1 on tokens, 0 on
padding). The reward reads the final-normed hidden state at the last real
input position, the last response token, which has attended to the whole
prompt and response::

    t_b    = max{t : segment_ids[b, t] > 0}
    r_b    = h[b, t_b] . w + b                 float32 [B]

Training is Bradley-Terry on preference pairs (Ouyang et al. 2022)::

    loss = mean_b -logsig(r(x, y_w) - r(x, y_l))     (losses.bradley_terry)

The head starts at w = 0, b = 0, so a reward model initialised from a policy
(:meth:`RewardModel.from_policy`, the usual start from the SFT model) gives
reward 0 to everything: every pair starts as a tie (loss log 2) and the
gradient of the head is the mean feature difference of the pairs.

    rm = RewardModel(TransformerConfig(...))
    params = rm.from_policy(sft_params)               # or rm.init(seed)
    r_B = rm.rewards(params, batch["chosen"])         # any leading shape [..., L]
    pairwise_accuracy(rm, params, batch)              # rm_accuracy, rm_margin, rm_loss
    score(rm, params, "byte", prompts, responses, max_len=128)   # np.ndarray [N]

Like :class:`lm_align.models.pure.PureModel`, parameters are a plain nested
dict ``{"backbone": <policy params>, "head": {"w": [D], "b": []}}`` with
``abstract_params`` and ``logical_axes`` trees, so the sharded trainer, optax
and orbax handle it unchanged. The head is float32 and has no width
multiplier; under a ``Parameterization`` its vector ``w`` is classified like
other vectors (embedding-type).

References:
  Ouyang et al. 2022, Training language models to follow instructions with
    human feedback, arXiv:2203.02155.
  Stiennon et al. 2020, Learning to summarize from human feedback,
    arXiv:2009.01325.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm_align.data.preference import OVERLONG_MODES, response_row
from lm_align.data.tokenizers import Tokenizer, make_tokenizer
from lm_align.losses.preference import bradley_terry
from lm_align.models.pure import PureModel
from lm_align.models.transformer import TransformerConfig
from lm_align.parameterization import Parameterization

REWARD_ROW_KEYS = ("inputs", "segment_ids", "positions")  # what rewards() reads


class RewardModel:
    """A :class:`PureModel` backbone plus a scalar head, as pure functions.

    Attributes:
      cfg: the backbone's TransformerConfig.
      backbone: the PureModel (its params are a policy's params).
      abstract_params: ``{"backbone": ..., "head": {"w": [D], "b": []}}`` of
        ShapeDtypeStruct (head float32).
      logical_axes: the same tree of logical axis names; head ``w`` is
        ``("embed",)``, ``b`` is ``()``.
    """

    def __init__(self, cfg: TransformerConfig, param: Parameterization | None = None):
        """`param`: the backbone's init stds and forward multipliers (see PureModel)."""
        self.cfg = cfg
        self.backbone = PureModel(cfg, param)
        D = cfg.d_model
        self.abstract_params = {
            "backbone": self.backbone.abstract_params,
            "head": {
                "w": jax.ShapeDtypeStruct((D,), jnp.float32),
                "b": jax.ShapeDtypeStruct((), jnp.float32),
            },
        }
        self.logical_axes = {
            "backbone": self.backbone.logical_axes,
            "head": {"w": ("embed",), "b": ()},
        }

    def _zero_head(self) -> dict[str, jax.Array]:
        # Zero head: every reward is exactly 0 at init, whatever the backbone.
        return {
            "w": jnp.zeros((self.cfg.d_model,), jnp.float32),
            "b": jnp.zeros((), jnp.float32),
        }

    def init(self, seed: int | jax.Array) -> dict[str, Any]:
        """Fresh parameters: the backbone as ``PureModel.init(seed)``, head w = 0, b = 0."""
        return {"backbone": self.backbone.init(seed), "head": self._zero_head()}

    def from_policy(self, policy_params: Any) -> dict[str, Any]:
        """Parameters whose backbone is ``policy_params`` (e.g. the SFT model), head 0.

        The policy must have this model's config (same parameter tree and
        shapes); its readout is kept in the tree but unused by the reward.
        """
        expected = self.backbone.abstract_params
        if jax.tree.structure(policy_params) != jax.tree.structure(expected):
            raise ValueError(
                "policy_params do not match the reward model's backbone parameter tree; "
                "build the RewardModel with the policy's TransformerConfig"
            )
        shapes = [tuple(jnp.shape(x)) for x in jax.tree.leaves(policy_params)]
        want = [tuple(x.shape) for x in jax.tree.leaves(expected)]
        if shapes != want:
            bad = next(i for i, (s, w) in enumerate(zip(shapes, want, strict=True)) if s != w)
            raise ValueError(
                f"policy_params leaf {bad} has shape {shapes[bad]}, the backbone expects "
                f"{want[bad]}; build the RewardModel with the policy's TransformerConfig"
            )
        return {"backbone": policy_params, "head": self._zero_head()}

    def apply(
        self,
        params: Any,
        tokens_BL: jax.Array,
        *,
        positions_BL: jax.Array | None = None,
        segment_ids_BL: jax.Array | None = None,
        constrain_BLD: Callable[[jax.Array], jax.Array] | None = None,
    ) -> jax.Array:
        """Rewards float32 [B]: ``h[b, t_b] . w + b`` at the last real position t_b.

        Args:
          params: ``{"backbone": ..., "head": {"w", "b"}}``.
          tokens_BL: int [B, L] inputs, one sequence per row.
          positions_BL: int [B, L] (default 0..L-1).
          segment_ids_BL: int [B, L], > 0 on tokens and 0 on padding (default
            all tokens). t_b is the last position with ``segment_ids > 0``; a
            row with no real token gets reward 0.
          constrain_BLD: applied to the residual stream (see Transformer).
        """
        hidden_BLD = self.backbone.apply(
            params["backbone"],
            tokens_BL,
            positions_BL=positions_BL,
            segment_ids_BL=segment_ids_BL,
            constrain_BLD=constrain_BLD,
            return_hidden=True,
        )
        B, L = tokens_BL.shape
        if segment_ids_BL is None:
            real_BL = jnp.ones((B, L), bool)
        else:
            real_BL = jnp.asarray(segment_ids_BL) > 0
        last_B = L - 1 - jnp.argmax(real_BL[:, ::-1], axis=-1)
        h_BD = jnp.take_along_axis(hidden_BLD, last_B[:, None, None], axis=1)[:, 0]
        head = params["head"]
        # Elementwise product and sum: float32 on every backend (no reduced-precision matmul).
        r_B = jnp.sum(h_BD.astype(jnp.float32) * head["w"].astype(jnp.float32), axis=-1)
        r_B = r_B + head["b"].astype(jnp.float32)
        return jnp.where(jnp.any(real_BL, axis=-1), r_B, 0.0)

    def rewards(
        self,
        params: Any,
        rows: Mapping[str, Any],
        constrain_BLD: Callable[[jax.Array], jax.Array] | None = None,
    ) -> jax.Array:
        """Rewards of rows of any leading shape [..., L] -> float32 [...].

        ``rows`` is a dict with int ``inputs``, ``segment_ids`` and ``positions``
        (e.g. ``to_batch(...)["chosen"]`` [B, L] or listwise
        ``["responses"]`` [B, K, L]; other keys are ignored). `constrain_BLD` is
        applied to the residual stream of the [rows, L] batch (see `apply`).
        """
        if not isinstance(rows, Mapping):
            raise ValueError(
                f"rows must be a dict with keys {REWARD_ROW_KEYS}, got {type(rows).__name__}"
            )
        missing = [k for k in REWARD_ROW_KEYS if k not in rows]
        if missing:
            raise ValueError(
                f"rows lack {missing}; expected the keys {REWARD_ROW_KEYS} (see to_batch)"
            )
        shapes = {k: tuple(jnp.shape(rows[k])) for k in REWARD_ROW_KEYS}
        if len(set(shapes.values())) != 1 or not shapes["inputs"]:
            raise ValueError(f"rows must share one shape [..., L]; got {shapes}")
        lead, L = shapes["inputs"][:-1], shapes["inputs"][-1]
        flat = {k: jnp.asarray(rows[k]).reshape(-1, L) for k in REWARD_ROW_KEYS}
        r = self.apply(
            params,
            flat["inputs"],
            positions_BL=flat["positions"],
            segment_ids_BL=flat["segment_ids"],
            constrain_BLD=constrain_BLD,
        )
        return r.reshape(lead)

    def num_params(self) -> int:
        """Backbone parameters plus D + 1 for the head."""
        return self.backbone.num_params() + self.cfg.d_model + 1


@functools.partial(jax.jit, static_argnums=0)
def _jitted_rewards(rm: RewardModel, params: Any, rows: dict[str, jax.Array]) -> jax.Array:
    return rm.rewards(params, rows)


def _resolve(tokenizer: Tokenizer | str) -> Tokenizer:
    return make_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer


def score(
    rm: RewardModel,
    params: Any,
    tokenizer: Tokenizer | str,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_len: int,
    batch_size: int = 64,
    overlong: str = "error",
) -> np.ndarray:
    """Rewards r(prompt_n, response_n), float32 numpy [N].

    Each pair becomes ``to_batch``'s row ``[bos] + prompt + response + [eos]``
    (length max_len). Rows are scored ``batch_size`` at a time by one jitted
    program; the last batch is filled with padding rows.

    Args:
      rm, params: the reward model and its parameters.
      tokenizer: a Tokenizer or a name for ``make_tokenizer`` ("byte").
      prompts, responses: N strings each, paired by index.
      max_len: L, tokens per row.
      batch_size: rows per jitted call.
      overlong: a pair longer than max_len + 1 tokens: "error" (DataError) or
        "truncate" (cut the response end), as in ``to_batch``.
    """
    if isinstance(prompts, str) or isinstance(responses, str):
        raise ValueError("prompts and responses must be lists of strings, not a string")
    if len(prompts) != len(responses):
        raise ValueError(
            f"got {len(prompts)} prompts and {len(responses)} responses; pass one "
            "response per prompt (repeat a prompt to score several responses)"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; use an integer >= 1")
    if max_len < 2:
        raise ValueError(f"max_len={max_len}; use an integer >= 2")
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong={overlong!r}; valid modes: {OVERLONG_MODES}")
    tokenizer = _resolve(tokenizer)
    N = len(prompts)
    if N == 0:
        return np.zeros((0,), np.float32)
    rows = {k: np.zeros((N, max_len), np.int32) for k in REWARD_ROW_KEYS}
    for n, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        row, _ = response_row(
            tokenizer.encode(prompt), response, tokenizer, max_len, overlong, f"pair {n}"
        )
        for k in REWARD_ROW_KEYS:
            rows[k][n] = row[k]
    num_batches = -(-N // batch_size)
    padded = num_batches * batch_size
    for k in REWARD_ROW_KEYS:
        fill = tokenizer.pad_id if k == "inputs" else 0
        rows[k] = np.concatenate([rows[k], np.full((padded - N, max_len), fill, np.int32)])
    out = [
        np.asarray(
            _jitted_rewards(
                rm, params, {k: v[i * batch_size : (i + 1) * batch_size] for k, v in rows.items()}
            )
        )
        for i in range(num_batches)
    ]
    return np.concatenate(out)[:N].astype(np.float32)


def pairwise_accuracy(rm: RewardModel, params: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Reward-model metrics on a pairwise ``to_batch`` batch (float32 scalars).

    Returns:
      rm_accuracy: mean over pairs of 1[r_w > r_l] + 0.5 * 1[r_w == r_l]
        (a tie, e.g. every pair at the zero-head init, counts as a coin flip).
      rm_margin: mean r_w - r_l.
      rm_loss: mean Bradley-Terry loss -logsig(r_w - r_l) (hard labels, margin 0).
    """
    missing = [k for k in ("chosen", "rejected") if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; pass a pairwise to_batch batch")
    r_w_B = rm.rewards(params, batch["chosen"])
    r_l_B = rm.rewards(params, batch["rejected"])
    wins_B = jnp.where(r_w_B > r_l_B, 1.0, jnp.where(r_w_B == r_l_B, 0.5, 0.0))
    return {
        "rm_accuracy": jnp.mean(wins_B),
        "rm_margin": jnp.mean(r_w_B - r_l_B),
        "rm_loss": jnp.mean(bradley_terry(r_w_B, r_l_B)),
    }


def reward_model_scorer(
    rm: RewardModel,
    params: Any,
    tokenizer: Tokenizer | str,
    *,
    max_len: int,
    batch_size: int = 64,
    overlong: str = "error",
) -> Callable[[Sequence[str], Sequence[str]], np.ndarray]:
    """``scorer(prompts, responses) -> np.ndarray [N]``: :func:`score` with these settings.

    For labelling sampled responses (e.g. building preference pairs from a
    policy's samples by reward).
    """
    tokenizer = _resolve(tokenizer)

    def scorer(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return score(
            rm,
            params,
            tokenizer,
            prompts,
            responses,
            max_len=max_len,
            batch_size=batch_size,
            overlong=overlong,
        )

    return scorer
