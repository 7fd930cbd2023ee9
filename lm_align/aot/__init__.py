"""Ahead-of-time compilation for TPU topologies on a host without TPUs (`lm-align compile`).

With libtpu installed (the `tpu` extra), an experiment's real step compiles
for any v5e, v5p or v6e slice, or several slices joined by multislice, on this
machine: `compile_report` gives its per-chip memory (and whether it fits),
FLOPs, a roofline bound and its collectives. `lm-align launch tpu` and
`lm-align sweep --executor tpu` run the same compile before creating any TPU
(`commands.fit_check`). See docs/tpu_compile.md.
"""

from lm_align.aot.report import CompileReport, Memory, compile_report
from lm_align.aot.topology import TopologyError, topology_devices

__all__ = ["CompileReport", "Memory", "TopologyError", "compile_report", "topology_devices"]
