"""Coordinate check: does each layer's activation update stay O(1) as width grows?

For every width the model is trained a few steps on one fixed batch, and for
every layer output (the embedding, each block's attention and MLP branch, the
logits) we record

    RMS(h_t - h_0)        (h_0: the activations at init, h_t: after t steps)

on that batch. Under muP or MFP these are flat in width (log-log slope near 0);
under standard parameterization with one LR for every width the hidden and
readout changes grow (slope near 1 with Adam). This is the check of Yang et
al. 2022 (Tensor Programs V, arXiv:2203.03466); the parameterizations are those
of Everett et al. 2024 (arXiv:2407.05872). Docs: docs/scaling.md, "Coordinate
check".

    result = coord_check(cfg, widths=(64, 128, 256, 512), steps=3)
    result.slopes            # {"embedding": 0.01, "block0.attn": 0.03, ..., "logits": -0.02}
    result.plot("coordcheck.png")

Widths scale jointly: `model.d_model = n`, `model.n_heads = n / head_dim`
(head_dim fixed at the config's), `model.d_ff = n * d_ff / d_model`. The LR
schedule is held at the peak (no warmup, constant) so that the first steps
move the weights. The base width n_base is `param.base_width`; when it is None
and `param.name` is not `standard`, the smallest width is the base (the tuned
proxy of muTransfer), and the result says so. Standard parameterization with
`base_width` None is checked as it trains: every width its own base, the same
LR at every width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass
class CoordCheckResult:
    widths: list[int]
    steps: int
    rms: dict[str, list[float]]  # layer -> RMS of the activation change, one per width
    slopes: dict[str, float]  # layer -> least-squares slope of log RMS vs log width
    description: str  # parameterization / optimizer summary
    base_width: int | None = None  # n_base used; None: every width its own base
    note: str = ""  # how the base width was chosen, when the config did not name it

    def plot(self, path: str, title: str | None = None) -> str:
        """Log-log plot of the activation change vs width, one line per layer."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        cmap = plt.get_cmap("viridis")
        for i, (layer, values) in enumerate(self.rms.items()):
            color = cmap(i / max(len(self.rms) - 1, 1))
            ax.plot(
                self.widths,
                values,
                "o-",
                color=color,
                label=f"{layer} (slope {self.slopes[layer]:+.2f})",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width (model.d_model)")
        ax.set_ylabel(f"RMS of activation change after {self.steps} steps")
        ax.set_title(title or self.description, fontsize=9)
        ax.legend(fontsize=7, loc="best")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def table(self) -> str:
        head = f"{'layer':<14}" + "".join(f"{w:>11}" for w in self.widths) + f"{'slope':>9}"
        lines = [head]
        for layer, values in self.rms.items():
            lines.append(
                f"{layer:<14}"
                + "".join(f"{v:>11.3e}" for v in values)
                + f"{self.slopes[layer]:>+9.3f}"
            )
        return "\n".join(lines)


def loglog_slope(widths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(values) against log(widths)."""
    x, y = np.log(np.asarray(widths, float)), np.log(np.asarray(values, float))
    if not np.all(np.isfinite(y)):
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


def width_overrides(cfg, width: int) -> list[str]:
    """`model.*` overrides that scale the config's model to `width` jointly."""
    m = cfg.model
    head_dim = m.head_dim or m.d_model // m.n_heads
    if width % head_dim:
        raise ValueError(
            f"width {width} is not a multiple of the head dim {head_dim}; widths must be "
            f"multiples of model.head_dim (or of d_model / n_heads = {head_dim})"
        )
    d_ff = m.d_ff * width / m.d_model
    if d_ff != int(d_ff):
        raise ValueError(
            f"width {width} gives a fractional d_ff {d_ff} (ratio {m.d_ff}/{m.d_model})"
        )
    return [
        f"model.d_model={width}",
        f"model.n_heads={width // head_dim}",
        f"model.head_dim={head_dim}",
        f"model.d_ff={int(d_ff)}",
    ]


def base_width_for(cfg, widths: Sequence[int]) -> tuple[int | None, str]:
    """(n_base, note) for a coordinate check of `cfg` over `widths`.

    `param.base_width` when set (note ""). Otherwise, for any `param.name` but
    `standard`, the smallest width, with a note saying so: with no base every
    width would be its own base, which is the standard parameterization at
    every width whatever the name. `standard` with no base stays None (one LR
    for every width, the usual SP baseline).
    """
    param = cfg.param
    if param.base_width is not None or param.name == "standard":
        return param.base_width, ""
    smallest = min(int(w) for w in widths)
    return smallest, (
        f"param.base_width is not set, so the smallest width {smallest} is the base width "
        f"of {param.name} (set --config.param.base_width to choose another)"
    )


def _activation_changes(cfg, steps: int, seeds: Sequence[int]) -> list[dict[str, float]]:
    """RMS of every layer's activation change, one dict per seed (one compile for all)."""
    import jax
    import jax.numpy as jnp

    from lm_align import data as data_lib
    from lm_align.train.setup import build_experiment
    from lm_align.train.step import init_state, make_train_step

    exp = build_experiment(cfg, jax.devices()[:1])
    t = cfg.train
    train_step = jax.jit(
        make_train_step(
            exp.model,
            exp.optimizer.tx,
            exp.optimizer.schedule,
            z_loss_coef=t.z_loss_coef,
            per_layer_diagnostics=False,
        )
    )

    @jax.jit
    def activations(params, batch):
        _, acts = exp.model.apply(
            params,
            batch["inputs"],
            positions_BL=batch["positions"],
            segment_ids_BL=batch["segment_ids"],
            return_activations=True,
        )
        acts.pop("max_attn_logit")
        return acts

    results = []
    for seed in seeds:
        batch = next(
            data_lib.make_batch_iterator(
                cfg.data,
                split="train",
                seq_len=cfg.data.seq_len,
                batch_size=t.batch_size,
                seed=seed,
            )
        )
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        state = init_state(exp.model, exp.optimizer.tx, seed)
        before = activations(state.params, batch)
        for _ in range(steps):
            state, _ = train_step(state, batch)
        after = activations(state.params, batch)
        mask = np.asarray(batch["loss_mask"]) > 0  # positions with a target (no padding)

        def rms(name):  # [..., B, L, X] -> RMS over unmasked positions
            d = np.asarray(after[name], np.float64) - np.asarray(before[name], np.float64)
            return np.sqrt(np.mean(np.square(d[..., mask, :]), axis=(-2, -1)))

        out = {"embedding": float(rms("embedding"))}
        for name in ("attn", "mlp"):
            for i, v in enumerate(np.atleast_1d(rms(name))):
                out[f"block{i}.{name}"] = float(v)
        out["logits"] = float(rms("logits"))
        results.append(out)
    return results


def coord_check(
    cfg,
    widths: Sequence[int],
    *,
    steps: int = 3,
    seeds: Sequence[int] = (0,),
    progress=None,
) -> CoordCheckResult:
    """Trains each width `steps` steps on one fixed batch; returns RMS changes and slopes.

    Args:
      cfg: an experiment config (its model is rescaled to each width).
      widths: model widths (multiples of the head dim), at least 2.
      steps: train steps on the fixed batch before the activations are compared.
      seeds: init/batch seeds; the RMS is averaged over them.
      progress: optional callable receiving one line of text per width.

    The base width is `base_width_for(cfg, widths)`: `param.base_width`, or the
    smallest width for a non-standard `param.name` without one (`result.note`
    then says so).
    """
    from lm_align.config import apply_overrides

    widths = sorted(int(w) for w in widths)
    if len(widths) < 2:
        raise ValueError(f"need at least 2 widths for a slope, got {widths}")
    if steps < 1:
        raise ValueError(f"steps={steps}: train at least 1 step")
    base_width, note = base_width_for(cfg, widths)
    common = [
        "optimizer.warmup_steps=0",
        "optimizer.schedule=constant",
        "train.grad_accum_steps=1",
        f"train.steps={steps}",
    ]
    if base_width is not None:
        common.append(f"param.base_width={base_width}")
    rms: dict[str, list[float]] = {}
    for width in widths:
        wcfg = apply_overrides(cfg, common + width_overrides(cfg, width))
        per_seed = _activation_changes(wcfg, steps, seeds)
        for layer in per_seed[0]:
            rms.setdefault(layer, []).append(float(np.mean([s[layer] for s in per_seed])))
        if progress:
            progress(f"width {width}: " + ", ".join(f"{k} {v[-1]:.3g}" for k, v in rms.items()))
    param = cfg.param
    base = "its own width" if base_width is None else base_width
    description = (
        f"{param.name} / {cfg.optimizer.name} lr {cfg.optimizer.lr:g}"
        f"{' / global LR' if param.global_lr else ''} / base width {base}"
        f"{' (the smallest width)' if note else ''}"
    )
    slopes = {layer: loglog_slope(widths, values) for layer, values in rms.items()}
    return CoordCheckResult(widths, steps, rms, slopes, description, base_width, note)


# ----------------------------------------------------------------------------
# lm-align coordcheck
# ----------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    """Registers `lm-align coordcheck` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "coordcheck",
        help="activation change per layer vs width after a few steps (muP coordinate check)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--config", help="experiment file (default experiments/default.py)")
    p.add_argument(
        "--widths",
        default="64,128,256,512",
        help="comma-separated model widths, multiples of the head dim (default 64,128,256,512)",
    )
    p.add_argument("--steps", type=int, default=5, help="train steps on the fixed batch")
    p.add_argument("--seeds", type=int, default=1, help="average the RMS over this many seeds")
    p.add_argument("--out", default="coordcheck.png", help="PNG path for the log-log plot")
    p.add_argument("--json", action="store_true", help="print {layer: slope} as one JSON object")
    p.set_defaults(fn=_cmd_coordcheck)


def _parse_widths(text: str) -> list[int]:
    from lm_align.config import ConfigError

    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(
            f"--widths={text!r}: give comma-separated integers, e.g. 64,128,256"
        ) from None
    if len(widths) < 2 or any(w <= 0 for w in widths):
        raise ConfigError(f"--widths={text!r}: give at least 2 positive widths, e.g. 64,128,256")
    return widths


def _cmd_coordcheck(args, overrides) -> int:
    import json
    import os
    import sys

    from lm_align.config import ConfigError, load_experiment

    cfg, _ = load_experiment(args.config, overrides)
    widths = _parse_widths(args.widths)
    if args.steps < 1 or args.seeds < 1:
        raise ConfigError(f"--steps={args.steps} and --seeds={args.seeds} must be >= 1")
    try:
        for w in widths:
            width_overrides(cfg, w)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print
    _, note = base_width_for(cfg, widths)
    if note:
        say(f"note: {note}")
    result = coord_check(
        cfg, widths, steps=args.steps, seeds=tuple(range(args.seeds)), progress=say
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result.plot(args.out)
    if args.json:
        print(json.dumps(result.slopes))
    else:
        print(result.description)
        print(result.table())
        print(f"plot: {args.out}")
    return 0
