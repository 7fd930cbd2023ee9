"""Compile an experiment's step for a TPU topology and report what it needs.

`compile_report(cfg, accelerator, num_slices)` builds the step the experiment
trains with (`lm_align.bench.step_program`: the language-model train step, or
the preference step for configs with an `align` group) on the topology's
compile-only devices with the configured mesh, lowers it with abstract
inputs (ShapeDtypeStructs carrying their shardings) and compiles it with the
TPU compiler. Per chip (B = bytes):

    memory          = arguments + temporaries + outputs - aliased   (XLA's
                      memory_analysis(); the donated train state is aliased)
    fits            = it compiled and memory <= the HBM XLA leaves usable
    flops_per_token = TransformerConfig.flops_per_token(seq_len)   (x 4/3 with
                      the reference's forward in each preference step)
    flops_per_step  = flops_per_token * tokens_per_step
    step_time >=      flops_per_step / (chips * bf16 peak per chip)   (roofline)
    tokens_per_s <=   tokens_per_step / that; at MFU m: m times it

XLA's own cost analysis counts the body of a scan once, not once per layer,
which is why the FLOPs are analytic. The collectives come from the optimised
HLO (`lm_align.aot.hlo`). When the step does not fit, `levers` estimates what
each change would need (`lm_align.aot.levers`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax

from lm_align import parallel
from lm_align.aot import hlo, levers
from lm_align.aot.topology import GIB, parse_hbm_limit, topology_devices, usable_hbm_bytes
from lm_align.bench import step_program
from lm_align.config import ConfigError
from lm_align.launch.accelerators import Accelerator

DEFAULT_MFU = 0.4


@dataclasses.dataclass
class Memory:
    """Per-chip bytes of the compiled step (XLA's buffer assignment)."""

    arguments: float
    temporaries: float
    outputs: float
    aliased: float  # outputs written into donated arguments

    @property
    def total(self) -> float:
        return self.arguments + self.temporaries + self.outputs - self.aliased


@dataclasses.dataclass
class CompileReport:
    topology: str  # e.g. "v5e:4x4"
    num_slices: int
    chips: int  # over all slices
    step: str  # e.g. "train step", "dpo step, stored reference"
    mesh: dict[str, int]
    params: int
    compile_time_s: float
    fits: bool
    needed_bytes: float  # per chip: Memory.total, or what XLA said when it refused
    memory: Memory | None  # None when XLA refused to compile (out of memory)
    hbm_bytes: float  # the chip's HBM (GENERATIONS)
    usable_hbm_bytes: float  # what XLA leaves a program (the chip's HBM if it did not say)
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float  # bf16, all chips
    mfu: float  # the MFU the second roofline figure assumes
    collectives: dict[str, hlo.Collective] | None
    trip_counts_known: bool
    levers: list[levers.Lever]
    compute_dtype: str
    compiler_message: str = ""  # XLA's RESOURCE_EXHAUSTED message when it refused
    compiled: Any = dataclasses.field(default=None, repr=False)  # jax's Compiled, or None

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    @property
    def min_step_time_s(self) -> float:
        return self.flops_per_step / self.peak_flops

    @property
    def max_tokens_per_s(self) -> float:
        return self.tokens_per_step / self.min_step_time_s

    def to_json(self) -> dict:
        """One JSON object: the fields, memory in GiB, the roofline and the collectives."""
        m = self.memory
        return {
            "fits": self.fits,
            "per_chip_memory_gib": (
                self.needed_bytes / GIB if math.isfinite(self.needed_bytes) else None
            ),  # None: XLA refused without saying how much it needs
            "hbm_gib": self.hbm_bytes / GIB,
            "usable_hbm_gib": self.usable_hbm_bytes / GIB,
            "memory_gib": None if m is None else {
                k: getattr(m, k) / GIB for k in ("arguments", "temporaries", "outputs", "aliased")
            },
            "compile_time_s": self.compile_time_s,
            "topology": self.topology,
            "num_slices": self.num_slices,
            "chips": self.chips,
            "step": self.step,
            "mesh": self.mesh,
            "params": self.params,
            "tokens_per_step": self.tokens_per_step,
            "flops_per_token": self.flops_per_token,
            "flops_per_step": self.flops_per_step,
            "peak_flops": self.peak_flops,
            "min_step_time_s": self.min_step_time_s,
            "max_tokens_per_s": self.max_tokens_per_s,
            "mfu": self.mfu,
            "tokens_per_s_at_mfu": self.max_tokens_per_s * self.mfu,
            "collectives": None if self.collectives is None else {
                k: dataclasses.asdict(c) for k, c in self.collectives.items()
            },
            "loop_trip_counts_known": self.trip_counts_known,
            "levers": [dataclasses.asdict(lever) for lever in self.levers],
            "compiler_message": self.compiler_message,
        }  # fmt: skip


def _program(cfg, devices):
    """The experiment's step on `devices`; a mesh that cannot be laid out is a ConfigError."""
    try:
        parallel.make_mesh(cfg.mesh, devices)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    return step_program(cfg, devices)


def _compile(program) -> tuple[object | None, float, str]:
    """(compiled step or None when XLA ran out of HBM, seconds, XLA's message)."""
    lowered = program.jitted.lower(*program.abstract_args)
    t0 = time.perf_counter()
    try:
        return lowered.compile(), time.perf_counter() - t0, ""
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, time.perf_counter() - t0, str(e).strip()


def compile_report(
    cfg, acc: Accelerator, num_slices: int = 1, *, mfu: float = DEFAULT_MFU
) -> CompileReport:
    """Compiles `cfg`'s step for `num_slices` slices of `acc` and reports it (see the module)."""
    if not 0 < mfu <= 1:
        raise ConfigError(
            f"mfu={mfu}: give the assumed model FLOPs utilisation in (0, 1], e.g. 0.4"
        )
    devices = topology_devices(acc, num_slices)
    program = _program(cfg, devices)
    compiled, seconds, message = _compile(program)
    usable = usable_hbm_bytes(devices[0])
    hbm = acc.generation.hbm_gib * GIB
    memory = counts = None
    known = True
    if compiled is None:
        needed = levers.needed_bytes(message) or float("inf")
    else:
        ma = compiled.memory_analysis()
        memory = Memory(ma.argument_size_in_bytes, ma.temp_size_in_bytes,
                        ma.output_size_in_bytes, ma.alias_size_in_bytes)  # fmt: skip
        needed = memory.total
        counts, known = hlo.collectives(compiled.as_text())
    limit = usable or parse_hbm_limit(message) or hbm
    fits = compiled is not None and needed <= limit
    return CompileReport(
        topology=acc.topology, num_slices=num_slices, chips=len(devices), step=program.description,
        mesh=dict(program.mesh.shape), params=program.model.num_params(), compile_time_s=seconds,
        fits=fits, needed_bytes=needed, memory=memory, hbm_bytes=hbm, usable_hbm_bytes=limit,
        tokens_per_step=program.tokens_per_step, flops_per_token=program.flops_per_token,
        peak_flops=acc.generation.peak_bf16_flops * len(devices), mfu=mfu, collectives=counts,
        trip_counts_known=known,
        levers=[] if fits else levers.levers(program, cfg, acc, devices, needed, limit),
        compute_dtype=program.model_cfg.dtype, compiler_message=message, compiled=compiled,
    )  # fmt: skip
