"""The collectives of an optimised HLO module (`compiled.as_text()`), per chip.

Every collective instruction of the module is counted once where it appears
(`count`); those inside a while loop's body (a scan over layers, gradient
accumulation, the chunked loss) run once per iteration, so they are also
counted as `in_loops`. A loop's trip count is read from its condition when it
has the form `i < N` with a constant N (how `jax.lax.scan` lowers); the
per-step totals (`per_step_count`, `per_step_bytes`) multiply by it. A loop
whose trip count cannot be read counts once, and `trip_counts_known` is
False.

Bytes are those of the larger of the instruction's result and operands on one
chip: the gathered array of an all-gather, the unreduced input of a
reduce-scatter, the array of an all-reduce. XLA:TPU writes a reduce-scatter
as an all-reduce inside a computation named `all-reduce-scatter...` (the
emitter fuses the two); it is counted as a reduce-scatter. Asynchronous pairs
(`all-gather-start` / `-done`) count once.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
    "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
    "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEES = re.compile(
    r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass
class Collective:
    """Counts and per-chip bytes of one kind of collective."""

    count: int = 0  # instructions in the module
    bytes: float = 0.0  # their bytes, each counted once
    in_loops: int = 0  # of `count`, inside while-loop bodies
    per_step_count: int = 0  # executions per step (loop bodies x trip count)
    per_step_bytes: float = 0.0


@dataclasses.dataclass
class _Computation:
    name: str
    entry: bool
    lines: list[str] = dataclasses.field(default_factory=list)


def array_bytes(type_text: str) -> float:
    """Bytes of every array in an HLO type, e.g. `(bf16[2,8]{1,0}, f32[4])` -> 48."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype in DTYPE_BYTES:
            total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _split_type(rhs: str) -> tuple[str, str, str]:
    """`TYPE opcode(operands), attrs` -> (TYPE, opcode, rest after the opcode)."""
    if rhs.startswith("("):
        depth = 0
        for i, ch in enumerate(rhs):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        type_text, rest = rhs[: i + 1], rhs[i + 1 :].lstrip()
    else:
        type_text, _, rest = rhs.partition(" ")
    opcode, _, rest = rest.partition("(")
    return type_text, opcode.strip(), rest


def _computations(text: str) -> dict[str, _Computation]:
    comps: dict[str, _Computation] = {}
    current = None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and "=" not in line.split("(", 1)[0]:
                current = _Computation(m.group(1), line.startswith("ENTRY"))
                comps[current.name] = current
        elif line.strip() == "}":
            current = None
        else:
            current.lines.append(line)
    return comps


def _trip_count(condition: _Computation | None) -> int | None:
    """N of a loop condition `i < N` (one integer constant, one LT compare), else None."""
    if condition is None:
        return None
    constants = re.findall(
        r"[su](?:32|64)\[\]\S*\s+constant\((-?\d+)\)", "\n".join(condition.lines)
    )
    compares = [line for line in condition.lines if " compare(" in line]
    if len(constants) == 1 and len(compares) == 1 and "direction=LT" in compares[0]:
        return int(constants[0])
    return None


def _kind(opcode: str, computation: str) -> str | None:
    base = opcode.removesuffix("-done")
    if opcode.endswith("-start") or base not in KINDS:
        return None
    if base == "all-reduce" and computation.startswith("all-reduce-scatter"):
        return "reduce-scatter"
    return base


def _instructions(comp: _Computation):
    """(name, result type, opcode, text after the opcode's parenthesis) of each instruction."""
    for line in comp.lines:
        m = _INSTRUCTION.match(line)
        if m:
            yield (m.group(1), *_split_type(m.group(2)))


def _call_graph(comps: dict[str, _Computation]) -> tuple[dict, bool]:
    """{caller: [(callee, trips per call, is a loop body)]}, whether every trip count was read."""
    calls = collections.defaultdict(list)
    known = True
    for comp in comps.values():
        for line in comp.lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            opcode = _split_type(m.group(2))[1]
            if opcode in ("async-done", "async-update"):
                continue  # the async-start calls the computation once
            callees = dict(_CALLEES.findall(line))
            trips = 1
            if opcode == "while":
                trips = _trip_count(comps.get(callees.get("condition", "")))
                known &= trips is not None
                trips = trips or 1
            for role, callee in callees.items():
                if callee in comps:
                    calls[comp.name].append(
                        (callee, trips if role == "body" else 1, role == "body")
                    )
            for group in _BRANCHES.findall(line):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    if callee in comps:
                        calls[comp.name].append((callee, 1, False))
    return calls, known


def _executions(comps: dict[str, _Computation], calls: dict) -> tuple[dict, dict]:
    """({computation: executions per step}, {computation: inside a loop body}) for the
    computations reachable from ENTRY (Kahn's order over the acyclic call graph)."""
    reachable, stack = set(), [c.name for c in comps.values() if c.entry]
    while stack:
        name = stack.pop()
        if name not in reachable:
            reachable.add(name)
            stack += [callee for callee, _, _ in calls.get(name, [])]
    indegree = collections.Counter(
        callee for name in reachable for callee, _, _ in calls.get(name, [])
    )
    runs = collections.defaultdict(float, {c.name: 1.0 for c in comps.values() if c.entry})
    in_loop = collections.defaultdict(bool)
    ready = [name for name in reachable if indegree[name] == 0]
    while ready:
        name = ready.pop()
        for callee, trips, body in calls.get(name, []):
            runs[callee] += runs[name] * trips
            in_loop[callee] |= in_loop[name] or body
            indegree[callee] -= 1
            if indegree[callee] == 0:
                ready.append(callee)
    return {name: runs[name] for name in reachable}, in_loop


def collectives(hlo_text: str) -> tuple[dict[str, Collective], bool]:
    """({kind: Collective} for every kind in KINDS, whether every loop's trip count was read)."""
    comps = _computations(hlo_text)
    calls, known = _call_graph(comps)
    runs, in_loop = _executions(comps, calls)
    out = {k: Collective() for k in KINDS}
    for name, times in runs.items():
        instructions = list(_instructions(comps[name]))
        sizes = {n: array_bytes(t) for n, t, _, _ in instructions}
        for _, type_text, opcode, rest in instructions:
            kind = _kind(opcode, name)
            if kind is None:
                continue
            size = array_bytes(type_text)
            if not opcode.endswith("-done"):  # a -done's operand is its -start's state
                operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
                size = max(size, sum(sizes.get(o, 0.0) for o in operands))
            c = out[kind]
            c.count += 1
            c.bytes += size
            c.in_loops += int(in_loop[name])
            c.per_step_count += round(times)
            c.per_step_bytes += size * times
    return out, known
