"""TPU slice types: `v5e-16` -> 16 v5e chips over 4 hosts, runtime v2-alpha-tpuv5-lite.

>>> acc = parse_accelerator("v5e-16")
>>> acc.name, acc.chips, acc.hosts
('v5litepod-16', 16, 4)
"""

from __future__ import annotations

import dataclasses
import re

from lm_align.launch.gcloud import LaunchError


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation: its accelerator-type prefix and default runtime version."""

    name: str  # as the Cloud TPU docs call it, e.g. "v5e"
    prefix: str  # of its accelerator types, e.g. "v5litepod"
    runtime_version: str  # the TPU software version for JAX
    cores_per_chip: int  # the type's number counts TensorCores (2/chip) or chips (1/chip)


# Runtime versions: the Cloud TPU docs' "TPU software versions" page, PyTorch and JAX table.
GENERATIONS = {
    "v4": Generation("v4", "v4", "tpu-ubuntu2204-base", 2),
    "v5p": Generation("v5p", "v5p", "v2-alpha-tpuv5", 2),
    "v5e": Generation("v5e", "v5litepod", "v2-alpha-tpuv5-lite", 1),
    "v6e": Generation("v6e", "v6e", "v2-alpha-tpuv6e", 1),
}
SINGLE_HOST_MAX_CHIPS = 8  # v5e / v6e: up to 8 chips on one host, 4 per host beyond
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

    @property
    def alias(self) -> bool:
        return self.given != self.name

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
        chips, n_hosts = n // 2, n // 8
    else:
        if n not in V5E_V6E_SIZES:
            sizes = ", ".join(map(str, V5E_V6E_SIZES))
            raise LaunchError(
                f"accelerator {text!r}: {gen.name} slices have {sizes} chips; "
                f"use e.g. {gen.prefix}-16"
            )
        chips, n_hosts = n, (1 if n <= SINGLE_HOST_MAX_CHIPS else n // 4)
    return Accelerator(text.strip(), name, gen, chips, n_hosts)
