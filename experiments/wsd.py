"""Warmup-stable-decay: one long constant-LR run, cooldowns branched off it, cosine runs.

The property that makes WSD useful (Hägele et al. 2024, arXiv:2405.18392): a
run of length N is the constant-LR run until its cooldown starts at
S = N - cooldown_fraction (N - warmup), so one long constant-LR run, with a
short cooldown branched off it wherever a model is wanted, gives the runs of
every length. Are those branches as good as the cosine runs of the same
lengths?

    lm-align sweep --config experiments/wsd.py --workdir runs/wsd
    lm-align plot  --sweep runs/wsd --curves --group train.steps

A branch is its own run of `train.steps = N` with `optimizer.schedule=wsd`: a
WSD run of length N is bit for bit the constant-LR run up to step S (same
init, same batches, the same LR in float32; tests/test_wsd_muon.py checks
it on the metrics of the quick variant), so it IS the branch, with no
checkpoint copied. The sweep recomputes the shared prefix; nothing is changed
by it but the run time.

The runs: constant LR for the longest length; cosine (to `end_lr`) and WSD
with the linear and the 1-sqrt cooldown, each over the last 20% of the steps
after warmup, for every length. A tiny model on real text (the standard
library, `data.source=stdlib`, byte tokens); held-out loss every 25 steps.
docs/optim.md, "Warmup-stable-decay: branching cooldowns", shows the figure.

Variant options (`lm_align.config.parse_arg`; docs/configs.md, "Variants"):
`quick` (bool): the test suite's version (a smaller model, one length, the
linear cooldown only, every step logged), seconds per run.
"""

from lm_align.config import parse_arg
from lm_align.train.config import base_config

LENGTHS = (250, 500, 1000)  # train.steps of cosine and WSD; the longest: the constant run's
QUICK_LENGTHS = (300,)
COOLDOWNS = ("linear", "1-sqrt")


def _options(arg):
    return parse_arg(arg, quick=False)


def get_config(arg=None):
    quick = _options(arg).quick
    cfg = base_config()

    cfg.train.steps = (QUICK_LENGTHS if quick else LENGTHS)[-1]
    cfg.train.batch_size = 8 if quick else 16  # sequences per update
    cfg.train.log_every = 1 if quick else 10  # quick: every step, for the prefix check
    cfg.train.eval_every = 100 if quick else 25  # steps between held-out losses
    cfg.train.eval_batches = 8 if quick else 16  # the same held-out batches in every run
    cfg.train.checkpoint_every = 0  # one checkpoint, at the end
    cfg.train.answer_eval_examples = 0  # no greedy decoding: text, not arithmetic
    cfg.train.z_loss_coef = 1e-4
    cfg.train.progress = False
    cfg.train.tensorboard = False

    cfg.model.vocab_size = 259  # byte tokenizer: 256 bytes + pad/bos/eos
    cfg.model.d_model = 32 if quick else 64
    cfg.model.n_layers = 2
    cfg.model.n_heads = 2 if quick else 4  # head_dim 16
    cfg.model.d_ff = 4 * cfg.model.d_model
    cfg.model.qk_layernorm = True
    cfg.model.position = "rope"

    cfg.optimizer.name = "adamw"
    cfg.optimizer.lr = 1e-2  # peak: the stable LR of WSD, the start of cosine
    cfg.optimizer.warmup_steps = 10 if quick else 25
    cfg.optimizer.schedule = "constant"  # the long run; the sweep sets cosine / wsd
    cfg.optimizer.end_lr = 1e-5  # cosine's floor and the end of every cooldown
    cfg.optimizer.cooldown_fraction = 0.2  # wsd: the last 20% of the steps after warmup
    cfg.optimizer.weight_decay = 1e-4  # independent: per-step decay 1e-4 * lr_t / lr
    cfg.optimizer.clip_norm = 1.0

    cfg.data.source = "stdlib"  # this Python's standard library; nothing to download
    cfg.data.seq_len = 32 if quick else 64
    return cfg


def get_sweep(arg=None):
    quick = _options(arg).quick
    lengths = QUICK_LENGTHS if quick else LENGTHS
    cooldowns = COOLDOWNS[:1] if quick else COOLDOWNS
    runs = [{"optimizer.schedule": "constant", "train.steps": lengths[-1]}]
    for n in lengths:
        runs.append({"optimizer.schedule": "cosine", "train.steps": n})
        runs += [
            {"optimizer.schedule": "wsd", "optimizer.cooldown": c, "train.steps": n}
            for c in cooldowns
        ]
    return runs
