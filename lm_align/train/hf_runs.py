"""Hugging Face checkpoints as lm-align runs, and runs as Hugging Face checkpoints.

    report = import_checkpoint("llama-dir", "runs/llama")   # `lm-align hf import`
    report = export_run("runs/dpo", "dpo-hf")               # `lm-align hf export`
    report = export_adapter("runs/lora_dpo", "dpo-peft")    # `lm-align hf export --peft`

An imported run is what a finished `lm-align train` run looks like to every
command that reads runs: ``RUN/config.json`` and a step-0 checkpoint
(``RUN/checkpoints/0``, parameters only, sealed and verified like any other)
whose saved config is a full experiment config: the `model` group holds the
imported `TransformerConfig`, every other group its default, and
``data.tokenizer = "hf:RUN/tokenizer"`` (the checkpoint's tokenizer files,
copied) when the checkpoint has a ``tokenizer.json``. So it is accepted by
``train.init_from`` and ``align.policy_checkpoint`` (whose experiment sets
the same ``data.tokenizer``; `train` also needs the same `model` group),
``lm-align eval --policy`` and ``lm-align sample --policy``.

Export loads a run's parameters (its newest intact step, or a given one) and
writes them with `lm_align.models.hf.save`; the tokenizer files of an
``hf:`` tokenizer are copied along. A LoRA run exports merged (its base with
its adapters merged in), or, with `export_adapter`, its adapters alone as a
PEFT adapter (`lm_align.models.hf.save_adapter`). Import can merge a PEFT
adapter into the checkpoint it reads. The conversions themselves (names,
layouts, architectures) live in `lm_align.models.hf`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence

import jax

from lm_align import config as config_lib
from lm_align import parallel
from lm_align.data import make_tokenizer
from lm_align.train import checkpoint
from lm_align.train.config import base_config
from lm_align.train.load import load_run, lora_base, run_model
from lm_align.train.step import with_shardings
from lm_align.train.validate import check_config, make_lora_config
from lm_align.utils import write_atomic

TOKENIZER_DIR = "tokenizer"  # RUN/tokenizer: the imported checkpoint's tokenizer files
HF_TOKENIZER_PREFIX = "hf:"


class RunExistsError(FileExistsError):
    """The destination of an import or export already holds files."""


@dataclasses.dataclass(frozen=True)
class ImportReport:
    workdir: str
    checkpoint: str  # RUN/checkpoints/0
    num_params: int
    model: dict  # the run's `model` group
    tokenizer: str  # the run's data.tokenizer
    tokenizer_files: list[str]  # copied into RUN/tokenizer


@dataclasses.dataclass(frozen=True)
class ExportReport:
    checkpoint: str  # the step directory exported
    out_dir: str
    model_files: list[str]  # written by hf.save
    tokenizer_files: list[str]  # copied from the run's hf: tokenizer
    tokenizer: str  # the run's data.tokenizer


def _check_destination(path: str, flag: str, force: bool, what_force_does: str) -> None:
    """Raises RunExistsError when `path` is a non-empty directory and not `force`,
    NotADirectoryError when it is a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{flag} {path} is a file; name a directory")
    if os.path.isdir(path) and os.listdir(path) and not force:
        raise RunExistsError(
            f"{flag} {path} exists and is not empty; choose a new directory or pass --force "
            f"to {what_force_does}"
        )


def _copy_tokenizer_files(src_dir: str, dest_dir: str, names: Sequence[str]) -> list[str]:
    """Copies each of `names` present in `src_dir` to `dest_dir`; returns the copied names."""
    found = [n for n in names if os.path.isfile(os.path.join(src_dir, n))]
    if found:
        os.makedirs(dest_dir, exist_ok=True)
    for name in found:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dest_dir, name))
    return found


def run_config(model_cfg, tokenizer: str):
    """The full experiment config of an imported run: every group's defaults, the
    imported model as the `model` group, `tokenizer` as data.tokenizer."""
    d = base_config().to_dict()
    d["model"] = dataclasses.asdict(model_cfg)
    d["data"]["tokenizer"] = tokenizer
    return config_lib.from_dict(d)


def import_checkpoint(
    path: str,
    workdir: str,
    *,
    dtype: str = "float32",
    scan_layers: bool = False,
    force: bool = False,
    devices=None,
    adapter: str | None = None,
) -> ImportReport:
    """Writes the Hugging Face checkpoint directory `path` as an lm-align run at `workdir`
    (with `adapter`, a PEFT LoRA adapter directory, merged into its weights).

    The parameters are read (`hf.load`) sharded over `devices` (an fsdp mesh
    over all of them by default) before anything is written; `force`
    replaces a non-empty `workdir` (it is removed first).

    Without a ``tokenizer.json`` in `path` the run keeps the default
    data.tokenizer ("byte"); set data.tokenizer where the run is used.

    Raises:
      FileNotFoundError: `path` is not a directory.
      RunExistsError: `workdir` holds files and `force` is off.
      HFCheckpointError: `hf.load` cannot read the checkpoint.
      ConfigError: the imported model does not validate as a run config.
    """
    from lm_align.models import hf

    path, workdir = os.path.abspath(path), os.path.abspath(workdir)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory; name a Hugging Face model directory")
    if path == workdir or path.startswith(workdir + os.sep):
        raise ValueError(f"--workdir {workdir} contains the checkpoint {path}; import elsewhere")
    _check_destination(workdir, "--workdir", force, "replace it (its files are deleted)")
    devices = list(jax.devices() if devices is None else devices)
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
    model, params = hf.load(
        path,
        dtype=dtype,
        scan_layers=scan_layers,
        shardings=lambda m: parallel.logical_to_sharding(m.logical_axes, m.abstract_params, mesh),
        adapter=adapter,
    )
    tokenizer_dir = os.path.join(workdir, TOKENIZER_DIR)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        # Checked against the source's tokenizer (the copy does not exist yet).
        check = run_config(model.cfg, HF_TOKENIZER_PREFIX + path)
        check_config(check, num_devices=len(devices), process_count=jax.process_count())
        tokenizer = HF_TOKENIZER_PREFIX + tokenizer_dir
    else:
        tokenizer = base_config().data.tokenizer
    if os.path.isdir(workdir) and force:
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    copied = []
    if tokenizer.startswith(HF_TOKENIZER_PREFIX):
        copied = _copy_tokenizer_files(path, tokenizer_dir, hf.TOKENIZER_FILES)
    cfg = run_config(model.cfg, tokenizer)
    write_atomic(os.path.join(workdir, "config.json"), config_lib.to_json(cfg))
    ckpt = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
    ckpt.save(0, {"params": params}, None, cfg.to_dict())
    ckpt.close()
    return ImportReport(
        workdir, ckpt.step_dir(0), model.num_params(), dict(cfg.model), tokenizer, copied
    )


def step_path(path: str, step: int | None) -> str:
    """The checkpoint path of `step` of the run `path` (None: `path` itself, newest step)."""
    if step is None:
        return path
    ref = checkpoint.resolve(path)  # the run's checkpoints/ directory
    candidate = os.path.join(ref.directory, str(step))
    if not os.path.isdir(os.path.join(candidate, "state")):
        steps = sorted(int(n) for n in os.listdir(ref.directory) if n.isdigit())
        raise checkpoint.CheckpointNotFoundError(
            f"--step {step}: {path} has no checkpoint of that step (steps: {steps})"
        )
    return candidate


def tokenizer_directory(spec: str) -> str | None:
    """The directory of an ``hf:`` tokenizer spec (``hf:DIR`` or ``hf:DIR/tokenizer.json``)."""
    if not spec.startswith(HF_TOKENIZER_PREFIX):
        return None
    where = os.path.expanduser(spec[len(HF_TOKENIZER_PREFIX) :])
    return where if os.path.isdir(where) else os.path.dirname(where)


def export_run(
    path: str,
    out_dir: str,
    *,
    step: int | None = None,
    force: bool = False,
    max_shard_bytes: int | None = None,
) -> ExportReport:
    """Writes the parameters of the run `path` (its newest intact step, or `step`)
    as a Hugging Face checkpoint in `out_dir` (`hf.save`), with the run's
    tokenizer files when its tokenizer is ``hf:``. config.json records the
    tokenizer's bos, eos and pad ids (what `transformers` generates with).

    `force` writes into a non-empty `out_dir` (files of the same names are
    replaced, others kept).
    """
    from lm_align.models import hf

    _check_destination(
        out_dir, "--out", force, "write into it (files of the same names are replaced)"
    )
    ref = checkpoint.resolve(step_path(path, step))
    model, params, cfg = load_run(ref.path)
    tok = make_tokenizer(cfg.data.tokenizer)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    extras = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    files = hf.save(model, params, out_dir, config_extras=extras, **kwargs)
    src = tokenizer_directory(cfg.data.tokenizer)
    copied = []
    if src and jax.process_index() == 0:  # hf.save writes on process 0
        copied = _copy_tokenizer_files(src, out_dir, hf.TOKENIZER_FILES)
    return ExportReport(ref.path, out_dir, list(files), copied, cfg.data.tokenizer)


def export_adapter(
    path: str, out_dir: str, *, step: int | None = None, force: bool = False
) -> ExportReport:
    """Writes the LoRA adapters of the run `path` (its newest intact step, or `step`)
    as a PEFT adapter in `out_dir` (`hf.save_adapter`): ``adapter_config.json``
    (``base_model_name_or_path`` = the run's base, `lora_base`) and
    ``adapter_model.safetensors``. PEFT applies it to the Hugging Face export of
    that base (`export_run` of the base run, or the directory it was imported from).

    Raises ValueError when the run trained every parameter (no adapters).
    """
    from lm_align.models import hf
    from lm_align.models.lora import Lora

    _check_destination(
        out_dir, "--out", force, "write into it (files of the same names are replaced)"
    )
    ref = checkpoint.resolve(step_path(path, step))
    cfg = checkpoint.saved_config(ref)
    lora_cfg = make_lora_config(cfg)
    if not lora_cfg.enabled:
        raise ValueError(
            f"{ref} trained every parameter (lora.rank=0): it has no adapters; export the "
            f"whole model with `lm-align hf export {path} --out DIR`"
        )
    model = run_model(cfg)
    hf.to_hf_config(model.cfg)  # a model no Hugging Face family expresses is refused here
    lora = Lora(model, lora_cfg)
    rep = parallel.replicated(parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))
    abstract = with_shardings(lora.abstract_params, jax.tree.map(lambda _: rep, lora.abstract_params))
    adapters = checkpoint.load_params(ref, abstract)
    files = hf.save_adapter(model, lora, adapters, out_dir, base_model=lora_base(cfg))
    return ExportReport(ref.path, out_dir, list(files), [], cfg.data.tokenizer)
