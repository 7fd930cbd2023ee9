"""Fine-tune and align a model imported from Hugging Face (docs/checkpoints.md).

    lm-align hf import path/to/model --workdir runs/base
    lm-align train --config experiments/hf_finetune.py:sft,run=runs/base,data=sft.jsonl --workdir runs/sft
    lm-align align --config experiments/hf_finetune.py:dpo,run=runs/sft,data=pairs.jsonl --workdir runs/dpo
    lm-align hf export runs/dpo --out exported/dpo

With LoRA (docs/lora.md) the same commands take `lora=RANK` (and
`targets=`, `alpha=`): the run trains adapters of the frozen starting run and
saves them alone; `lm-align hf export RUN --peft` writes them for PEFT.

    lm-align train --config experiments/hf_finetune.py:sft,run=runs/base,data=sft.jsonl,lora=8 --workdir runs/sft_lora

Variant options (`lm_align.config.parse_arg`):
- `stage`: `sft` (an `lm-align train` config: prompt/completion records,
  loss on the completion) or a preference loss (`dpo`, `ipo`, `slic`, ...:
  an `lm-align align` config); default `sft`.
- `run`: the run to start from (an imported one, or an SFT run of it). Its
  `model` group and tokenizer are read from its checkpoint, so the
  experiment never restates the architecture.
- `data`: the JSON Lines file: `{"prompt", "completion"}` records for `sft`
  (every 20th record is held out, `data.text_eval_every`; the loss is on the
  completion), `{"prompt", "chosen", "rejected"}` pairs otherwise
  (docs/alignment.md); `eval_data`: held-out pairs ('' = none).
- `steps`, `batch_size`, `lr`, `seq_len`: the usual knobs, with small-model
  defaults; every field can still be overridden with `--config.group.field=`.
- `lora`: the adapter rank (0: train every parameter); `targets` (a tuple of
  `lora.targets` names, default every attention and MLP projection) and
  `alpha` (default 2 * rank) set the rest of the `lora` group. A preference
  stage with LoRA uses its starting run as the reference (adapters off).
"""

from lm_align.align.config import LISTWISE_LOSSES, PAIRWISE_LOSSES, align_base_config
from lm_align.config import ConfigError, OneOf, parse_arg
from lm_align.train import checkpoint


def _options(arg):
    return parse_arg(
        arg,
        stage=OneOf("sft", ("sft", *PAIRWISE_LOSSES, *LISTWISE_LOSSES)),
        run="",
        data="",
        eval_data="",
        steps=200,
        batch_size=16,
        lr=1e-4,
        seq_len=64,
        lora=0,
        targets=("attn", "mlp"),
        alpha=0.0,
    )


def get_config(arg=None):
    o = _options(arg)
    if not o.run or not o.data:
        raise ConfigError(
            f"experiments/hf_finetune.py:{arg or ''} needs run=RUN (e.g. from `lm-align hf "
            "import`) and data=FILE.jsonl, e.g. experiments/hf_finetune.py:sft,run=runs/base,"
            "data=sft.jsonl"
        )
    start = checkpoint.saved_config(checkpoint.resolve(o.run))
    cfg = start if o.stage == "sft" else align_base_config()
    cfg.data.tokenizer = start.data.tokenizer
    cfg.train.steps = o.steps
    cfg.train.batch_size = o.batch_size
    cfg.train.log_every = max(1, o.steps // 20)
    cfg.train.eval_every = max(1, o.steps // 4)
    cfg.train.checkpoint_every = o.steps
    cfg.train.answer_eval_examples = 0
    cfg.optimizer.lr = o.lr
    cfg.optimizer.warmup_steps = max(1, o.steps // 10)
    cfg.optimizer.end_lr = o.lr / 10
    cfg.lora.rank = o.lora
    cfg.lora.targets = tuple(o.targets)
    cfg.lora.alpha = o.alpha or 2.0 * max(o.lora, 1)
    if o.stage == "sft":
        cfg.train.init_from = o.run
        cfg.data.source = f"jsonl:{o.data}"
        cfg.data.jsonl_prompt_field = "prompt"
        cfg.data.jsonl_completion_field = "completion"
        cfg.data.completion_only_loss = True
        cfg.data.packing = "pad"
        cfg.data.seq_len = o.seq_len
        return cfg
    cfg.align.loss = o.stage
    cfg.align.policy_checkpoint = o.run
    cfg.align.train_file = o.data
    cfg.align.eval_file = o.eval_data
    cfg.align.max_len = o.seq_len
    cfg.align.eval_prompts = 0
    return cfg
