"""`lm-align sample` and `lm-align hf import|export`: completions from any run; Hugging Face
checkpoints (../shared/fixtures/hf) in and out of lm-align runs, through training, alignment
on a sharded mesh and back."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from lm_align import config as config_lib
from lm_align.cli import main
from lm_align.config import ConfigError
from lm_align.data import make_tokenizer
from lm_align.sampling import sample_texts
from lm_align.train import checkpoint, train
from lm_align.train.commands import read_prompts
from lm_align.train.config import base_config
from lm_align.train.load import load_run
from tests.helpers import REPO, TINY, env_with_devices

FIXTURES = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "hf")
LLAMA = os.path.join(FIXTURES, "llama")


def _leaves(params) -> dict:
    """{'blocks/0/attn/qkv': np.ndarray, ...}: a params tree by name, on the host."""
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v) for p, v in flat}


def _assert_same_params(got, want):
    got, want = _leaves(got), _leaves(want)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny byte-level model trained for 6 steps on arithmetic."""
    cfg = config_lib.apply_overrides(base_config(), TINY + ["train.steps=6"])
    workdir = str(tmp_path_factory.mktemp("sft"))
    train(cfg, workdir, devices=jax.devices()[:1])
    return workdir


def _sample_json(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(["sample", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sample_prints_the_samplers_draws(trained, capsys):
    prompts = ["12+7=", "3+45="]
    flags = ["--num-samples", "3", "--max-new-tokens", "5", "--temperature", "1.5",
             "--top-k", "40", "--seed", "7"]  # fmt: skip
    out = _sample_json(capsys, ["--policy", trained, "--prompt", prompts[0], "--prompt",
                                prompts[1], *flags])  # fmt: skip
    assert (out["step"], out["checkpoint"]) == (6, os.path.join(trained, "checkpoints", "6"))

    model, params, cfg = load_run(trained)
    want = sample_texts(model, params, make_tokenizer(cfg.data.tokenizer), prompts,
                        num_samples=3, max_new_tokens=5, temperature=1.5, top_k=40, seed=7)  # fmt: skip
    assert [r["prompt"] for r in out["results"]] == prompts
    assert [r["completions"] for r in out["results"]] == want.responses
    np.testing.assert_allclose([r["logps"] for r in out["results"]], want.logps, rtol=1e-6)
    assert [r["num_tokens"] for r in out["results"]] == want.lengths.tolist()
    # Text output: each prompt, then its completions with their log-probs.
    assert main(["sample", "--policy", trained, "--prompt", prompts[0], *flags]) == 0
    text = capsys.readouterr().out
    assert 'prompt 1: "12+7="' in text
    for j, completion in enumerate(want.responses[0], 1):
        assert (
            f"  {j}: {json.dumps(completion, ensure_ascii=False)}  (log p {want.logps[0][j - 1]:.3f}"
            in text
        )


def test_prompts_come_from_flags_then_a_text_or_jsonl_file(tmp_path):
    (tmp_path / "p.txt").write_text("1+1=\n\n  2+2= \n")  # blank lines skipped, spaces kept
    (tmp_path / "p.jsonl").write_text('{"prompt": "3+3="}\n\n{"prompt": "", "id": 2}\n')
    assert read_prompts(["0+0="], str(tmp_path / "p.txt")) == ["0+0=", "1+1=", "  2+2= "]
    assert read_prompts([], str(tmp_path / "p.jsonl")) == ["3+3=", ""]
    (tmp_path / "bad.jsonl").write_text("3+3=\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not JSON"):
        read_prompts([], str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--policy", "{missing}", "--prompt", "1+1="], "no checkpoint at"),
        (["--policy", "{run}"], "no prompts: give --prompt TEXT"),
        (["--policy", "{run}", "--prompts-file", "{empty}"], "holds none"),
        (["--policy", "{run}", "--prompts-file", "{missing}"], "does not exist"),
        (["--policy", "{run}", "--prompts-file", "{bad_jsonl}"], 'bad.jsonl:2: expected an obj'),
        (["--policy", "{run}", "--prompt", "x", "--temperature", "0"], "temperature=0.0 must be"),
        (["--policy", "{run}", "--prompt", "x", "--top-p", "1.5"], "top_p=1.5 must be in"),
        (["--policy", "{run}", "--prompt", "x", "--num-samples", "0"], "--num-samples=0; use 1"),
        (["--policy", "{run}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens=0"),
    ],
)  # fmt: skip
def test_sample_rejects_bad_input_with_the_fix(trained, tmp_path, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1="}\n{"text": "2+2="}\n')
    paths = {"run": trained, "missing": str(tmp_path / "missing"),
             "empty": str(tmp_path / "empty.txt"), "bad_jsonl": str(tmp_path / "bad.jsonl")}  # fmt: skip
    assert main(["sample", *[a.format(**paths) for a in argv]]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The llama fixture imported as a run (in this process, one device)."""
    workdir = str(tmp_path_factory.mktemp("import") / "llama")
    assert main(["hf", "import", LLAMA, "--workdir", workdir]) == 0
    return workdir


def test_import_writes_a_run_of_the_checkpoint(imported, capsys):
    from lm_align.models import hf

    model, params = hf.load(LLAMA)
    ref = checkpoint.resolve(imported)
    assert ref.step == 0 and checkpoint.verify_step(ref.path) is None
    cfg = checkpoint.saved_config(ref)
    with open(os.path.join(imported, "config.json")) as f:
        on_disk = json.load(f)
    tokenizer = f"hf:{os.path.join(imported, 'tokenizer')}"
    assert on_disk["data"]["tokenizer"] == cfg.data.tokenizer == tokenizer
    assert on_disk["model"] == json.loads(config_lib.to_json(cfg))["model"]
    assert cfg.model.to_dict() == dataclasses.asdict(model.cfg)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        with (
            open(os.path.join(LLAMA, name), "rb") as a,
            open(f"{imported}/tokenizer/{name}", "rb") as b,
        ):
            assert a.read() == b.read(), name
    run_model, run_params, _ = load_run(imported)
    assert run_model.cfg == model.cfg
    _assert_same_params(run_params, params)

    # Greedy completions of the run (CLI) are those of the checkpoint itself.
    prompts = ["The quick brown fox", "def add(a, b):"]
    want = sample_texts(model, params, make_tokenizer(f"hf:{LLAMA}"), prompts,
                        max_new_tokens=6, greedy=True)  # fmt: skip
    out = _sample_json(capsys, ["--policy", imported, "--prompt", prompts[0], "--prompt",
                                prompts[1], "--greedy", "--max-new-tokens", "6"])  # fmt: skip
    assert [r["completions"] for r in out["results"]] == want.responses
    assert any(c[0] for c in want.responses)  # something was generated

    # `lm-align eval` takes it as a policy (prompts from the run's default data source).
    argv = ["eval", "--policy", imported, "--num-prompts", "2", "--num-samples", "2", "--ks",
            "1,2", "--max-new-tokens", "3", "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["policy"], report["num_prompts"], report["source"]) == (
        imported,
        2,
        "arithmetic",
    )
    assert 0 < report["mean_length"] <= 3


def test_import_refuses_a_non_empty_workdir_unless_forced(imported, tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("keep me")
    assert main(["hf", "import", LLAMA, "--workdir", str(workdir)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (workdir / "notes.txt").exists()
    assert main(["hf", "import", str(tmp_path / "nothing"), "--workdir", str(workdir)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["hf", "import", str(workdir), "--workdir", str(tmp_path), "--force"]) == 2
    assert "contains the checkpoint" in capsys.readouterr().err  # would delete its source
    assert (workdir / "notes.txt").exists()
    assert main(["hf", "import", LLAMA, "--workdir", str(workdir), "--force"]) == 0
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "tokenizer"]
    # Parameters only: a start for new runs, not a run to resume.
    cfg = checkpoint.saved_config(checkpoint.resolve(str(workdir)))
    with pytest.raises(ConfigError, match="parameters only.*train.init_from="):
        train(cfg, str(workdir), devices=jax.devices()[:1])


def test_export_picks_a_step_and_refuses_a_non_empty_out(trained, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["hf", "export", trained, "--out", str(out), "--step", "3"]) == 2
    assert "has no checkpoint of that step (steps: [6])" in capsys.readouterr().err
    # The tiny run's LayerNorm + GeLU + qk-layernorm decoder has no Hugging Face family.
    assert main(["hf", "export", trained, "--out", str(out)]) == 2
    assert "no Hugging Face equivalent" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "README.md").write_text("x")
    assert main(["hf", "export", trained, "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_an_imported_run_starts_training_with_init_from(imported, tmp_path):
    """`train.init_from` loads the imported parameters: with the first update's learning rate 0
    (linear warmup from 0) the saved step-1 parameters are exactly the imported ones."""
    cfg = checkpoint.saved_config(checkpoint.resolve(imported))
    overrides = [o for o in TINY if not o.startswith("model.")] + [
        "train.steps=1", "optimizer.warmup_steps=1", f"train.init_from={imported}",
    ]  # fmt: skip
    cfg = config_lib.apply_overrides(cfg, overrides)
    result = train(cfg, str(tmp_path / "ft"), devices=jax.devices()[:1])
    assert result.final_step == 1 and np.isfinite(result.metrics["loss"])
    _, params, _ = load_run(str(tmp_path / "ft"))
    _, imported_params, _ = load_run(imported)
    _assert_same_params(params, imported_params)


END_TO_END = textwrap.dedent("""
    import json, os, sys
    import jax
    import numpy as np
    from lm_align.cli import main
    from lm_align.models import hf
    from lm_align.train.load import load_run

    llama, root = sys.argv[1:]
    assert len(jax.devices()) == 8, jax.devices()
    run, dpo, out = f"{root}/llama", f"{root}/dpo", f"{root}/dpo_hf"
    assert main(["hf", "import", llama, "--workdir", run]) == 0
    assert main(["align", "--config", f"{root}/exp.py", "--workdir", dpo,
                 f"--config.align.policy_checkpoint={run}",
                 f"--config.data.tokenizer=hf:{run}/tokenizer"]) == 0
    assert main(["hf", "export", dpo, "--out", out, "--max-shard-bytes", "200000"]) == 0
    _, aligned, _ = load_run(dpo)
    _, exported = hf.load(out)
    _, start, _ = load_run(run)
    flat = lambda t: {jax.tree_util.keystr(p): np.asarray(v)
                      for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(t))[0]}
    aligned, exported, start = flat(aligned), flat(exported), flat(start)
    assert sorted(aligned) == sorted(exported)
    for name in aligned:
        np.testing.assert_array_equal(exported[name], aligned[name], err_msg=name)
    moved = [n for n in aligned if not np.array_equal(aligned[n], start[n])]
    print(json.dumps({"moved": moved, "files": sorted(os.listdir(out))}))
""")

ALIGN_EXPERIMENT = textwrap.dedent("""
    from lm_align.align.config import align_base_config

    def get_config(arg=None):
        cfg = align_base_config()
        cfg.align.loss = "dpo"
        cfg.align.train_file = {pairs!r}
        cfg.align.max_len = 48
        cfg.align.eval_prompts = 0
        cfg.train.steps = 3
        cfg.train.batch_size = 8
        cfg.train.log_every = 1
        cfg.train.eval_every = 0
        cfg.train.answer_eval_examples = 0
        cfg.train.progress = False
        cfg.train.tensorboard = False
        cfg.optimizer.lr = 1e-2
        cfg.optimizer.warmup_steps = 0
        cfg.mesh.data = 2
        cfg.mesh.fsdp = 2
        cfg.mesh.tensor = 2
        return cfg
""")


def test_import_align_on_eight_devices_export_round_trip(tmp_path):
    """hf import -> DPO for 3 steps on data 2 x fsdp 2 x tensor 2 -> hf export (sharded files):
    the exported checkpoint loads (`hf.load`) to exactly the aligned run's final parameters."""
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "lazy", "dog", "jumps", "over", "café", "12+7=19"]
    pairs = [
        {"prompt": " ".join(rng.choice(words, 3)) + ":",
         "chosen": " " + " ".join(rng.choice(words, 2)),
         "rejected": " " + " ".join(rng.choice(words, 3))}
        for _ in range(16)
    ]  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "exp.py").write_text(ALIGN_EXPERIMENT.format(pairs=str(tmp_path / "pairs.jsonl")))
    proc = subprocess.run(
        [sys.executable, "-c", END_TO_END, LLAMA, str(tmp_path)],
        env=env_with_devices(8), capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    files = report["files"]
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(files)
    assert sum(f.endswith(".safetensors") for f in files) >= 2  # 200 kB shards
    assert report["moved"], "DPO changed no parameter"
    rows = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == [1, 2, 3]
    assert losses[1] == pytest.approx(np.log(2), abs=1e-5)  # the policy starts as its reference
    assert losses[3] < losses[1]


def test_hf_finetune_experiment_reads_the_run_it_starts_from(tmp_path):
    """experiments/hf_finetune.py: SFT and DPO configs take the model group and tokenizer from
    the run (an import, or an SFT run of it), never restated."""
    from lm_align.config import load_config

    run = str(tmp_path / "base")
    assert main(["hf", "import", os.path.join(FIXTURES, "qwen3"), "--workdir", run]) == 0
    experiment = os.path.join(REPO, "experiments", "hf_finetune.py")
    saved = checkpoint.saved_config(checkpoint.resolve(run))
    sft = load_config(f"{experiment}:sft,run={run},data=sft.jsonl,steps=40")
    assert sft.model.to_dict() == saved.model.to_dict() and sft.model.qk_norm == "rmsnorm"
    assert (sft.train.init_from, sft.data.source, sft.data.tokenizer) == (
        run, "jsonl:sft.jsonl", f"hf:{run}/tokenizer",
    )  # fmt: skip
    assert sft.data.completion_only_loss and sft.train.steps == 40
    dpo = load_config(f"{experiment}:dpo,run={run},data=p.jsonl,eval_data=e.jsonl")
    assert (dpo.align.loss, dpo.align.policy_checkpoint, dpo.align.train_file) == ("dpo", run, "p.jsonl")
    assert dpo.data.tokenizer == f"hf:{run}/tokenizer" and dpo.align.eval_file == "e.jsonl"
    with pytest.raises(ConfigError, match="needs run=RUN"):
        load_config(f"{experiment}:sft")
