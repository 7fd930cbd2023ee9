"""Device mesh, logical-axis rules and shardings.

One code path for 1 device, N devices and many hosts: a mesh over the axes
(data, fsdp, tensor), rules mapping the model's logical axis names to mesh axes,
and NamedShardings derived from them for params, optimizer state and batches.

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    param_shardings = logical_to_sharding(logical_axes, shapes, mesh)

Default rules (`LOGICAL_RULES`):
  batch -> (data, fsdp)   embed -> fsdp   heads, kv_heads, mlp -> tensor
  vocab -> (tensor, fsdp) (the embedding table [V, D] is split by rows;
           in the readout [D, V] fsdp is taken by `embed`, so vocab -> tensor)
  head_dim, layers, length -> replicated
A dimension is split over the longest prefix of its rule's mesh axes whose
size divides it (replicated if none does); `describe_shardings` lists the result.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", ("tensor", "fsdp")),  # fsdp only where the array's other dims leave it free
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
)


def resolve_mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Mesh sizes for (data, fsdp, tensor); at most one axis may be -1 (= fill).

    Raises ValueError naming the sizes and the device count when they disagree.
    """
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive or -1 (fill)")
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices do not divide by "
                f"the fixed axes' product {known}; change mesh.* so their product divides {num_devices}"
            )
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)} but "
            f"{num_devices} devices are visible; set the mesh.* sizes so their product is "
            f"{num_devices} (or one of them to -1 to fill)"
        )
    return tuple(sizes)


def num_slices(devices: Sequence[jax.Device]) -> int:
    """TPU slices the devices span (multislice: joined by the data-center network, DCN)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices, all processes).

    Over several TPU slices the data axis is split across them (DCN: each slice
    holds data / slices replicas), fsdp and tensor stay inside a slice (ICI).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)  # shardings propagate through jit (GSPMD)
    slices = num_slices(devices)
    if slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    data, fsdp, tensor = shape
    if data % slices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} over {slices} slices: only the data axis spans "
            f"slices, so mesh.data={data} must be a multiple of {slices}; move devices from "
            "fsdp/tensor to data (or set mesh.data=-1)"
        )
    grid = mesh_utils.create_hybrid_device_mesh(
        (data // slices, fsdp, tensor),
        (slices, 1, 1),
        devices,
        allow_split_physical_axes=True,
    )
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_to_spec(
    names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules=LOGICAL_RULES
) -> P:
    """PartitionSpec for one array from its logical axis names.

    A mesh axis is used at most once per array (earlier dims first); a dim not
    divisible by its mesh axes' size stays replicated.
    """
    if names is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        # The longest prefix of the rule's axes whose size divides the dim.
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def logical_to_sharding(logical_axes: Any, shapes: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """Tree of NamedShardings from matching trees of logical names and shapes."""
    return jax.tree.map(
        lambda names, s: NamedSharding(mesh, logical_to_spec(names, s.shape, mesh, rules)),
        logical_axes,
        shapes,
        is_leaf=lambda x: isinstance(x, tuple) or x is None,
    )


def in_mesh(fn, mesh: Mesh):
    """`fn` traced under `mesh`'s abstract mesh (`jax.sharding.get_abstract_mesh()`
    inside it is `mesh`'s): code that needs the mesh, such as a Pallas kernel run in
    `shard_map` (`lm_align.models.attention.splash`), finds it there."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over data and fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def opt_state_shardings(
    tx, param_shardings: Any, abstract_params: Any, abstract_opt_state: Any, mesh: Mesh
):
    """Shardings for an optax state: leaves shaped like their param share its sharding,
    everything else (counts, factored moments) is replicated."""
    import optax  # local: keeps this module importable for mesh-only use

    def per_param(state_leaf, sharding, param):
        if isinstance(state_leaf, optax.MaskedNode):  # a partitioned optimizer's other part
            return state_leaf
        same = getattr(state_leaf, "shape", None) == getattr(param, "shape", None)
        return sharding if same else replicated(mesh)

    mapped = optax.tree_map_params(
        tx,
        per_param,
        abstract_opt_state,
        param_shardings,
        abstract_params,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)),
    )
    # Leaves not reached (e.g. in wrappers optax cannot see through) are replicated.
    return jax.tree.map(
        lambda x: x if isinstance(x, NamedSharding) else replicated(mesh),
        mapped,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


@functools.lru_cache(maxsize=64)
def process_batch_rows(sharding: NamedSharding, global_rows: int) -> tuple[int, int]:
    """[lo, hi): the rows of a [global_rows, ...] batch this process's devices hold.

    Raises ValueError when they are not one contiguous block (then no process-
    local slice of consecutive rows can feed them).
    """
    index_map = sharding.addressable_devices_indices_map((global_rows,))
    blocks = sorted({index[0].indices(global_rows)[:2] for index in index_map.values()})
    lo, hi = blocks[0][0], blocks[0][1]
    for start, stop in blocks[1:]:
        if start > hi:
            raise ValueError(
                f"process {jax.process_index()} holds batch rows {blocks} of {global_rows} "
                f"under {sharding.spec} on mesh {dict(sharding.mesh.shape)}, not one "
                "contiguous block; order the mesh devices by process (jax.make_mesh does)"
            )
        hi = max(hi, stop)
    return lo, hi


def global_batch(local_batch: Any, sharding: NamedSharding) -> Any:
    """Assembles per-process numpy batches into global jax.Arrays with `sharding`.

    `local_batch` is a pytree (e.g. a dict, nested or not) of arrays with the
    same leading dim b. Process k of K passes rows [k * b, (k + 1) * b) of the
    global batch of G = K * b rows (`lm_align.data.make_batch_iterator` with
    shard_index=k, shard_count=K yields exactly these), and its devices must
    hold exactly those rows: `make_array_from_process_local_data` places the
    local rows, in order, on the process's devices' row blocks in global order.
    A mesh on which they hold other rows (e.g. a batch replicated across
    processes, data * fsdp smaller than the process count) is a ValueError
    rather than a silently different global batch.
    """
    arrays = jax.tree.map(np.asarray, local_batch)
    count = jax.process_count()
    if count == 1:
        return jax.tree.map(lambda v: jax.device_put(v, sharding), arrays)
    rows = len(jax.tree.leaves(arrays)[0])
    index = jax.process_index()
    lo, hi = process_batch_rows(sharding, rows * count)
    if (lo, hi) != (index * rows, (index + 1) * rows):
        raise ValueError(
            f"process {index} of {count} feeds global batch rows [{index * rows}, "
            f"{(index + 1) * rows}) but its devices hold rows [{lo}, {hi}) under "
            f"{sharding.spec} on mesh {dict(sharding.mesh.shape)}; make data * fsdp a "
            f"multiple of the process count ({count}) so the batch splits evenly "
            "over processes"
        )
    return jax.tree.map(
        lambda v: jax.make_array_from_process_local_data(
            sharding, v, (rows * count,) + v.shape[1:]
        ),
        arrays,
    )


def describe_shardings(shardings: Any) -> list[str]:
    """Human-readable 'path: spec' lines, e.g. for logs or debugging a mesh."""
    out = []
    for path, s in jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
    )[0]:
        out.append(f"{jax.tree_util.keystr(path)}: {s.spec}")
    return out
