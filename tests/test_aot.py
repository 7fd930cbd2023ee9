"""`lm-align compile`: the real steps compiled for TPU topologies on this CPU (libtpu, from the
`tpu` extra, which the `test` extra includes), the per-chip memory against XLA's and against
the state's own size, the refusal of a step that does not fit (and of a launch or sweep of
it, before any gcloud command), and the HLO collective counts on a hand-written module."""

import contextlib
import io
import json
import os
import textwrap

import jax
import jax.numpy as jnp
import pytest

from lm_align import cli
from lm_align import config as config_lib
from lm_align.aot import hlo, levers
from lm_align.aot.commands import _shape_key
from lm_align.aot.report import compile_report
from lm_align.aot.topology import libtpu_installed, parse_hbm_limit
from lm_align.launch.accelerators import GENERATIONS, parse_accelerator, parse_topology
from lm_align.launch.gcloud import LaunchError
from lm_align.models import TransformerConfig
from tests.helpers import REPO

DEFAULT = os.path.join(REPO, "experiments", "default.py")
BENCH_DPO = os.path.join(REPO, "experiments", "bench_dpo.py")
LLAMA = os.path.join(REPO, "experiments", "llama_sizes.py")
# Dimensions multiples of 128: TPU layouts add no padding, so bytes can be counted by hand.
TINY = ["model.d_model=128", "model.n_layers=1", "model.n_heads=1", "model.d_ff=256",
        "model.vocab_size=512", "model.scan_layers=true", "data.seq_len=64",
        "train.batch_size=8"]  # fmt: skip
# 1.2B parameters with float32 AdamW state, replicated on 4 v5e chips: XLA refuses at once.
TOO_BIG = [f"{LLAMA}:1b,batch=8", "--config.mesh.fsdp=1", "--config.mesh.data=-1"]


def _main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


def test_libtpu_is_installed():
    assert libtpu_installed(), (
        "the compile tests need libtpu, the TPU compiler: pip install -e '.[test]' "
        "(the test extra includes the tpu extra)"
    )


@pytest.fixture(scope="module")
def tiny_fsdp2():
    """`lm-align compile --json` of the tiny model on v5e:2x2 with fsdp 2 (data 2)."""
    argv = ["compile", "--topology", "v5e:2x2", "--config", DEFAULT, "--json",
            *[f"--config.{o}" for o in TINY], "--config.mesh.fsdp=2"]  # fmt: skip
    status, out, err = _main(argv)
    assert status == 0, err
    return json.loads(out)


def test_compile_json_reports_fit_memory_flops_and_collectives(tiny_fsdp2):
    r = tiny_fsdp2
    assert r["fits"] is True and r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert (r["hbm_gib"], r["chips"]) == (16, 4) and 15 < r["usable_hbm_gib"] <= 16
    assert r["compile_time_s"] > 0 and r["per_chip_memory_gib"] > 0
    assert r["flops_per_step"] == pytest.approx(r["flops_per_token"] * 8 * 64)
    assert r["min_step_time_s"] == pytest.approx(r["flops_per_step"] / (4 * 197e12))
    assert set(r["collectives"]) == set(hlo.KINDS)
    # fsdp gathers the weights; the layer scan and the chunked loss gather inside loops.
    gathers = r["collectives"]["all-gather"]
    assert gathers["count"] > 0 and 0 < gathers["in_loops"] <= gathers["count"]
    assert gathers["per_step_count"] > gathers["count"] and r["loop_trip_counts_known"]


def test_per_chip_memory_is_xlas_and_halves_with_twice_the_fsdp(tiny_fsdp2):
    cfg = config_lib.load_experiment(DEFAULT, TINY + ["mesh.fsdp=4"])[0]
    r = compile_report(cfg, parse_topology("v5e:2x2"))
    ma = r.compiled.memory_analysis()
    xla = (ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
           - ma.alias_size_in_bytes)  # fmt: skip
    assert r.needed_bytes == xla and r.memory.total == xla
    # The arguments are the train state: float32 params, AdamW's two moments, split 4 ways
    # (every tensor has a dimension fsdp can split), plus the batch and a few scalars.
    state = 3 * 4 * r.params / 4
    assert state <= r.memory.arguments <= state * 1.05
    two = tiny_fsdp2["memory_gib"]
    assert r.memory.arguments / 2**30 == pytest.approx(two["arguments"] / 2, rel=0.05)
    assert r.needed_bytes / 2**30 < tiny_fsdp2["per_chip_memory_gib"]


def test_a_step_that_does_not_fit_exits_1_naming_memory_and_levers():
    status, out, err = _main(["compile", "--topology", "v5e:2x2", "--config", *TOO_BIG])
    assert status == 1
    assert "DOES NOT FIT" in out
    head, *lever_lines = err.strip().splitlines()
    assert head.startswith("error: does not fit: the train step needs ")
    assert "GiB per chip; v5e:2x2 chips leave 15.75 GiB of 16.00 GiB HBM usable" in head
    by_name = {line.split(":")[0].strip(): line for line in lever_lines}
    assert set(by_name) == {"more fsdp", "larger slice", "smaller batch", "grad accumulation"}
    assert "--topology v5e:2x4 --config.mesh.fsdp=2 --config.mesh.data=4" in by_name["larger slice"]
    assert "--config.mesh.fsdp=2 --config.mesh.data=2" in by_name["more fsdp"]
    assert "(fits;" in by_name["more fsdp"] and "(still too large;" in by_name["smaller batch"]


def test_json_of_a_step_that_does_not_fit_has_the_levers():
    status, out, _ = _main(["compile", "--topology", "v5e-4", "--json", "--config", *TOO_BIG])
    r = json.loads(out)
    assert status == 1 and r["fits"] is False and r["memory_gib"] is None
    assert (
        r["per_chip_memory_gib"] > r["usable_hbm_gib"]
        and "RESOURCE_EXHAUSTED" in r["compiler_message"]
    )
    fsdp = next(lever for lever in r["levers"] if lever["name"] == "more fsdp")
    assert fsdp["fits"] and fsdp["estimated_bytes"] < r["usable_hbm_gib"] * 2**30


def test_dpo_step_compiles_over_two_slices_with_data_across_them():
    cfg = config_lib.load_experiment(
        BENCH_DPO, [o for o in TINY if not o.startswith("data.")] + ["align.max_len=64"]
    )[0]
    r = compile_report(cfg, parse_topology("v5e:2x2"), num_slices=2)
    assert r.fits and r.step == "dpo step, reference forward every step"
    assert (r.chips, r.num_slices, r.mesh) == (8, 2, {"data": 8, "fsdp": 1, "tensor": 1})
    assert r.tokens_per_step == 8 * 2 * 64  # 8 pairs of 64 tokens
    step_flops = TransformerConfig(**cfg.model.to_dict()).flops_per_token(64)
    assert r.flops_per_token == pytest.approx(4 / 3 * step_flops)  # + the reference's forward
    # Gradients are averaged over the data axis: inside each slice, then across them.
    assert r.collectives["all-reduce"].count + r.collectives["reduce-scatter"].count > 0


def test_the_preference_step_keeps_the_batch_sharding():
    """Compiling the 125M DPO step for v5e:4x4 found that without the language-model step's
    batch-sharding constraint on the residual stream XLA resharded the activations with
    all-to-alls (and needed 16.4 GiB per chip instead of 1.1); this model had 8 of them."""
    small = ["model.n_layers=1", "model.d_model=256", "model.n_heads=2", "model.n_kv_heads=1",
             "model.d_ff=256", "model.vocab_size=512"]  # fmt: skip
    cfg = config_lib.load_experiment(f"{LLAMA}:125m,dpo,batch=8,seq_len=64", small)[0]
    r = compile_report(cfg, parse_topology("v5e:2x2"))
    assert r.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert r.collectives["all-to-all"].count == 0


def test_launch_dry_run_of_a_job_that_does_not_fit_stops_before_any_gcloud_command():
    status, out, err = _main(
        ["launch", "tpu", "--dry-run", "--name", "t", "--accelerator", "v5e-4", "--zone",
         "us-west4-a", "--", "train", "--config", *TOO_BIG]
    )  # fmt: skip
    assert status == 1
    assert "gcloud" not in out and "DOES NOT FIT" in out
    assert "error: does not fit: the train step needs" in err and "GiB per chip" in err


def test_launch_dry_run_of_a_job_that_fits_prints_the_check_then_the_commands():
    status, out, err = _main(
        ["launch", "tpu", "--dry-run", "--name", "t", "--accelerator", "v5e-4", "--zone",
         "us-west4-a", "--", "train", "--config", DEFAULT, *[f"--config.{o}" for o in TINY]]
    )  # fmt: skip
    assert (status, err) == (0, "")
    check, *rest = out.splitlines()
    assert check.startswith(f"# fit check (v5e:2x2, {DEFAULT}): train step, ")
    assert " per chip, fits (mesh {'data': 4, 'fsdp': 1, 'tensor': 1}; compiled in " in check
    assert any(line.startswith("gcloud compute tpus tpu-vm create t ") for line in rest)


def test_sweep_on_tpu_of_runs_that_do_not_fit_stops_before_any_gcloud_command(tmp_path):
    experiment = tmp_path / "big_sweep.py"
    experiment.write_text(textwrap.dedent(f"""\
        import importlib.util
        spec = importlib.util.spec_from_file_location("llama_sizes", {LLAMA!r})
        llama = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(llama)

        def get_config(arg=None):
            cfg = llama.get_config("1b,batch=8")
            cfg.mesh.fsdp, cfg.mesh.data = 1, -1
            return cfg

        def get_sweep(arg=None):
            return [{{"optimizer.lr": lr}} for lr in (1e-4, 3e-4)]
    """))  # fmt: skip
    status, out, err = _main(
        ["sweep", "--config", str(experiment), "--workdir", str(tmp_path / "w"), "--executor",
         "tpu", "--tpu-name", "s", "--accelerator", "v5e-4", "--zone", "z", "--dry-run"]
    )  # fmt: skip
    assert status == 1 and "does not fit: the train step needs" in err
    assert "# fit check (v5e:2x2, " in out and "gcloud" not in out


def test_missing_libtpu_names_the_extra(monkeypatch):
    monkeypatch.setattr("lm_align.aot.topology.libtpu_installed", lambda: False)
    status, _, err = _main(["compile", "--topology", "v5e:2x2", "--config", DEFAULT])
    assert status == 2 and 'pip install -e ".[tpu]"' in err


@pytest.mark.parametrize(
    "topology, message",
    [("v4:2x2x1", "compiling for TPU v4 is not supported"),
     ("v5e-1", "libtpu compiles for slices of 4 chips or more"),
     ("v5e:3x3", "topology 'v5e:3x3' has 9 chips"),
     ("v5e:4x4x4", "v5e chips form a 2-D torus; give 2 positive sizes")],
)  # fmt: skip
def test_topologies_that_cannot_be_compiled_for_say_why(topology, message):
    status, _, err = _main(["compile", "--topology", topology, "--config", DEFAULT])
    assert status == 2 and message in err, err


# ---------------------------------------------------------------------------
# Without compiling: the topology names, XLA's messages, the sweep's dedup key


@pytest.mark.parametrize(
    "accelerator, topology",
    [("v5e-4", "v5e:2x2"), ("v5e-8", "v5e:2x4"), ("v5litepod-16", "v5e:4x4"),
     ("v6e-64", "v6e:8x8"), ("v6e-256", "v6e:16x16"), ("v5p-8", "v5p:2x2x1"),
     ("v5p-16", "v5p:2x2x2"), ("v5p-32", "v5p:2x2x4"), ("v5p-64", "v5p:2x4x4"),
     ("v5p-128", "v5p:4x4x4"), ("v4-32", "v4:2x2x4")],
)  # fmt: skip
def test_slice_types_have_the_topologies_of_the_cloud_tpu_docs(accelerator, topology):
    acc = parse_accelerator(accelerator)
    assert acc.topology == topology
    assert parse_topology(topology).name == acc.name


def test_generations_table():
    assert {g: (GENERATIONS[g].hbm_gib, GENERATIONS[g].peak_bf16_flops / 1e12)
            for g in GENERATIONS} == {"v4": (32, 275), "v5p": (96, 459), "v5e": (16, 197),
                                      "v6e": (32, 918)}  # fmt: skip
    with pytest.raises(LaunchError, match="unknown topology 'v7:2x2'"):
        parse_topology("v7:2x2")


def test_xla_out_of_memory_messages_are_read():
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (28.16G) exceeds available HBM (15.75G)."
    )
    assert levers.needed_bytes(message) == pytest.approx(28.16 * 2**30)
    assert parse_hbm_limit(message) == pytest.approx(15.75 * 2**30)
    assert levers.needed_bytes("XLA: something else") is None


def test_runs_differing_only_in_nonzero_floats_share_a_compile():
    base = config_lib.load_experiment(DEFAULT)[0]
    lr = config_lib.apply_overrides(base, ["optimizer.lr=0.3"])
    width = config_lib.apply_overrides(base, ["model.d_model=256"])
    no_z = config_lib.apply_overrides(base, ["train.z_loss_coef=0.0"])
    assert _shape_key(lr) == _shape_key(base)
    assert _shape_key(width) != _shape_key(base) and _shape_key(no_z) != _shape_key(base)


# An optimised module as XLA:TPU prints it, cut down: a scan of 3 iterations whose body
# all-gathers a bf16[8,128] weight and reduce-scatters its f32 gradient, an async
# collective-permute, and an all-reduce in ENTRY; an unused computation is ignored.
HLO = """\
HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[4,128]{1,0})->f32[4,128]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[]{:T(128)} parameter(0)
  %y = f32[]{:T(128)} parameter(1)
  ROOT %sum = f32[]{:T(128)} add(%x, %y)
}

%all-reduce-scatter.clone (input: f32[8,128]) -> f32[4,128] {
  %input = f32[8,128]{1,0:T(8,128)} parameter(0)
  %all-reduce.7 = f32[8,128]{1,0:T(8,128)} all-reduce(%input), channel_id=3, replica_groups={{0,1}}, to_apply=%add
  ROOT %slice = f32[4,128]{1,0} slice(%all-reduce.7), slice={[0:4], [0:128]}
}

%body (p: (s32[], f32[4,128])) -> (s32[], f32[4,128]) {
  %p = (s32[], f32[4,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = bf16[4,128]{1,0:T(8,128)(2,1)} constant({...})
  %all-gather.1 = bf16[8,128]{1,0:T(8,128)(2,1)} all-gather(%w), channel_id=1, dimensions={0}
  %g = f32[8,128]{1,0} convert(%all-gather.1)
  %fusion.2 = f32[4,128]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.clone
  ROOT %t = (s32[], f32[4,128]{1,0}) tuple(%i, %fusion.2)
}

%cond (q: (s32[], f32[4,128])) -> pred[] {
  %q = (s32[], f32[4,128]{1,0}) parameter(0)
  %j = s32[]{:T(128)} get-tuple-element(%q), index=0
  %constant.9 = s32[]{:T(128)} constant(3)
  ROOT %lt = pred[]{:T(512)} compare(%j, %constant.9), direction=LT
}

%unused (u: f32[64]) -> f32[64] {
  %u = f32[64]{0} parameter(0)
  ROOT %all-gather.99 = f32[64]{0} all-gather(%u), dimensions={0}
}

ENTRY %main (a: f32[4,128]) -> f32[4,128] {
  %a = f32[4,128]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,128]{1,0}) tuple(%zero, %a)
  %while.1 = (s32[], f32[4,128]{1,0}) while(%init), condition=%cond, body=%body
  %out = f32[4,128]{1,0} get-tuple-element(%while.1), index=1
  %cp = (f32[4,128]{1,0}, f32[4,128]{1,0}, u32[], u32[]) collective-permute-start(%out), source_target_pairs={{0,1},{1,0}}
  %cp.done = f32[4,128]{1,0} collective-permute-done(%cp)
  ROOT %all-reduce.3 = f32[4,128]{1,0} all-reduce(%cp.done), channel_id=2, to_apply=%add
}
"""


def test_collectives_of_an_hlo_module_counted_by_hand():
    counts, known = hlo.collectives(HLO)
    assert known
    got = {k: (c.count, c.in_loops, c.bytes, c.per_step_count, c.per_step_bytes)
           for k, c in counts.items()}  # fmt: skip
    assert got == {
        "all-gather": (1, 1, 8 * 128 * 2, 3, 3 * 8 * 128 * 2),  # bf16[8,128], 3 iterations
        "reduce-scatter": (1, 1, 8 * 128 * 4, 3, 3 * 8 * 128 * 4),  # its unreduced input
        "all-reduce": (1, 0, 4 * 128 * 4, 1, 4 * 128 * 4),
        "all-to-all": (0, 0, 0, 0, 0),
        "collective-permute": (1, 0, 4 * 128 * 4, 1, 4 * 128 * 4),  # the -done, once
    }


def test_a_loop_whose_trip_count_is_not_a_constant_counts_once_and_says_so():
    counts, known = hlo.collectives(HLO.replace("constant(3)", "parameter(1)"))
    assert not known and counts["all-gather"].per_step_count == 1


def test_the_rms_metrics_of_a_model_over_2_31_parameters_trace():
    """Compiling the 8B model found it: a parameter count over 2**31 overflowed as an int32."""
    from lm_align.train.step import rms_by_param

    big = {"w": jax.ShapeDtypeStruct((50_000, 50_000), jnp.float32)}  # 2.5e9 entries
    pooled, per_param = jax.eval_shape(lambda t: rms_by_param(t, False), big)
    assert pooled.shape == () and per_param["w"].dtype == jnp.float32
