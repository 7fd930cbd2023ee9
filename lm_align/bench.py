"""`lm-align bench`: how fast is one train step, against what the hardware can do.

Reports (see docs/bench.md):
  matmul_peak_flops  measured: best median FLOP/s of square matmuls
                     (float32 on CPU, bfloat16 on GPU/TPU), 2*n^3 FLOPs each,
                     measured before and after the steps (the higher is used)
  compile_time_s     lowering + XLA compilation of the train step
  step_time_s        median wall time of a step (after warmup), synchronised
  tokens_per_s       batch_size * seq_len / step_time_s
  flops_per_token    6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len
  mfu                flops_per_token * tokens_per_s / matmul_peak_flops
  peak_memory_mb     device peak bytes in use where the runtime reports it,
                     else XLA's buffer assignment for the step (arguments +
                     outputs + temporaries, minus donated aliases)
The data pipeline is not involved: the batch is synthetic and stays on device.

`lm-align bench --data-only` (`run_data_bench`) times the input pipeline
alone instead: the experiment's train split through `make_batch_iterator`
(its data config, batch size, seq_len and grain_workers), no model.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm_align import parallel
from lm_align.train.setup import build_experiment
from lm_align.train.step import with_shardings


def _timed(fn, *args, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak_flops(device=None, *, sizes=None, dtype=None, repeats: int = 5) -> float:
    """Best median FLOP/s over square matmuls of the given sizes on `device`."""
    device = device or jax.devices()[0]
    on_cpu = device.platform == "cpu"
    dtype = dtype or (jnp.float32 if on_cpu else jnp.bfloat16)
    sizes = sizes or ((1024, 2048) if on_cpu else (4096, 8192))
    best = 0.0
    for n in sizes:
        a = jax.device_put(jnp.ones((n, n), dtype), device)
        b = jax.device_put(jnp.ones((n, n), dtype), device)
        f = jax.jit(jnp.matmul)
        jax.block_until_ready(f(a, b))
        best = max(best, 2.0 * n**3 / statistics.median(_timed(f, a, b, repeats=repeats)))
    return best


def _peak_memory_mb(compiled) -> tuple[float, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20, "device peak_bytes_in_use"
    m = compiled.memory_analysis()
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return total / 2**20, "XLA buffer assignment (arguments+outputs+temps-aliased)"


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab_size, size=(batch_size, seq_len + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch_size, seq_len), np.float32),
        "segment_ids": np.ones((batch_size, seq_len), np.int32),
        "positions": np.broadcast_to(
            np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)
        ).copy(),
    }


def _time_steps(
    compiled, state, args, *, steps, warmup, devices, tokens_per_step, flops_per_token
) -> dict:
    """Runs `compiled(state, *args)` warmup + steps times; the timing part of a report."""
    # The peak is measured before and after the steps and the higher value is
    # used, so a slow patch of a shared machine lowers MFU rather than raising it.
    peak_before = matmul_peak_flops(devices[0])
    for _ in range(warmup):
        state, _ = compiled(state, *args)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, *args)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    step_time = statistics.median(times)
    tokens_per_s = tokens_per_step / step_time
    peak = max(peak_before, matmul_peak_flops(devices[0]))
    mem_mb, mem_source = _peak_memory_mb(compiled)
    return {
        "step_time_s": step_time,
        "step_time_min_s": min(times),
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "achieved_flops": flops_per_token * tokens_per_s,
        "matmul_peak_flops": peak * len(devices),
        "mfu": flops_per_token * tokens_per_s / (peak * len(devices)),
        "peak_memory_mb": mem_mb,
        "peak_memory_source": mem_source,
        "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss": float(metrics["loss"]),
    }


@dataclasses.dataclass
class StepProgram:
    """One jitted step and what it runs on: what `bench` times and `lm-align compile`
    compiles for a TPU topology (the same construction for both)."""

    description: str  # e.g. "train step", "dpo step, stored reference"
    jitted: Any  # jax.jit(step) with its in/out shardings; donates the state
    abstract_args: tuple  # (state, batch[, ref_params]) as ShapeDtypeStructs with shardings
    concrete_args: Callable[[], tuple]  # the same, materialised on the mesh (fresh state)
    mesh: jax.sharding.Mesh
    model: Any  # PureModel (or RewardModel): params and logical axes
    tx: Any  # the optimizer (its state is part of the train state)
    seed: int
    model_cfg: Any  # TransformerConfig of the policy
    tokens_per_step: int
    flops_per_token: float
    info: dict  # the batch's shape, for reports
    lora: Any = None  # the LoRA adapters the state trains (None: the model's parameters)


def train_program(cfg, devices=None) -> StepProgram:
    """The language-model train step of `cfg` on `devices` (`build_experiment`'s), with a
    batch of `train.batch_size` rows of `data.seq_len` tokens."""
    devices = list(jax.devices() if devices is None else devices)
    exp = build_experiment(cfg, devices)
    steps, vocab = exp.steps, exp.model_cfg.vocab_size
    B, L = cfg.train.batch_size, cfg.data.seq_len
    dtypes = {k: v.dtype for k, v in synthetic_batch(1, 1, vocab).items()}
    batch = {k: jax.ShapeDtypeStruct((B, L), d, sharding=steps.batch_sharding) for k, d in dtypes.items()}
    frozen = () if exp.lora is None else (steps.frozen_abstract,)  # the LoRA base

    def concrete_args():
        host = synthetic_batch(B // jax.process_count(), L, vocab)
        return steps.init_state(), parallel.global_batch(host, steps.batch_sharding), *steps.frozen

    return StepProgram(
        "train step", steps.train_step, (steps.abstract_state, batch, *frozen), concrete_args,
        exp.mesh, exp.model, exp.optimizer.tx, cfg.train.seed, exp.model_cfg, B * L,
        step_flops_per_token(exp.model_cfg, L, exp.lora), {"batch_size": B, "seq_len": L}, exp.lora,
    )  # fmt: skip


def align_program(cfg, devices=None) -> StepProgram:
    """The preference step of `cfg` (an experiment with an `align` group) on `devices`
    (`lm_align.align.trainer.jit_step`), with `train.batch_size` records of K responses
    of `align.max_len` tokens (pairs: K = 2; listwise losses: K = align.num_responses).

    With `align.precompute_reference = false` each step also runs the frozen
    reference's forward pass, counted as 1/3 of a training step's FLOPs per token:
    flops_per_token = (4/3) * (6 N_matmul + attention) then. Tokens per step count
    policy tokens (records * K * max_len).
    """
    from lm_align import config as config_lib
    from lm_align.align.config import LISTWISE_LOSSES
    from lm_align.align.setup import initial_state, setup
    from lm_align.align.trainer import jit_step, reference_in_step, takes_reference

    if not cfg.align.train_file:  # no file is read
        cfg = config_lib.apply_overrides(cfg, ["align.train_file=<synthetic>"])
    devices = list(jax.devices() if devices is None else devices)
    s = setup(cfg, devices)
    a, B, L = s.cfg.align, s.cfg.train.batch_size, s.cfg.align.max_len
    K = max(a.num_responses, 2) if a.loss in LISTWISE_LOSSES else 2
    online = reference_in_step(a)
    host = _preference_batch(B, K, L, s.policy_model.cfg.vocab_size, with_ref_logps=not online)
    batch = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s.batch_sharding), host
    )
    with_ref = takes_reference(s, online)  # online, or the LoRA base
    ref_abstract = with_shardings(s.policy_model.abstract_params, s.policy_shardings)
    abstract = (s.abstract_state, batch) + ((ref_abstract,) if with_ref else ())

    def concrete_args():
        state = initial_state(s, s.init_params(), s.cfg.train.seed)
        on_mesh = jax.tree.map(
            lambda v: jax.make_array_from_process_local_data(s.batch_sharding, v), host
        )
        return (state, on_mesh) + ((s.reference_params(),) if with_ref else ())

    description = a.loss + (" step, reference forward every step" if online else " step, stored reference")
    flops = step_flops_per_token(s.policy_model.cfg, L, s.lora)
    if online:
        flops += s.policy_model.cfg.flops_per_token(L) / 3.0
    return StepProgram(
        description, jit_step(s, online), abstract, concrete_args, s.mesh, s.model, s.tx,
        s.cfg.train.seed, s.policy_model.cfg, B * K * L, flops,
        {"records": B, "responses_per_record": K, "seq_len": L}, s.lora,
    )  # fmt: skip


def step_flops_per_token(model_cfg, seq_len: int, lora=None) -> float:
    """Training FLOPs per token (`TransformerConfig.flops_per_token`); with LoRA the
    weight gradients of the untargeted weights are not computed:
    6 N + attention - 2 (N - N_targeted), N_targeted the adapted weights' entries."""
    flops = model_cfg.flops_per_token(seq_len)
    if lora is None:
        return flops
    return flops - 2.0 * (model_cfg.num_params(matmul_only=True) - lora.num_adapted())


def _sizes(program: StepProgram) -> dict:
    """Parameters trained and the optimizer state's bytes (the state's `opt_state`)."""
    opt_state = program.abstract_args[0].opt_state
    trained = program.model if program.lora is None else program.lora
    return {
        "params_trained": trained.num_params(),
        "optimizer_state_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state)),
    }


def step_program(cfg, devices=None) -> StepProgram:
    """The step an experiment trains with: the preference step for configs with an `align`
    group, else the language-model train step."""
    return align_program(cfg, devices) if "align" in cfg else train_program(cfg, devices)


def _preference_batch(B: int, K: int, L: int, vocab_size: int, *, with_ref_logps: bool) -> dict:
    """A host batch of B records of K random responses of L tokens; the first quarter of
    each row is an unscored prompt."""
    rows = synthetic_batch(B * K, L, vocab_size)
    rows["loss_mask"][:, : L // 4] = 0.0
    rows = {k: v.reshape(B, K, L) for k, v in rows.items()}
    host = {
        "rows": rows,
        "labels": np.tile(np.linspace(1.0, 0.0, K, dtype=np.float32), (B, 1)),
        "mask": np.ones((B, K), bool),
        "soft_label": np.ones(B, np.float32),
        "lengths": rows["loss_mask"].sum(-1),
        "weight": np.ones(B, np.float32),
    }
    if with_ref_logps:
        host["ref_logps"] = np.full((B, K), -float(L), np.float32)
    return host


def _run(program: StepProgram, *, steps: int, warmup: int) -> dict:
    """Compiles the program's step and times it on its mesh's devices."""
    devices = list(program.mesh.devices.flat)
    args = program.concrete_args()
    t0 = time.perf_counter()
    compiled = program.jitted.lower(*program.abstract_args).compile()
    compile_time = time.perf_counter() - t0
    timing = _time_steps(
        compiled, args[0], args[1:], steps=steps, warmup=warmup, devices=devices,
        tokens_per_step=program.tokens_per_step, flops_per_token=program.flops_per_token,
    )  # fmt: skip
    return {"device": f"{len(devices)}x {devices[0].device_kind}", "compile_time_s": compile_time,
            **timing}  # fmt: skip


def run_bench(cfg, *, steps: int = 10, warmup: int = 2) -> dict:
    """Compiles and times the experiment's train step; returns the report dict."""
    program = train_program(cfg)
    report = _run(program, steps=steps, warmup=warmup)
    return {"device": report.pop("device"), "params": program.model.num_params(),
            **_sizes(program), **program.info, **report}  # fmt: skip


def run_align_bench(cfg, *, steps: int = 10, warmup: int = 2) -> dict:
    """Times one preference step (an experiment with an `align` group) on synthetic rows
    (`align_program`); tokens_per_s counts policy tokens."""
    program = align_program(cfg)
    report = _run(program, steps=steps, warmup=warmup)
    step = program.description.replace(" step", "", 1)
    if program.lora is not None:
        step += ", LoRA (the reference is the base: adapters off)"
    return {"device": report.pop("device"), "step": step, "params": program.model.num_params(),
            **_sizes(program), **program.info, **report}  # fmt: skip


def run_data_bench(cfg, *, batches: int = 50) -> dict:
    """Times the train-split input pipeline alone; returns the report dict.

    first_batch_s       iterator construction (source, workers) + first batch
    batches_per_s       `batches` further batches / their wall time
    examples_per_s      documents per second (a document starts where
                        positions == 0 inside a segment)
    tokens_per_s        non-padding tokens (segment_ids > 0) per second
    total_tokens_per_s  batch_size * seq_len * batches_per_s (with padding)
    padding_fraction    1 - tokens_per_s / total_tokens_per_s
    """
    from lm_align import data as data_lib

    if batches < 1:
        raise ValueError(f"batches={batches}; time at least 1 batch")
    seq_len, batch_size = cfg.data.seq_len, cfg.train.batch_size // jax.process_count()
    t0 = time.perf_counter()
    it = data_lib.make_batch_iterator(
        cfg.data,
        split="train",
        seq_len=seq_len,
        batch_size=batch_size,
        seed=cfg.train.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    try:
        next(it)
        first_batch_s = time.perf_counter() - t0
        docs = tokens = 0
        t0 = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
            in_doc = batch["segment_ids"] > 0
            docs += int(np.sum(in_doc & (batch["positions"] == 0)))
            tokens += int(np.sum(in_doc))
        elapsed = time.perf_counter() - t0
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    total = batches * batch_size * seq_len
    return {
        "source": cfg.data.source,
        "tokenizer": cfg.data.tokenizer,
        "packing": cfg.data.packing,
        "grain_workers": cfg.data.grain_workers,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "batches": batches,
        "first_batch_s": first_batch_s,
        "batches_per_s": batches / elapsed,
        "examples_per_s": docs / elapsed,
        "tokens_per_s": tokens / elapsed,
        "total_tokens_per_s": total / elapsed,
        "tokens_per_example": tokens / max(docs, 1),
        "padding_fraction": 1.0 - tokens / total,
    }
