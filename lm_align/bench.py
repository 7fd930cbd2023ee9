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

import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lm_align import parallel
from lm_align.train.setup import build_experiment


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


def run_bench(cfg, *, steps: int = 10, warmup: int = 2) -> dict:
    """Compiles and times the experiment's train step; returns the report dict."""
    devices = jax.devices()
    exp = build_experiment(cfg, devices)
    model_cfg, model, built = exp.model_cfg, exp.model, exp.steps
    seq_len, batch_size = cfg.data.seq_len, cfg.train.batch_size
    state = built.init_state()
    host_batch = synthetic_batch(batch_size // jax.process_count(), seq_len, model_cfg.vocab_size)
    batch = parallel.global_batch(host_batch, built.batch_sharding)

    t0 = time.perf_counter()
    compiled = built.train_step.lower(state, batch).compile()
    compile_time = time.perf_counter() - t0
    timing = _time_steps(
        compiled, state, (batch,), steps=steps, warmup=warmup, devices=devices,
        tokens_per_step=batch_size * seq_len, flops_per_token=model_cfg.flops_per_token(seq_len),
    )  # fmt: skip
    return {
        "device": f"{len(devices)}x {devices[0].device_kind}",
        "params": model.num_params(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "compile_time_s": compile_time,
        **timing,
    }


def run_align_bench(cfg, *, steps: int = 10, warmup: int = 2) -> dict:
    """Times one preference step (an experiment with an `align` group) on synthetic rows.

    `train.batch_size` records of K responses (pairs: K = 2) of `align.max_len`
    tokens. With `align.precompute_reference = false` each step also runs the
    frozen reference's forward pass, counted as 1/3 of a training step's FLOPs
    per token: flops_per_token = (4/3) * (6 N_matmul + attention) then.
    tokens_per_s counts policy tokens (records * K * max_len per step).
    """
    from lm_align import config as config_lib
    from lm_align.align.config import LISTWISE_LOSSES
    from lm_align.align.setup import initial_state, setup
    from lm_align.align.trainer import make_align_step

    if not cfg.align.train_file:  # the bench reads no file
        cfg = config_lib.apply_overrides(cfg, ["align.train_file=<synthetic>"])
    devices = jax.devices()
    s = setup(cfg, devices)
    a, B, L = s.cfg.align, s.cfg.train.batch_size, s.cfg.align.max_len
    K = max(a.num_responses, 2) if a.loss in LISTWISE_LOSSES else 2
    online = not a.precompute_reference and a.loss not in ("bradley_terry",)
    rows = synthetic_batch(B * K, L, s.policy_model.cfg.vocab_size)
    rows["loss_mask"][:, : L // 4] = 0.0  # a prompt quarter, not scored
    rows = {k: v.reshape(B, K, L) for k, v in rows.items()}
    labels = np.tile(np.linspace(1.0, 0.0, K, dtype=np.float32), (B, 1))
    host = {
        "rows": rows,
        "labels": labels,
        "mask": np.ones((B, K), bool),
        "soft_label": np.ones(B, np.float32),
        "lengths": rows["loss_mask"].sum(-1),
        "weight": np.ones(B, np.float32),
    }
    if not online:
        host["ref_logps"] = np.full((B, K), -float(L), np.float32)
    batch = jax.tree.map(
        lambda v: jax.make_array_from_process_local_data(s.batch_sharding, v), host
    )
    step = make_align_step(a, s.score_rows, s.tx, s.schedule, online_reference=online)
    rep = parallel.replicated(s.mesh)
    state = initial_state(s, s.init_params(), s.cfg.train.seed)
    ref = s.reference_params() if online else None
    in_sh = (s.state_shardings, s.batch_sharding) + ((s.state_shardings.params,) if online else ())
    args = (state, batch) + ((ref,) if online else ())
    jitted = jax.jit(step, in_shardings=in_sh, out_shardings=(s.state_shardings, rep),
                     donate_argnums=(0,))  # fmt: skip
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_time = time.perf_counter() - t0
    flops_per_token = s.policy_model.cfg.flops_per_token(L) * (4.0 / 3.0 if online else 1.0)
    timing = _time_steps(
        compiled, state, args[1:], steps=steps, warmup=warmup, devices=devices,
        tokens_per_step=B * K * L, flops_per_token=flops_per_token,
    )  # fmt: skip
    return {
        "device": f"{len(devices)}x {devices[0].device_kind}",
        "step": a.loss + (", reference forward every step" if online else ", stored reference"),
        "params": s.model.num_params(),
        "records": B,
        "responses_per_record": K,
        "seq_len": L,
        "compile_time_s": compile_time,
        **timing,
    }


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
