"""A Flax NNX model seen as pure functions over a nested dict of parameters.

The train step, optax, orbax and jit shardings all work on plain pytrees:

    >>> import jax.numpy as jnp
    >>> from lm_align.models import TransformerConfig
    >>> from lm_align.models.pure import PureModel
    >>> cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64)
    >>> model = PureModel(cfg)
    >>> params = model.init(0)  # {'embed': [V, D], 'blocks': ..., 'readout': [D, V], ...}
    >>> tokens_BL = jnp.zeros((1, 8), jnp.int32)
    >>> model.apply(params, tokens_BL).shape  # logits [B, L, V]
    (1, 8, 64)
    >>> params["embed"].shape, model.logical_axes["embed"]  # same tree, logical axis names
    ((64, 32), ('vocab', None))
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from lm_align.models.transformer import Transformer, TransformerConfig
from lm_align.parameterization import Parameterization


class PureModel:
    """Wraps `Transformer` as `init(seed) -> params` and `apply(params, ...)`."""

    def __init__(self, cfg: TransformerConfig, param: Parameterization | None = None):
        """`param`: init stds and forward multipliers (None: standard at base width)."""
        self.cfg = cfg
        self.param = param
        abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), param))
        self.graphdef, state = nnx.split(abstract)
        non_params = [p for p, v in nnx.to_flat_state(state) if not issubclass(v.type, nnx.Param)]
        if non_params:
            raise TypeError(
                f"model has non-parameter state at {non_params}; PureModel expects params only"
            )
        self._state_treedef = jax.tree.structure(state)
        self.abstract_params = nnx.to_pure_dict(state)  # tree of ShapeDtypeStruct
        self._params_treedef = jax.tree.structure(self.abstract_params)
        is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
        specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
        self.logical_axes = jax.tree.map(tuple, specs, is_leaf=is_spec)  # e.g. ('embed', 'mlp')
        # Pure dicts and nnx.State flatten in the same (sorted-key) order; check once.
        pure_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(self.abstract_params)[0]]
        state_paths = [p for p, _ in nnx.to_flat_state(state)]
        if [tuple(getattr(k, "key", k) for k in p) for p in pure_paths] != [
            tuple(p) for p in state_paths
        ]:
            raise AssertionError("nnx.State and its pure dict flatten in different orders")

    def init(self, seed: int | jax.Array):
        """Fresh parameters (a nested dict of arrays) from an integer seed or key."""
        rngs = nnx.Rngs(params=seed)
        return nnx.to_pure_dict(nnx.state(Transformer(self.cfg, rngs, self.param)))

    def bind(self, params) -> Transformer:
        """The NNX module holding `params` (no copy; usable inside jit)."""
        if jax.tree.structure(params) != self._params_treedef:
            raise ValueError(
                "params do not match the model's parameter tree (different keys, key types or "
                f"nesting); expected {self._params_treedef}, got {jax.tree.structure(params)}"
            )
        state = jax.tree.unflatten(self._state_treedef, jax.tree.leaves(params))
        return nnx.merge(self.graphdef, state)

    def apply(self, params, tokens_BL, **kwargs):
        """`Transformer.__call__` on `params`: logits [B, L, V] (float32)."""
        return self.bind(params)(tokens_BL, **kwargs)

    def num_params(self) -> int:
        """Entries in all parameters."""
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_params))
