"""LoRA: low-rank adapters as a function of the parameter tree (Hu et al. 2021, arXiv:2106.09685).

An adapter on a weight W, kept in lm_align's layout ``[inputs..., outputs...]``,
is a pair A ``[inputs..., r]``, B ``[r, outputs...]``; the adapted weight is

    W' = W + s * A @ B,     s = alpha / r   (rank-stabilised, rsLoRA: alpha / sqrt(r))

where ``A @ B`` contracts the rank axis (inputs and outputs flattened for the
product, reshaped back). B starts at 0, so an adapter starts as the identity
(W' = W exactly); A starts like PEFT's (Kaiming-uniform, U(-1/sqrt(fan_in),
1/sqrt(fan_in)), or gaussian with std 1/r). The model code is unchanged: the
adapted parameters are `merge(params, adapters)`, and the base model
("adapters disabled", the reference of DPO) is `params` itself.

Targets, by name (one adapter per layer, per target):

| name | base weight | A | B |
|---|---|---|---|
| q, k, v | a slice of `attn/qkv` [D, 3, H, K] (or `attn/q` [D, 1, H, K], `attn/kv` [D, 2, G, K]) | [D, r] | [r, H or G, K] |
| qkv | all of `attn/qkv` (GPT-2's fused c_attn; needs n_kv_heads = n_heads) | [D, r] | [r, 3, H, K] |
| o | `attn/out` [H, K, D] | [H, K, r] | [r, D] |
| gate, up | slot 0 and 1 of `mlp/w_in` [D, 2, F]; `up` is slot 0 of a GeLU MLP's [D, 1, F] | [D, r] | [r, F] |
| down | `mlp/w_out` [F, D] | [F, r] | [r, D] |
| readout | `readout` [D, V] (untied models) | [D, r] | [r, V] |

`attn` stands for q, k, v, o and `mlp` for every MLP projection. A scanned
model (`scan_layers`) gives every per-layer adapter a leading [N] axis. A
and B carry the logical axes of the weight's inputs and outputs (the rank
axis is unnamed: replicated), so `lm_align.parallel` shards them like their
base weight.

    >>> import jax.numpy as jnp
    >>> from lm_align.models import TransformerConfig
    >>> from lm_align.models.pure import PureModel
    >>> model = PureModel(TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64))
    >>> lora = Lora(model, LoraConfig(rank=4, alpha=8.0, targets=("q", "v")))
    >>> adapters = lora.init(0)
    >>> adapters["blocks"][0]["q"]["A"].shape, adapters["blocks"][0]["q"]["B"].shape
    ((32, 4), (4, 2, 16))
    >>> lora.logical_axes["blocks"][0]["q"]["B"]
    (None, 'heads', 'head_dim')
    >>> params = model.init(0)
    >>> bool(jnp.all(lora.merge(params, adapters)["blocks"][0]["attn"]["qkv"] == params["blocks"][0]["attn"]["qkv"]))
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lm_align.models.pure import PureModel
from lm_align.models.transformer import TransformerConfig

TARGETS = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "readout")
ALIASES = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
INITS = ("kaiming_uniform", "gaussian")

LORA_DEFAULTS = {
    "rank": 0,  # adapter rank r; 0 = off (every parameter trains)
    "alpha": 16.0,  # scale s = alpha / rank (alpha / sqrt(rank) with rslora)
    "rslora": False,  # rank-stabilised scale alpha / sqrt(rank) (Kalajdzievski 2023)
    "targets": ("q", "v"),  # q k v qkv o gate up down readout, attn (q k v o), mlp (gate up down)
    "init": "kaiming_uniform",  # A's init: kaiming_uniform (PEFT's) | gaussian (std 1/rank); B = 0
    "dropout": 0.0,  # must be 0: merged adapters have no dropout (docs/lora.md)
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The `lora` config group (see `LORA_DEFAULTS` for each field's meaning)."""

    rank: int = 0
    alpha: float = 16.0
    rslora: bool = False
    targets: tuple = ("q", "v")
    init: str = "kaiming_uniform"
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        errors = self.validation_errors()
        if errors:
            raise ValueError("invalid lora config:\n  " + "\n  ".join(errors))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """s in W + s * A @ B: alpha / rank, or alpha / sqrt(rank) with rslora."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def validation_errors(self) -> list[str]:
        """Every problem with the fields, each with the fix (the model is not needed)."""
        errs = []
        if self.rank < 0:
            errs.append(f"lora.rank={self.rank} must be >= 0 (0: no adapters, full fine-tuning)")
        if not self.alpha > 0:
            errs.append(f"lora.alpha={self.alpha} must be > 0")
        if self.dropout != 0:
            errs.append(
                f"lora.dropout={self.dropout}: the adapters are merged into their weights "
                "(W + s A B) inside the step, where dropout on the adapter's input (PEFT's "
                "x W + s dropout(x) A B) has no equivalent; set lora.dropout=0"
            )
        if self.init not in INITS:
            errs.append(f"lora.init={self.init!r} is not one of {INITS}")
        names = set(TARGETS) | set(ALIASES)
        unknown = [t for t in self.targets if t not in names]
        if unknown or not self.targets:
            errs.append(
                f"lora.targets={self.targets!r}: {'unknown ' + repr(unknown) if unknown else 'empty'}; "
                f"use names from {TARGETS} or the groups {tuple(ALIASES)}"
            )
        return errs


def config_from_dict(group: Any) -> LoraConfig:
    """LoraConfig from a mapping (the `lora` ConfigDict group); unknown fields are errors."""
    d = dict(group)
    unknown = sorted(set(d) - set(LORA_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown lora fields {unknown}; valid: {sorted(LORA_DEFAULTS)}")
    return LoraConfig(**d)


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted weight (per layer): where it is and how its adapter is shaped."""

    name: str  # q, k, v, qkv, o, gate, up, down, readout
    path: tuple[str, ...]  # parameter path inside a block ('attn', 'qkv') or from the root
    slot: int | None  # index into the stacking axis after the inputs (q/k/v, gate/up), or None
    contract: int  # number of input axes of the base weight
    per_layer: bool


def _expand(names: Sequence[str], cfg: TransformerConfig) -> list[str]:
    out = []
    for name in names:
        for t in ALIASES.get(name, (name,)):
            if name == "mlp" and t == "gate" and cfg.activation == "gelu":
                continue  # a GeLU MLP has no gate
            if t not in out:
                out.append(t)
    return out


def resolve_targets(cfg: TransformerConfig, names: Sequence[str]) -> list[Target]:
    """The weights the target names adapt in a model of `cfg`; raises ValueError
    naming a target the model does not have, and why."""
    fused = cfg.resolved_kv_heads == cfg.n_heads
    gated = cfg.activation != "gelu"
    qkv_slot = {"q": (("attn", "q"), 0), "k": (("attn", "kv"), 0), "v": (("attn", "kv"), 1)}
    out = []
    for name in _expand(names, cfg):
        if name in qkv_slot:
            path, slot = (("attn", "qkv"), "qkv".index(name)) if fused else qkv_slot[name]
            out.append(Target(name, path, slot, 1, True))
        elif name == "qkv":
            if not fused:
                raise ValueError(
                    "lora target 'qkv' adapts the fused q/k/v weight, which a model with "
                    f"n_kv_heads={cfg.resolved_kv_heads} < n_heads={cfg.n_heads} does not have; "
                    "target q, k and v"
                )
            out.append(Target(name, ("attn", "qkv"), None, 1, True))
        elif name == "o":
            out.append(Target(name, ("attn", "out"), None, 2, True))
        elif name == "gate":
            if not gated:
                raise ValueError(
                    "lora target 'gate': a GeLU MLP has no gate projection (only swiglu and "
                    "geglu do); target up and down"
                )
            out.append(Target(name, ("mlp", "w_in"), 0, 1, True))
        elif name == "up":
            out.append(Target(name, ("mlp", "w_in"), 1 if gated else 0, 1, True))
        elif name == "down":
            out.append(Target(name, ("mlp", "w_out"), None, 1, True))
        elif name == "readout":
            if cfg.tie_embeddings:
                raise ValueError(
                    "lora target 'readout': this model ties its readout to the embedding, so "
                    "the readout has no weight of its own to adapt; drop the target"
                )
            out.append(Target(name, ("readout",), None, 1, False))
    fused_and_split = {"qkv"} & {t.name for t in out} and {"q", "k", "v"} & {t.name for t in out}
    if fused_and_split:
        raise ValueError("lora targets 'qkv' and q/k/v adapt the same weight; choose one")
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


class Lora:
    """Adapters for `model` (a PureModel): their tree, axes, init, merge and unmerge.

    Used like a model by the trainers: `init(seed)` gives fresh adapters,
    `abstract_params` and `logical_axes` their shapes and logical axis names.
    """

    def __init__(self, model: PureModel, cfg: LoraConfig):
        if not cfg.enabled:
            raise ValueError("lora.rank=0: no adapters; set lora.rank to a positive rank")
        self.model, self.cfg = model, cfg
        self.targets = resolve_targets(model.cfg, cfg.targets)
        self.scanned = model.cfg.scan_layers
        self.n_layers = model.cfg.n_layers
        self.abstract_params = jax.eval_shape(lambda: self.init(0))
        self.logical_axes = self.tree(lambda t, i, w_shape, w_axes: self._axes(t, w_axes))

    @property
    def scale(self) -> float:
        return self.cfg.scale

    def weight_path(self, t: Target, layer: int | None) -> tuple:
        if not t.per_layer:
            return t.path
        return ("blocks", *t.path) if layer is None else ("blocks", layer, *t.path)

    def adapter_path(self, t: Target, layer: int | None) -> tuple:
        if not t.per_layer:
            return (t.name,)
        return ("blocks", t.name) if layer is None else ("blocks", layer, t.name)

    def places(self):
        """(target, layer index or None) for every adapter: None for scanned or top-level."""
        for t in self.targets:
            layers = [None] if (self.scanned or not t.per_layer) else range(self.n_layers)
            for i in layers:
                yield t, i

    def tree(self, fn) -> dict:
        """Adapter tree whose {"A", "B"} pair is fn(target, layer, weight shape, weight axes)."""
        out: dict = {}
        for t, i in self.places():
            w_path = self.weight_path(t, i)
            shape = tuple(_get(self.model.abstract_params, w_path).shape)
            axes = tuple(_get(self.model.logical_axes, w_path))
            node = out
            *parents, leaf = self.adapter_path(t, i)
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = fn(t, i, shape, axes)
        return out

    def split(self, t: Target, dims: tuple) -> tuple[tuple, tuple, tuple]:
        """(layer axes, input dims, output dims) of a weight's shape or axes (slot dropped)."""
        lead = 1 if (self.scanned and t.per_layer) else 0
        inputs = dims[lead : lead + t.contract]
        outputs = dims[lead + t.contract :]
        if t.slot is not None:
            outputs = outputs[1:]
        return dims[:lead], inputs, outputs

    def _axes(self, t: Target, w_axes: tuple) -> dict:
        lead, ins, outs = self.split(t, w_axes)
        return {"A": (*lead, *ins, None), "B": (*lead, None, *outs)}

    def init(self, seed) -> dict:
        """Fresh adapters: B = 0, A Kaiming-uniform U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        (fan_in = the weight's inputs) or gaussian with std 1/rank (`lora.init`)."""
        is_key = hasattr(seed, "dtype") and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key)
        key = seed if is_key else jax.random.key(seed)
        r, counter = self.cfg.rank, iter(range(1 << 30))

        def one(t, i, shape, axes):
            lead, ins, outs = self.split(t, shape)
            k = jax.random.fold_in(key, next(counter))
            if self.cfg.init == "gaussian":
                a = jax.random.normal(k, (*lead, *ins, r), jnp.float32) / r
            else:
                bound = 1.0 / math.sqrt(math.prod(ins))
                a = jax.random.uniform(k, (*lead, *ins, r), jnp.float32, -bound, bound)
            return {"A": a, "B": jnp.zeros((*lead, r, *outs), jnp.float32)}

        return self.tree(one)

    def delta(self, t: Target, a, b):
        """s * A @ B in the weight's [(N), inputs..., outputs...] layout (float32)."""
        lead = a.shape[:1] if (self.scanned and t.per_layer) else ()
        r = self.cfg.rank
        a_IR = a.reshape(*lead, -1, r).astype(jnp.float32)
        b_RO = b.reshape(*lead, r, -1).astype(jnp.float32)
        d_IO = jnp.matmul(a_IR, b_RO, precision=jax.lax.Precision.HIGHEST)
        return self.scale * d_IO.reshape(*a.shape[:-1], *b.shape[len(lead) + 1 :])

    def merge(self, params, adapters, *, sign: float = 1.0):
        """`params` with every targeted weight W replaced by W + sign * s * A @ B
        (accumulated in float32, stored in W's dtype). Untargeted leaves are the
        same arrays; `params` is not modified."""
        out = _copy_dicts(params)
        for t, i in self.places():
            pair = _get(adapters, self.adapter_path(t, i))
            d = sign * self.delta(t, pair["A"], pair["B"])
            *parents, leaf = self.weight_path(t, i)
            node = _get(out, parents)
            w = node[leaf]
            w32 = w.astype(jnp.float32)
            if t.slot is None:
                w32 = w32 + d
            else:
                lead = 1 if (self.scanned and t.per_layer) else 0
                index = (slice(None),) * (lead + t.contract) + (t.slot,)
                w32 = w32.at[index].add(d)
            node[leaf] = w32.astype(w.dtype)
        return out

    def unmerge(self, merged, adapters):
        """The inverse of `merge`: W' - s * A @ B (equal to W up to float rounding)."""
        return self.merge(merged, adapters, sign=-1.0)

    def num_params(self) -> int:
        """Entries in all adapters."""
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_params))

    def num_adapted(self) -> int:
        """Entries of the weights (or weight slices) the adapters change."""
        total = 0
        for t, i in self.places():
            shape = _get(self.model.abstract_params, self.weight_path(t, i)).shape
            lead, ins, outs = self.split(t, shape)
            total += math.prod(lead) * math.prod(ins) * math.prod(outs)
        return total


def describe(lora: Lora, model: PureModel, base: str) -> str:
    """One line: rank, scale, targets, adapter and base sizes, where the base is from."""
    n, total = lora.num_params(), model.num_params()
    return (
        f"lora: rank {lora.cfg.rank}, scale {lora.scale:g}, targets "
        f"{', '.join(t.name for t in lora.targets)}: {n:,} adapter params "
        f"({100 * n / total:.2f}% of {total:,}), base {base or 'fresh init'} frozen"
    )


def _copy_dicts(tree):
    """A copy of the nested dicts of `tree` (the arrays are shared)."""
    if isinstance(tree, dict):
        return {k: _copy_dicts(v) for k, v in tree.items()}
    return tree
