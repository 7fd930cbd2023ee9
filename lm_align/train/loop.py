"""Language-model training: `train(cfg, workdir)` (`lm-align train`).

The experiment's sharded step (`lm_align.train.setup.build_experiment`; with
``lora.rank > 0`` it trains LoRA adapters of a frozen base) over the data
pipeline's global batches, inside the shared `Run`
(`lm_align.train.run`): automatic resume, SIGTERM-safe checkpoints, the
non-finite guard, metrics. At eval steps the held-out loss; at the end the
greedy exact match on held-out problems and the unigram baseline
(`lm_align.train.evaluate`), written to WORKDIR/final.json.
"""

from __future__ import annotations

import jax

from lm_align import data as data_lib
from lm_align import parallel
from lm_align.models.lora import describe as describe_lora
from lm_align.train import evaluate
from lm_align.train.checkpoint import resolve
from lm_align.train.load import run_params, with_absolute_base
from lm_align.train.run import Loop, Run, TrainResult
from lm_align.train.setup import build_experiment
from lm_align.utils import log

NONFINITE_FIX = (
    "Lower optimizer.lr, raise train.z_loss_coef or enable model.qk_layernorm, or set "
    "train.nonfinite=skip to drop such updates."
)


def train(cfg, workdir: str, *, devices=None) -> TrainResult:
    """Trains (or resumes) the experiment `cfg` in `workdir` (with ``lora.rank > 0``:
    adapters for the base ``train.init_from``, checkpointed without the base)."""
    devices = list(jax.devices() if devices is None else devices)
    cfg = with_absolute_base(cfg)
    exp = build_experiment(cfg, devices)
    run = Run(cfg, workdir)
    t, steps, seq_len = cfg.train, exp.steps, cfg.data.seq_len
    local_batch = t.batch_size // jax.process_count()
    train_iter = data_lib.make_batch_iterator(
        cfg.data,
        split="train",
        seq_len=seq_len,
        batch_size=local_batch,
        seed=t.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    start, state, finished = run.restore_or_init(
        steps.abstract_state, init_state_fn(exp, t.init_from), train_iter.set_state
    )
    if finished is not None:
        return TrainResult(start, None, finished, workdir, state)
    model_cfg = exp.model_cfg
    log(
        f"model: {exp.model.num_params():,} params "
        f"({model_cfg.num_params(matmul_only=True):,} in matmuls), "
        f"{model_cfg.flops_per_token(seq_len) / 1e6:.1f} MFLOP/token; mesh {dict(exp.mesh.shape)} "
        f"on {len(devices)} {devices[0].platform} device(s)"
    )
    if exp.lora is not None:
        log(describe_lora(exp.lora, exp.model, cfg.train.init_from))
    log("data: " + data_lib.describe_source(cfg.data, seq_len=seq_len).replace("\n", "\n  "))

    def run_eval(params):
        return evaluate.eval_loss(
            lambda p, batch: steps.eval_step(p, batch, *steps.frozen),
            params,
            cfg.data,
            seq_len=seq_len,
            batch_size=local_batch,
            num_batches=t.eval_batches,
            batch_sharding=steps.batch_sharding,
            seed=t.seed,
        )

    def final_metrics(state) -> dict:
        out = {}
        if t.answer_eval_examples:
            out.update(
                evaluate.answer_accuracy(
                    exp.model,
                    steps.model_params(state.params),
                    cfg.data,
                    num_examples=t.answer_eval_examples,
                    max_new_tokens=t.answer_max_new_tokens,
                    verbose_examples=4,
                )
            )
        out["unigram_baseline_loss"] = evaluate.unigram_entropy(cfg.data, seq_len=seq_len)
        return out

    loop = Loop(
        train_step=lambda state, batch: steps.train_step(state, batch, *steps.frozen),
        next_batch=lambda: parallel.global_batch(next(train_iter), steps.batch_sharding),
        data_state=train_iter.get_state,
        run_eval=run_eval,
        describe=lambda m: (
            f"loss {float(m['loss']):.4f}  acc {float(m['accuracy']):.3f}  lr {float(m['lr']):.2e}"
        ),
        tokens_per_step=t.batch_size * seq_len,
        nonfinite_fix=NONFINITE_FIX,
    )
    state, stopped_by, row = run.loop(state, start, loop)
    return run.finish(state, stopped_by, row, final_metrics)


def init_state_fn(exp, init_from: str):
    """() -> the step-0 state: fresh, or `init_from`'s params with a fresh optimizer state.

    With LoRA, fresh adapters (`init_from` is their base, already in ``steps.frozen``)."""
    steps = exp.steps
    if not init_from or exp.lora is not None:
        return steps.init_state

    def init_state():
        ref = resolve(init_from)
        params = run_params(ref, steps.abstract_state.params)
        log(f"parameters from {ref} (fresh optimizer state)")
        fresh = jax.jit(
            lambda s, p: s._replace(params=p, opt_state=exp.optimizer.tx.init(p)),
            out_shardings=steps.state_shardings,
            donate_argnums=(0,),
        )
        return fresh(steps.init_state(), params)

    return init_state
