"""TPU generations and slice types: `v5e-16` -> 16 v5e chips over 4 hosts, a 4x4 torus.

`GENERATIONS` is the one table of what each TPU generation is (HBM and bf16
peak per chip, chips per host, runtime version); `lm-align launch tpu`,
`lm-align sweep --executor tpu` and `lm-align compile` read it.

>>> acc = parse_accelerator("v5e-16")
>>> acc.name, acc.chips, acc.hosts, acc.topology
('v5litepod-16', 16, 4, 'v5e:4x4')
>>> parse_topology("v5p:2x2x2").name
'v5p-16'
"""

from __future__ import annotations

import dataclasses
import math
import re

from lm_align.launch.gcloud import LaunchError


class DoesNotFit(LaunchError):
    """A job needs more memory per chip than the accelerator's chips have."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation: its accelerator types, runtime version and what one chip holds."""

    name: str  # as the Cloud TPU docs call it, e.g. "v5e"
    prefix: str  # of its accelerator types, e.g. "v5litepod"
    runtime_version: str  # the TPU software version for JAX
    cores_per_chip: int  # the type's number counts TensorCores (2/chip) or chips (1/chip)
    hbm_gib: float  # HBM per chip, GiB
    peak_bf16_flops: float  # dense bf16 matmul FLOP/s per chip
    chips_per_host: int  # in slices of several hosts
    single_host_max_chips: int  # the most chips a one-host slice has
    torus_dims: int  # axes of its chip topology: 2 (v5e, v6e) or 3 (v4, v5p)


# Runtime versions: the Cloud TPU docs' "TPU software versions" page, PyTorch and JAX
# table. HBM and bf16 peak: each generation's page of the Cloud TPU docs (system
# architecture); XLA's compile for a chip reserves a little of the HBM (`lm-align compile`
# reports what it leaves usable).
GENERATIONS = {
    "v4": Generation("v4", "v4", "tpu-ubuntu2204-base", 2, 32, 275e12, 4, 4, 3),
    "v5p": Generation("v5p", "v5p", "v2-alpha-tpuv5", 2, 96, 459e12, 4, 4, 3),  # docs: "95 GB"
    "v5e": Generation("v5e", "v5litepod", "v2-alpha-tpuv5-lite", 1, 16, 197e12, 4, 8, 2),
    "v6e": Generation("v6e", "v6e", "v2-alpha-tpuv6e", 1, 32, 918e12, 4, 8, 2),
}
V5E_V6E_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
ACCELERATOR_HELP = (
    "v4-N or v5p-N (N = TensorCores, a multiple of 8: v4-8, v4-16, v5p-32, ...), "
    "v5litepod-N (alias v5e-N) or v6e-N (N = chips: 1, 4, 8, 16, 32, 64, 128 or 256)"
)


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A TPU slice type, e.g. `v5litepod-16`: 16 v5e chips over 4 hosts."""

    given: str  # as the user wrote it, e.g. "v5e-16"
    name: str  # the accelerator type gcloud and xpk take, e.g. "v5litepod-16"
    generation: Generation
    chips: int
    hosts: int
    topology_name: str | None = None  # given as a topology (`v5e:4x4`); None: the usual one

    @property
    def alias(self) -> bool:
        return self.given != self.name

    @property
    def topology(self) -> str:
        """The chip topology libtpu names it by, e.g. `v5e:4x4`, `v5p:2x2x2`."""
        if self.topology_name:
            return self.topology_name
        shape = torus_shape(self.chips, self.generation)
        return f"{self.generation.name}:{'x'.join(map(str, shape))}"

    def describe(self) -> str:
        return f"{self.name}: TPU {self.generation.name}, {self.chips} chips over {hosts_text(self.hosts)}"


def hosts_text(n: int) -> str:
    """`1 host`, `4 hosts`."""
    return "1 host" if n == 1 else f"{n} hosts"


def parse_accelerator(text: str) -> Accelerator:
    """`v5e-16` / `v5litepod-16` / `v4-32` / ... -> Accelerator; LaunchError if unknown."""
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", text.strip())
    if not m:
        raise LaunchError(f"unknown accelerator {text!r}; use {ACCELERATOR_HELP}")
    prefix, n = m.group(1), int(m.group(2))
    gen = GENERATIONS["v5e" if prefix == "v5litepod" else prefix]
    name = f"{gen.prefix}-{n}"
    if gen.cores_per_chip == 2:
        if n < 8 or n % 8:
            raise LaunchError(
                f"accelerator {text!r}: {gen.name} types count TensorCores (2 per chip, "
                f"8 per host), so N must be a multiple of 8, e.g. {gen.prefix}-8 or "
                f"{gen.prefix}-{max(8, n + 8 - n % 8)}"
            )
        chips = n // 2
    else:
        if n not in V5E_V6E_SIZES:
            sizes = ", ".join(map(str, V5E_V6E_SIZES))
            raise LaunchError(
                f"accelerator {text!r}: {gen.name} slices have {sizes} chips; "
                f"use e.g. {gen.prefix}-16"
            )
        chips = n
    n_hosts = 1 if chips <= gen.single_host_max_chips else chips // gen.chips_per_host
    return Accelerator(text.strip(), name, gen, chips, n_hosts)


def torus_shape(chips: int, gen: Generation) -> tuple[int, ...]:
    """The chips' arrangement in the slice, as the Cloud TPU docs list it for each type:
    v5e/v6e 1x1, 2x2, 2x4, 4x4, ..., 16x16; v4/v5p 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ..."""
    if gen.torus_dims == 2 and chips == 1:
        return (1, 1)
    shape = [2, 2] if gen.torus_dims == 2 else [2, 2, 1]
    while math.prod(shape) < chips and chips % (2 * math.prod(shape)) == 0:
        smallest = min(shape)  # double the last of the smallest axes
        i = len(shape) - 1 - shape[::-1].index(smallest)
        shape[i] *= 2
    if math.prod(shape) != chips:  # e.g. v4-24: 12 chips
        shape = [2, 2, chips // 4] if gen.torus_dims == 3 else [1, chips]
    return tuple(shape)


def parse_topology(text: str) -> Accelerator:
    """`v5e:4x4` (a libtpu topology name) or a slice type (`v5e-16`) -> Accelerator.

    Raises LaunchError naming the text and the forms accepted.
    """
    m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", text.strip())
    if not m:
        if ":" in text:
            raise LaunchError(
                f"unknown topology {text!r}; use GENERATION:AxB (v5e, v6e) or GENERATION:AxBxC "
                "(v4, v5p), e.g. v5e:4x4 or v5p:2x2x2, or a slice type: " + ACCELERATOR_HELP
            )
        return parse_accelerator(text)
    gen = GENERATIONS[m.group(1)]
    dims = tuple(int(d) for d in m.group(2).split("x"))
    if len(dims) != gen.torus_dims or 0 in dims:
        example = "4x4" if gen.torus_dims == 2 else "2x2x2"
        raise LaunchError(
            f"topology {text!r}: {gen.name} chips form a {gen.torus_dims}-D torus; "
            f"give {gen.torus_dims} positive sizes, e.g. {gen.name}:{example}"
        )
    chips = math.prod(dims)
    try:
        acc = parse_accelerator(f"{gen.prefix}-{chips * gen.cores_per_chip}")
    except LaunchError as e:
        raise LaunchError(f"topology {text!r} has {chips} chips: {e}") from None
    return dataclasses.replace(acc, given=text.strip(), topology_name=f"{gen.name}:{m.group(2)}")
