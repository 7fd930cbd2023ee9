"""What would make a step fit a chip's HBM, each change with its estimated per-chip memory.

The step's per-chip memory M (measured, or what XLA said it needs) is split
into parts:

    S  the train state: params and optimizer state, exact from their shardings
    G  the gradients: as large as the params (same dtype and sharding)
    W  with fsdp > 1, the weights XLA gathers whole to use them, and their
       gradients before the reduce-scatter: 2 * (V * D + one layer's params)
       * param bytes (the readout and a layer); 0 without fsdp
    A  the rest, M - S - G - W: activations kept for the backward pass,
       logits, the batch and workspace, taken to scale with the batch per chip

and each lever changes some of them:

    more fsdp       S, G  -> recomputed exactly for the new mesh (data devices
                             move to fsdp; the per-chip batch stays); W added
                             when fsdp was 1
    larger slice    S, G  -> the same, with k times the chips all added to fsdp
                             and k times the batch (the per-chip batch stays)
    remat = full    A     -> A / n_layers + n_layers * rows * L * D * act_bytes
                             (one layer's activations live, plus each layer's
                             input kept; rows = sequences per chip)
    smaller batch   A     -> A / k with train.batch_size / k (fewer tokens per step)
    grad accum      A     -> A / k with k times the micro-batches, plus one
                             gradient accumulator (+ G); tokens per step kept
                             (language-model steps only)

For each lever the smallest change whose estimate fits is given (or the
largest possible one when none fits). These are estimates: compile again with
the overrides to know.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp

from lm_align import parallel
from lm_align.aot.topology import topology_devices
from lm_align.launch.accelerators import Accelerator, parse_accelerator
from lm_align.launch.gcloud import LaunchError
from lm_align.train.step import state_shardings, with_shardings

_NEEDED = re.compile(r"(?:required for [^(]*\(|requires |Used )([\d.]+)([KMGT])", re.IGNORECASE)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
MAX_FACTOR = 64


@dataclasses.dataclass
class Lever:
    name: str  # e.g. "more fsdp"
    overrides: list[str]  # config overrides, e.g. ["mesh.fsdp=8", "mesh.data=2"]
    estimated_bytes: float  # per chip
    fits: bool
    note: str = ""
    topology: str | None = None  # a larger slice to compile for (None: the same)


def needed_bytes(message: str) -> float | None:
    """The bytes XLA's RESOURCE_EXHAUSTED message says the program needs, or None."""
    m = _NEEDED.search(message)
    return float(m.group(1)) * _UNITS[m.group(2).upper()] if m else None


def shard_bytes(tree) -> float:
    """Per-device bytes of ShapeDtypeStructs carrying shardings (the largest shard)."""
    return float(
        sum(
            math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in jax.tree.leaves(tree)
        )
    )


def _state_bytes(program, mesh) -> tuple[float, float]:
    """(train state, params) bytes per chip of `program`'s state on `mesh`."""
    abstract, shardings = state_shardings(program.model, program.tx, mesh, program.seed)
    state = with_shardings(abstract, shardings)
    return shard_bytes(state), shard_bytes(state.params)


def _gathered_bytes(mcfg) -> float:
    """Full (unsharded) bytes of the readout and one layer, and of their gradients."""
    table = mcfg.vocab_size * mcfg.d_model
    layer = (mcfg.num_params() - table * (1 if mcfg.tie_embeddings else 2)) / mcfg.n_layers
    return 2.0 * (table + layer) * jnp.dtype(mcfg.param_dtype).itemsize


def _factors(limit: int):
    k = 2
    while k <= min(limit, MAX_FACTOR):
        yield k
        k *= 2


def _pick(name, options, limit, note="") -> Lever | None:
    """The first option (overrides, estimate[, topology]) that fits, else the last; None
    if there is none."""
    options = list(options)
    if not options:
        return None
    fitting = [o for o in options if o[1] <= limit]
    overrides, estimate, *topology = (fitting or options[-1:])[0]
    return Lever(name, overrides, estimate, bool(fitting), note, *topology)


def _larger_slices(acc: Accelerator, num_slices: int):
    """(accelerator, its devices, k) for slices of k = 2, 4, ... times the chips."""
    gen = acc.generation
    for k in _factors(MAX_FACTOR):
        try:
            bigger = parse_accelerator(f"{gen.prefix}-{acc.chips * k * gen.cores_per_chip}")
        except LaunchError:
            return
        yield bigger, topology_devices(bigger, num_slices), k


def levers(program, cfg, acc, devices, needed: float, limit: float) -> list[Lever]:
    """The levers (see the module) for `program`, which needs `needed` bytes per chip of
    `limit`, with `cfg` its config, `acc` the slice type and `devices` the topology's
    devices."""
    if not math.isfinite(needed):
        return []
    data, fsdp, tensor = (program.mesh.shape[a] for a in parallel.MESH_AXES)
    S, P = _state_bytes(program, program.mesh)
    W = _gathered_bytes(program.model_cfg) if fsdp > 1 else 0.0
    A = max(needed - S - P - W, 0.0)
    slices = parallel.num_slices(devices)
    mcfg, L = program.model_cfg, program.info["seq_len"]
    B = cfg.train.batch_size
    accum = cfg.train.get("grad_accum_steps", 1)
    rows_per_record = program.info.get("responses_per_record", 1)
    rows = B * rows_per_record / (accum * data * fsdp)  # sequences per chip per micro-batch
    act_bytes = 2 if mcfg.dtype == "bfloat16" else 4

    W_next = W or _gathered_bytes(mcfg)  # once fsdp > 1

    def more_fsdp():
        for k in _factors(data):
            if data % k or (data // k) % slices:
                continue
            mesh_cfg = {"data": data // k, "fsdp": fsdp * k, "tensor": tensor}
            S2, P2 = _state_bytes(program, parallel.make_mesh(mesh_cfg, devices))
            yield [f"mesh.fsdp={fsdp * k}", f"mesh.data={data // k}"], S2 + P2 + W_next + A

    def larger_slice():
        for bigger, more_devices, k in _larger_slices(acc, slices):
            mesh_cfg = {"data": data, "fsdp": fsdp * k, "tensor": tensor}
            S2, P2 = _state_bytes(program, parallel.make_mesh(mesh_cfg, more_devices))
            overrides = [f"mesh.fsdp={fsdp * k}", f"mesh.data={data}", f"train.batch_size={B * k}"]
            yield overrides, S2 + P2 + W_next + A, bigger.topology

    def full_remat():
        if mcfg.remat != "full":
            kept = mcfg.n_layers * rows * L * mcfg.d_model * act_bytes
            yield ["model.remat=full"], S + P + W + A / mcfg.n_layers + kept

    def smaller_batch():
        for k in _factors(B):
            if B % k == 0 and (B // k) % (accum * data * fsdp) == 0:
                yield [f"train.batch_size={B // k}"], S + P + W + A / k

    def grad_accum():
        if "align" in cfg:
            return  # the preference step takes whole batches
        for k in _factors(B):
            if B % (accum * k * data * fsdp) == 0:
                yield [f"train.grad_accum_steps={accum * k}"], S + 2 * P + W + A / k

    found = [
        _pick("more fsdp", more_fsdp(), limit, "params and optimizer state shard over more chips"),
        _pick("larger slice", larger_slice(), limit, "more chips; the same batch per chip"),
        _pick("remat", full_remat(), limit, "recompute each layer in the backward pass"),
        _pick("smaller batch", smaller_batch(), limit, "fewer tokens per step"),
        _pick("grad accumulation", grad_accum(), limit, "same tokens per step, more passes"),
    ]
    return [lever for lever in found if lever is not None]
