"""`lm-align launch tpu`: the exact gcloud/xpk command sequences (--dry-run), input errors,
and the execution of a plan through a fake runner. No network, no gcloud."""

import argparse
import os
import tempfile

import pytest

from lm_align import cli
from lm_align import config as config_lib
from lm_align.launch import tpu


def parser():
    root = argparse.ArgumentParser(prog="lm-align")
    sub = root.add_subparsers(dest="command", required=True)
    launch = sub.add_parser("launch").add_subparsers(dest="launch_target", required=True)
    tpu.add_parser(launch)
    return root


def launch(argv, capsys):
    """Runs `lm-align launch tpu ARGV` as cli.main would; returns (status, stdout, stderr)."""
    overrides, rest = config_lib.parse_override_args(["launch", "tpu", *argv])
    args = parser().parse_args(rest)
    status = args.fn(args, overrides)
    out, err = capsys.readouterr()
    return status, out, err


SRC = tpu.SOURCE_DIR
TMP = tempfile.gettempdir()

SINGLE_V5E_16 = f"""\
# accelerator v5e-16 is an alias of v5litepod-16
# v5litepod-16: TPU v5e, 16 chips over 4 hosts
# TPU software (runtime) version v2-alpha-tpuv5-lite
# 1. Create the TPU VM my-tpu: v5litepod-16, 4 hosts
gcloud compute tpus tpu-vm create my-tpu --zone=us-west4-a --project=my-project --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite
# 2. Wait until it is READY (checked every 30 s)
gcloud compute tpus tpu-vm describe my-tpu --zone=us-west4-a --project=my-project --format='value(state)'
# 3. Pack the git-tracked (and untracked, not ignored) files of {SRC} into {TMP}/lm_align-my-tpu.tar.gz (here, in Python)
# 4. Copy it to all 4 workers
gcloud compute tpus tpu-vm scp {TMP}/lm_align-my-tpu.tar.gz my-tpu:lm_align_src.tar.gz --zone=us-west4-a --project=my-project --worker=all
# 5. Unpack it to ~/lm_align and install lm_align with jax[tpu] on all 4 workers (launch/tpu_worker_setup.sh)
gcloud compute tpus tpu-vm ssh my-tpu --zone=us-west4-a --project=my-project --worker=all --command='mkdir -p lm_align && tar -xzf lm_align_src.tar.gz -C lm_align && bash lm_align/launch/tpu_worker_setup.sh'
# 6. Run lm-align train on all 4 workers at once (output prefixed [slice 0])
gcloud compute tpus tpu-vm ssh my-tpu --zone=us-west4-a --project=my-project --worker=all --command='cd lm_align && PYTHONUNBUFFERED=1 exec python3 -m lm_align.cli train --config experiments/default.py --workdir runs/default --config.train.steps=1000'
"""  # noqa: E501

MULTISLICE_2 = f"""\
# v5litepod-16: TPU v5e, 16 chips over 4 hosts per slice; 2 slices: 32 chips over 8 hosts
# TPU software (runtime) version v2-alpha-tpuv5-lite
# multislice: the queued resource gives every node its MEGASCALE_* settings (tpu-env metadata, read by jax); nothing is set by hand
# 1. Create the queued resource ms: 2 slices (ms-0, ms-1) of v5litepod-16, 4 hosts each (spot)
gcloud compute tpus queued-resources create ms --zone=us-west4-a --project=my-project --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --node-count=2 --node-prefix=ms --spot
# 2. Wait until it is ACTIVE (checked every 30 s)
gcloud compute tpus queued-resources describe ms --zone=us-west4-a --project=my-project --format='value(state.state)'
# 3. Pack the git-tracked (and untracked, not ignored) files of {SRC} into {TMP}/lm_align-ms.tar.gz (here, in Python)
# 4. Copy it to all 4 workers of slice 0 (ms-0)
gcloud compute tpus tpu-vm scp {TMP}/lm_align-ms.tar.gz ms-0:lm_align_src.tar.gz --zone=us-west4-a --project=my-project --worker=all
# 5. Copy it to all 4 workers of slice 1 (ms-1)
gcloud compute tpus tpu-vm scp {TMP}/lm_align-ms.tar.gz ms-1:lm_align_src.tar.gz --zone=us-west4-a --project=my-project --worker=all
# 6. Unpack it to ~/lm_align and install lm_align with jax[tpu] on all 4 workers of slice 0 (launch/tpu_worker_setup.sh)
gcloud compute tpus tpu-vm ssh ms-0 --zone=us-west4-a --project=my-project --worker=all --command='mkdir -p lm_align && tar -xzf lm_align_src.tar.gz -C lm_align && bash lm_align/launch/tpu_worker_setup.sh'
# 7. Unpack it to ~/lm_align and install lm_align with jax[tpu] on all 4 workers of slice 1 (launch/tpu_worker_setup.sh)
gcloud compute tpus tpu-vm ssh ms-1 --zone=us-west4-a --project=my-project --worker=all --command='mkdir -p lm_align && tar -xzf lm_align_src.tar.gz -C lm_align && bash lm_align/launch/tpu_worker_setup.sh'
# 8. Run lm-align train on all 4 workers of slice 0 at once, with the other slices (output prefixed [slice 0])
gcloud compute tpus tpu-vm ssh ms-0 --zone=us-west4-a --project=my-project --worker=all --command='cd lm_align && PYTHONUNBUFFERED=1 exec python3 -m lm_align.cli train --config experiments/default.py --config.train.steps=1000'
# 9. Run lm-align train on all 4 workers of slice 1 at once, with the other slices (output prefixed [slice 1])
gcloud compute tpus tpu-vm ssh ms-1 --zone=us-west4-a --project=my-project --worker=all --command='cd lm_align && PYTHONUNBUFFERED=1 exec python3 -m lm_align.cli train --config experiments/default.py --config.train.steps=1000'
# 10. Delete the queued resource ms and its nodes (--teardown)
gcloud compute tpus queued-resources delete ms --zone=us-west4-a --project=my-project --force --quiet
"""  # noqa: E501

XPK_2 = """\
# accelerator v5e-16 is an alias of v5litepod-16
# v5litepod-16: TPU v5e, 16 chips over 4 hosts per slice; 2 slices: 32 chips over 8 hosts
# 1. Submit the workload lm-job to the GKE cluster my-cluster: 2 slices of v5litepod-16 (8 hosts), image gcr.io/my-project/lm_align:latest, the command on every host
xpk workload create --cluster=my-cluster --workload=lm-job --tpu-type=v5litepod-16 --num-slices=2 --docker-image=gcr.io/my-project/lm_align:latest --zone=us-west4-a --project=my-project --command='python3 -m lm_align.cli train --config experiments/default.py --config.train.steps=1000'
# 2. Follow it until it ends (logs: Cloud Logging, or kubectl logs on the cluster)
xpk workload list --cluster=my-cluster --wait-for-job-completion=lm-job --zone=us-west4-a --project=my-project
# 3. Delete the workload lm-job (--teardown)
xpk workload delete --cluster=my-cluster --workload=lm-job --zone=us-west4-a --project=my-project --force
"""  # noqa: E501


def test_dry_run_single_v5e_16_slice(capsys):
    """v5e-16 (alias of v5litepod-16): one TPU VM, 4 hosts, every command in order."""
    status, out, err = launch(
        ["--dry-run", "--name", "my-tpu", "--accelerator", "v5e-16", "--zone", "us-west4-a",
         "--project", "my-project", "--", "train", "--config", "experiments/default.py",
         "--workdir", "runs/default", "--config.train.steps=1000"],
        capsys,
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert out == SINGLE_V5E_16


def test_dry_run_two_slice_multislice_queued_resource(capsys):
    """2 slices: one queued resource (--node-count 2), per-slice copy/setup/run, --teardown."""
    status, out, err = launch(
        ["--dry-run", "--name", "ms", "--accelerator", "v5litepod-16", "--num-slices", "2",
         "--zone", "us-west4-a", "--project", "my-project", "--spot", "--teardown",
         "--config.train.steps=1000", "--", "lm-align", "train", "--config",
         "experiments/default.py"],
        capsys,
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert out == MULTISLICE_2


def test_dry_run_gke_with_xpk(capsys):
    status, out, err = launch(
        ["--dry-run", "--name", "lm-job", "--accelerator", "v5e-16", "--num-slices", "2",
         "--zone", "us-west4-a", "--project", "my-project", "--gke-cluster", "my-cluster",
         "--docker-image", "gcr.io/my-project/lm_align:latest", "--teardown", "--", "train",
         "--config", "experiments/default.py", "--config.train.steps=1000"],
        capsys,
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert out == XPK_2


def test_cli_wires_launch_tpu(capsys):
    status = cli.main(
        ["launch", "tpu", "--dry-run", "--name", "t", "--accelerator", "v4-8", "--zone", "z",
         "--", "train"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    assert "# v4-8: TPU v4, 4 chips over 1 host\n" in out
    assert "--version=tpu-ubuntu2204-base" in out and "--project" not in out


@pytest.mark.parametrize(
    "accelerator, chips, hosts, runtime",
    [
        ("v4-8", 4, 1, "tpu-ubuntu2204-base"),
        ("v4-32", 16, 4, "tpu-ubuntu2204-base"),
        ("v5p-16", 8, 2, "v2-alpha-tpuv5"),
        ("v5e-8", 8, 1, "v2-alpha-tpuv5-lite"),
        ("v5litepod-256", 256, 64, "v2-alpha-tpuv5-lite"),
        ("v6e-4", 4, 1, "v2-alpha-tpuv6e"),
        ("v6e-64", 64, 16, "v2-alpha-tpuv6e"),
    ],
)
def test_accelerator_chips_hosts_and_runtime(accelerator, chips, hosts, runtime):
    acc = tpu.parse_accelerator(accelerator)
    assert (acc.chips, acc.hosts, acc.generation.runtime_version) == (chips, hosts, runtime)


BASE = ["--name", "t", "--accelerator", "v5e-16", "--zone", "us-west4-a"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--name", "t", "--accelerator", "v7-8", "--zone", "z", "--", "train"],
         "unknown accelerator 'v7-8'; use v4-N or v5p-N"),
        (["--name", "t", "--accelerator", "v5e-12", "--zone", "z", "--", "train"],
         "accelerator 'v5e-12': v5e slices have 1, 4, 8, 16, 32, 64, 128, 256 chips; "
         "use e.g. v5litepod-16"),
        (["--name", "t", "--accelerator", "v4-12", "--zone", "z", "--", "train"],
         "N must be a multiple of 8, e.g. v4-8 or v4-16"),
        ([*BASE, "--num-slices", "0", "--", "train"], "--num-slices=0; use 1 (one TPU VM) or more"),
        ([*BASE, "--"], "no command after `--`: give the lm-align command every worker runs"),
        (BASE, "no command after `--`"),
        ([*BASE, "--gke-cluster", "c", "--", "train"],
         "--gke-cluster and --docker-image go together"),
        ([*BASE, "--gke-cluster", "c", "--docker-image", "i", "--spot", "--", "train"],
         "--spot applies to TPU VMs, not to --gke-cluster"),
        (["--name", "My_TPU", "--accelerator", "v4-8", "--zone", "z", "--", "train"],
         "--name 'My_TPU': TPU and workload names are lowercase letters"),
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_error(argv, message, capsys):
    status, out, err = launch(["--dry-run", *argv], capsys)
    assert status == 2 and out == ""
    assert err.startswith("error: ") and message in err, err


class FakeRunner:
    """Records every command; `describe` prints `state`; the run step exits `run_status`."""

    def __init__(self, state="READY", lookup_found=True, run_status=0):
        self.calls = []
        self.state, self.lookup_found, self.run_status = state, lookup_found, run_status

    def __call__(self, argv, prefix=None, out=None, err=None):
        self.calls.append(list(argv))
        if "describe" in argv:
            if len(self.calls) == 1 and not self.lookup_found:
                return tpu.Result(1, "")
            return tpu.Result(0, self.state + "\n")
        if any(a.startswith("--command=cd lm_align") for a in argv):
            return tpu.Result(self.run_status)
        return tpu.Result(0)

    def verbs(self):
        return [" ".join(c[3:5]) if c[0] == "gcloud" else " ".join(c[:3]) for c in self.calls]


def _job(capsys, *extra):
    args = parser().parse_args(["launch", "tpu", *BASE, *extra, "--", "train"])
    return tpu.job_from_args(args)


def test_execute_reuses_an_existing_tpu_and_tears_down(monkeypatch, capsys):
    monkeypatch.setattr(tpu, "pack_source", lambda src, archive: 3)
    job = _job(capsys, "--reuse", "--teardown")
    runner = FakeRunner()
    status = tpu.execute(tpu.plan(job), job=job, runner=runner, poll_s=0, log=lambda s: None)
    assert status == 0
    assert runner.verbs() == [
        "tpu-vm describe",  # lookup: found, so no create
        "tpu-vm describe",  # wait: READY
        "tpu-vm scp",
        "tpu-vm ssh",  # setup
        "tpu-vm ssh",  # the command
        "tpu-vm delete",  # --teardown
    ]


def test_execute_creates_waits_and_tears_down_after_a_failure(monkeypatch, capsys):
    monkeypatch.setattr(tpu, "pack_source", lambda src, archive: 3)
    job = _job(capsys, "--reuse", "--teardown")
    runner = FakeRunner(lookup_found=False, run_status=7)
    status = tpu.execute(tpu.plan(job), job=job, runner=runner, poll_s=0, log=lambda s: None)
    assert status == 7  # the workers' exit status
    assert runner.verbs()[:3] == ["tpu-vm describe", "tpu-vm create", "tpu-vm describe"]
    assert runner.verbs()[-1] == "tpu-vm delete"


def test_execute_stops_on_a_preempted_tpu_and_still_tears_down(monkeypatch, capsys):
    monkeypatch.setattr(tpu, "pack_source", lambda src, archive: 3)
    job = _job(capsys, "--teardown")
    runner = FakeRunner(state="PREEMPTED")
    with pytest.raises(tpu.LaunchError, match="t is PREEMPTED"):
        tpu.execute(tpu.plan(job), job=job, runner=runner, poll_s=0, log=lambda s: None)
    assert runner.verbs() == ["tpu-vm create", "tpu-vm describe", "tpu-vm delete"]


def test_pack_source_holds_the_checkout_files(tmp_path):
    import subprocess
    import tarfile

    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    (src / ".gitignore").write_text("ignored/\n")
    (src / "pkg" / "a.py").write_text("x = 1\n")
    (src / "ignored").mkdir()
    (src / "ignored" / "big.bin").write_text("no")
    archive = str(tmp_path / "out.tar.gz")
    assert tpu.pack_source(str(src), archive) == 2
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == [".gitignore", "pkg/a.py"]
    with pytest.raises(tpu.LaunchError, match="not a git checkout"):
        tpu.pack_source(str(tmp_path / "nowhere"), archive)
    assert os.path.exists(archive)


def test_docs_show_the_current_dry_run_commands():
    """docs/launching_tpu.md pastes these dry runs: every command line must still match."""
    with open(os.path.join(SRC, "docs", "launching_tpu.md")) as f:
        doc = f.read()
    for text in (SINGLE_V5E_16, MULTISLICE_2, XPK_2):
        for line in text.splitlines():
            if TMP not in line and SRC not in line:
                assert line in doc, line


def test_ctrl_c_stops_the_workers_then_tears_down(monkeypatch, capsys):
    monkeypatch.setattr(tpu, "pack_source", lambda src, archive: 3)
    real = tpu._run_parallel

    def interrupted(runner, group):
        if "exec python3" in group[0].argv[-1]:  # the command itself: Ctrl-C while it runs
            raise KeyboardInterrupt
        return real(runner, group)

    monkeypatch.setattr(tpu, "_run_parallel", interrupted)
    job = _job(capsys, "--num-slices", "2", "--teardown")
    runner = FakeRunner(state="ACTIVE")
    status = tpu.execute(tpu.plan(job), job=job, runner=runner, poll_s=0, log=lambda s: None)
    assert status == 130
    stops = [c[5] for c in runner.calls if "pkill" in c[-1]]
    assert stops == ["t-0", "t-1"]  # SIGTERM to every slice's workers
    assert runner.verbs()[-1] == "queued-resources delete"
