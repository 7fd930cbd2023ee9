"""TPU chips on a host without TPUs: libtpu's compile-only devices of a topology.

`topology_devices(accelerator, num_slices)` gives the devices of one or more
slices (`jax.experimental.topologies.get_topology_desc`); a jitted function
lowered with ShapeDtypeStructs sharded over a mesh of them compiles with the
real TPU compiler, here. libtpu comes with the `tpu` extra. It looks for a
Cloud TPU VM's metadata server unless told where it is, so the environment
names the slice (`TPU_SKIP_MDS_QUERY`, `TPU_ACCELERATOR_TYPE`,
`TPU_WORKER_HOSTNAMES`; values already set are kept). On a host without TPU
chips several processes may compile at once (`ALLOW_MULTIPLE_LIBTPU_LOAD`:
libtpu's lock guards chips, and no chip is opened); on a TPU VM the lock
stays, so a compile does not touch the chips of a running job.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import jax
import jax.numpy as jnp

from lm_align.launch.accelerators import Accelerator

INSTALL = 'pip install -e ".[tpu]" in the lm_align checkout (or pip install "lm_align[tpu]")'
# v4's compile-only topology lists each TensorCore as a device, while a v4 slice runs as
# one (megacore) device per chip, so meshes and per-device memory would not match.
COMPILE_GENERATIONS = ("v5e", "v5p", "v6e")
GIB = 2**30
GOOGLE_PCI_VENDOR = "0x1ae0"
_LIMIT = re.compile(r"exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class TopologyError(RuntimeError):
    """The TPU compiler is missing, or the topology cannot be compiled for."""


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None or bool(
        os.environ.get("TPU_LIBRARY_PATH")
    )


def tpu_chips_attached() -> bool:
    """Does this host have TPU chips (PCI devices of Google's vendor id)?"""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with open(vendor) as f:
            if f.read().strip() == GOOGLE_PCI_VENDOR:
                return True
    return False


def topology_devices(acc: Accelerator, num_slices: int = 1) -> list[jax.Device]:
    """The compile-only devices of `num_slices` slices of `acc` (slice k: slice_index k)."""
    gen = acc.generation.name
    if gen not in COMPILE_GENERATIONS:
        raise TopologyError(
            f"{acc.given}: compiling for TPU {gen} is not supported (libtpu's compile-only "
            f"{gen} topology has one device per TensorCore, not per chip); compile for "
            f"{', '.join(COMPILE_GENERATIONS)}"
        )
    if acc.chips < 4:
        raise TopologyError(
            f"{acc.given}: libtpu compiles for slices of 4 chips or more ({gen}:2x2 and up); "
            f"compile for {gen}:2x2 with the same per-chip share (mesh) instead"
        )
    if not libtpu_installed():
        raise TopologyError(f"compiling for a TPU needs libtpu, the TPU compiler: {INSTALL}")
    if not tpu_chips_attached():
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", acc.name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    return list(
        topologies.get_topology_desc(
            platform="tpu", topology_name=acc.topology, num_slices=num_slices
        ).devices
    )


def parse_hbm_limit(message: str) -> float | None:
    """The bytes of HBM in XLA's RESOURCE_EXHAUSTED message (`exceeds available HBM
    (15.75G)`), or None."""
    m = _LIMIT.search(message)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


_USABLE_HBM: dict[str, float | None] = {}  # device kind -> bytes


def usable_hbm_bytes(device: jax.Device) -> float | None:
    """The HBM XLA lets one program use on `device`'s chip (the chip's HBM less what the
    runtime keeps), read from the compiler's refusal of a program that needs more than
    any chip has; None if the compiler's message does not say."""
    if device.device_kind not in _USABLE_HBM:
        probe = jax.ShapeDtypeStruct(
            (1,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device)
        )
        too_big = 2**41 // 4  # 2 TiB of float32: more than any chip holds
        limit = None
        try:
            jax.jit(lambda x: jnp.zeros((too_big,), jnp.float32) + x).lower(probe).compile()
        except jax.errors.JaxRuntimeError as e:  # RESOURCE_EXHAUSTED names the usable HBM
            limit = parse_hbm_limit(str(e))
        _USABLE_HBM[device.device_kind] = limit
    return _USABLE_HBM[device.device_kind]
