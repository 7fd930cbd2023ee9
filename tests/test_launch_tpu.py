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
# WARNING: the 4 hosts write one run directory together, so it must be storage every host mounts at the same path, but --workdir runs/default is under ~/lm_align on each worker's own disk
# WARNING: add --bucket BUCKET (a Cloud Storage bucket that every worker mounts with gcsfuse; the run directory goes there) or give an absolute --workdir on storage every worker mounts at the same path; until then the launcher refuses to start this run
# 1. Create the TPU VM my-tpu: v5litepod-16, 4 hosts
gcloud compute tpus tpu-vm create my-tpu --zone=us-west4-a --project=my-project --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite
# 2. Wait until it is READY (checked every 30 s)
gcloud compute tpus tpu-vm describe my-tpu --zone=us-west4-a --project=my-project --format='value(state)'
# 3. Pack this lm_align checkout's git-tracked (and untracked, not ignored) files into {TMP}/lm_align-my-tpu.tar.gz (here, in Python)
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
# WARNING: the 8 hosts write one run directory together, so it must be storage every host mounts at the same path, but the default runs/<experiment> is under ~/lm_align on each worker's own disk
# WARNING: add --bucket BUCKET (a Cloud Storage bucket that every worker mounts with gcsfuse; the run directory goes there) or give an absolute --workdir on storage every worker mounts at the same path; until then the launcher refuses to start this run
# 1. Create the queued resource ms: 2 slices (ms-0, ms-1) of v5litepod-16, 4 hosts each (spot)
gcloud compute tpus queued-resources create ms --zone=us-west4-a --project=my-project --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --node-count=2 --node-prefix=ms --spot
# 2. Wait until it is ACTIVE (checked every 30 s)
gcloud compute tpus queued-resources describe ms --zone=us-west4-a --project=my-project --format='value(state.state)'
# 3. Pack this lm_align checkout's git-tracked (and untracked, not ignored) files into {TMP}/lm_align-ms.tar.gz (here, in Python)
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

SINGLE_V5E_16_BUCKET = f"""\
# accelerator v5e-16 is an alias of v5litepod-16
# v5litepod-16: TPU v5e, 16 chips over 4 hosts
# TPU software (runtime) version v2-alpha-tpuv5-lite
# --bucket: every worker mounts gs://my-bucket at ~/lm_align_bucket (gcsfuse), the same path on every host
# --workdir runs/default is taken relative to the bucket mount: the run directory is ~/lm_align_bucket/runs/default on all 4 hosts (gs://my-bucket/runs/default); it outlives the TPU
# 1. Create the TPU VM my-tpu: v5litepod-16, 4 hosts
gcloud compute tpus tpu-vm create my-tpu --zone=us-west4-a --project=my-project --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite
# 2. Wait until it is READY (checked every 30 s)
gcloud compute tpus tpu-vm describe my-tpu --zone=us-west4-a --project=my-project --format='value(state)'
# 3. Pack this lm_align checkout's git-tracked (and untracked, not ignored) files into {TMP}/lm_align-my-tpu.tar.gz (here, in Python)
# 4. Copy it to all 4 workers
gcloud compute tpus tpu-vm scp {TMP}/lm_align-my-tpu.tar.gz my-tpu:lm_align_src.tar.gz --zone=us-west4-a --project=my-project --worker=all
# 5. Unpack it to ~/lm_align, mount gs://my-bucket at ~/lm_align_bucket (gcsfuse, installed if missing) and install lm_align with jax[tpu] on all 4 workers (launch/tpu_worker_setup.sh)
gcloud compute tpus tpu-vm ssh my-tpu --zone=us-west4-a --project=my-project --worker=all --command='mkdir -p lm_align && tar -xzf lm_align_src.tar.gz -C lm_align && bash lm_align/launch/tpu_worker_setup.sh --bucket my-bucket --mount-dir lm_align_bucket'
# 6. Run lm-align train on all 4 workers at once (output prefixed [slice 0])
gcloud compute tpus tpu-vm ssh my-tpu --zone=us-west4-a --project=my-project --worker=all --command='cd lm_align && PYTHONUNBUFFERED=1 exec python3 -m lm_align.cli train --config experiments/default.py --workdir ../lm_align_bucket/runs/default --config.train.steps=1000'
"""  # noqa: E501

MULTISLICE_2_BUCKET = f"""\
# v5litepod-16: TPU v5e, 16 chips over 4 hosts per slice; 2 slices: 32 chips over 8 hosts
# TPU software (runtime) version v2-alpha-tpuv5-lite
# multislice: the queued resource gives every node its MEGASCALE_* settings (tpu-env metadata, read by jax); nothing is set by hand
# --bucket: every worker mounts gs://my-bucket at ~/lm_align_bucket (gcsfuse), the same path on every host
# no --workdir given: the run directory is ~/lm_align_bucket/runs/ms on all 8 hosts (gs://my-bucket/runs/ms); it outlives the TPU
# 1. Create the queued resource ms: 2 slices (ms-0, ms-1) of v5litepod-16, 4 hosts each (spot)
gcloud compute tpus queued-resources create ms --zone=us-west4-a --project=my-project --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --node-count=2 --node-prefix=ms --spot
# 2. Wait until it is ACTIVE (checked every 30 s)
gcloud compute tpus queued-resources describe ms --zone=us-west4-a --project=my-project --format='value(state.state)'
# 3. Pack this lm_align checkout's git-tracked (and untracked, not ignored) files into {TMP}/lm_align-ms.tar.gz (here, in Python)
# 4. Copy it to all 4 workers of slice 0 (ms-0)
gcloud compute tpus tpu-vm scp {TMP}/lm_align-ms.tar.gz ms-0:lm_align_src.tar.gz --zone=us-west4-a --project=my-project --worker=all
# 5. Copy it to all 4 workers of slice 1 (ms-1)
gcloud compute tpus tpu-vm scp {TMP}/lm_align-ms.tar.gz ms-1:lm_align_src.tar.gz --zone=us-west4-a --project=my-project --worker=all
# 6. Unpack it to ~/lm_align, mount gs://my-bucket at ~/lm_align_bucket (gcsfuse, installed if missing) and install lm_align with jax[tpu] on all 4 workers of slice 0 (launch/tpu_worker_setup.sh)
gcloud compute tpus tpu-vm ssh ms-0 --zone=us-west4-a --project=my-project --worker=all --command='mkdir -p lm_align && tar -xzf lm_align_src.tar.gz -C lm_align && bash lm_align/launch/tpu_worker_setup.sh --bucket my-bucket --mount-dir lm_align_bucket'
# 7. Unpack it to ~/lm_align, mount gs://my-bucket at ~/lm_align_bucket (gcsfuse, installed if missing) and install lm_align with jax[tpu] on all 4 workers of slice 1 (launch/tpu_worker_setup.sh)
gcloud compute tpus tpu-vm ssh ms-1 --zone=us-west4-a --project=my-project --worker=all --command='mkdir -p lm_align && tar -xzf lm_align_src.tar.gz -C lm_align && bash lm_align/launch/tpu_worker_setup.sh --bucket my-bucket --mount-dir lm_align_bucket'
# 8. Run lm-align train on all 4 workers of slice 0 at once, with the other slices (output prefixed [slice 0])
gcloud compute tpus tpu-vm ssh ms-0 --zone=us-west4-a --project=my-project --worker=all --command='cd lm_align && PYTHONUNBUFFERED=1 exec python3 -m lm_align.cli train --config experiments/default.py --config.train.steps=1000 --workdir ../lm_align_bucket/runs/ms'
# 9. Run lm-align train on all 4 workers of slice 1 at once, with the other slices (output prefixed [slice 1])
gcloud compute tpus tpu-vm ssh ms-1 --zone=us-west4-a --project=my-project --worker=all --command='cd lm_align && PYTHONUNBUFFERED=1 exec python3 -m lm_align.cli train --config experiments/default.py --config.train.steps=1000 --workdir ../lm_align_bucket/runs/ms'
# 10. Delete the queued resource ms and its nodes (--teardown)
gcloud compute tpus queued-resources delete ms --zone=us-west4-a --project=my-project --force --quiet
"""  # noqa: E501

XPK_2 = """\
# accelerator v5e-16 is an alias of v5litepod-16
# v5litepod-16: TPU v5e, 16 chips over 4 hosts per slice; 2 slices: 32 chips over 8 hosts
# WARNING: the 8 hosts write one run directory together, so it must be storage every host mounts at the same path, but the default runs/<experiment> is under the image's working directory, in each host's container
# WARNING: mount shared storage at the same path in every pod (e.g. a Cloud Storage bucket with GKE's Cloud Storage FUSE CSI driver) and give an absolute --workdir inside it; until then the launcher refuses to start this run
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


def test_dry_run_single_v5e_16_slice_with_bucket(capsys):
    """--bucket: every worker mounts it in the setup step; the relative --workdir is taken
    relative to the mount (the 4 hosts share it), and the comments say so."""
    status, out, err = launch(
        ["--dry-run", "--name", "my-tpu", "--accelerator", "v5e-16", "--zone", "us-west4-a",
         "--project", "my-project", "--bucket", "my-bucket", "--", "train", "--config",
         "experiments/default.py", "--workdir", "runs/default", "--config.train.steps=1000"],
        capsys,
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert out == SINGLE_V5E_16_BUCKET


def test_dry_run_two_slice_multislice_with_bucket(capsys):
    """gs:// is stripped; no --workdir: runs/NAME in the bucket, on all 8 hosts."""
    status, out, err = launch(
        ["--dry-run", "--name", "ms", "--accelerator", "v5litepod-16", "--num-slices", "2",
         "--zone", "us-west4-a", "--project", "my-project", "--spot", "--teardown",
         "--bucket", "gs://my-bucket", "--", "train", "--config", "experiments/default.py",
         "--config.train.steps=1000"],
        capsys,
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert out == MULTISLICE_2_BUCKET


@pytest.mark.parametrize(
    "command, workdir, comment",
    [
        (["align", "--config", "x.py", "--workdir=runs/a/"], "--workdir=../lm_align_bucket/runs/a",
         "# --workdir runs/a/ is taken relative to the bucket mount: the run directory is "
         "~/lm_align_bucket/runs/a on all 4 hosts (gs://b-1/runs/a); it outlives the TPU"),
        (["train", "--workdir", "/mnt/nfs/r"], "--workdir /mnt/nfs/r",
         "# --workdir /mnt/nfs/r is absolute: kept as given (not in the bucket)"),
        (["bench", "--config", "experiments/bench.py"], None, None),
    ],
)  # fmt: skip
def test_bucket_moves_only_a_relative_run_directory(command, workdir, comment, capsys):
    status, out, err = launch(["--dry-run", *BASE, "--bucket", "b-1", "--", *command], capsys)
    assert (status, err) == (0, "")
    assert "--bucket b-1 --mount-dir lm_align_bucket" in out  # mounted in any case
    run_line = out.splitlines()[-1]
    if workdir:
        assert f"{workdir}'" in run_line and comment in out.splitlines()
    else:
        assert "--workdir" not in run_line and "run directory" not in out
    assert "WARNING" not in out


def test_no_warning_for_one_host_or_an_absolute_workdir(capsys):
    one_host = ["--name", "t", "--accelerator", "v5e-8", "--zone", "z"]
    for argv in (
        [*one_host, "--", "train", "--workdir", "runs/x"],
        [*BASE, "--", "train", "--workdir", "/mnt/shared/x"],
        [*BASE, "--", "bench"],
    ):
        status, out, _ = launch(["--dry-run", *argv], capsys)
        assert status == 0 and "WARNING" not in out, argv


def test_real_run_over_several_hosts_needs_a_shared_run_directory(monkeypatch, capsys):
    """Without --bucket and with a relative --workdir the launcher refuses before running
    anything; an absolute --workdir (the user's own shared mount) is accepted."""
    ran = []
    monkeypatch.setattr(tpu, "execute", lambda steps, **kw: ran.append(steps) or 0)
    status, out, err = launch([*BASE, "--", "train", "--workdir", "runs/x"], capsys)
    assert status == 2 and ran == []
    assert err.startswith("error: the 4 hosts write one run directory together") and (
        "add --bucket BUCKET" in err and "an absolute --workdir" in err
    ), err
    status, out, err = launch([*BASE, "--", "train", "--workdir", "/mnt/shared/x"], capsys)
    assert status == 0 and len(ran) == 1
    status, out, err = launch([*BASE, "--bucket", "b-1", "--", "train"], capsys)
    assert status == 0 and len(ran) == 2


def test_setup_command_mounts_the_bucket():
    assert tpu.setup_command() == (
        "mkdir -p lm_align && tar -xzf lm_align_src.tar.gz -C lm_align && "
        "bash lm_align/launch/tpu_worker_setup.sh"
    )
    assert tpu.setup_command("b.c_d").endswith(
        "tpu_worker_setup.sh --bucket b.c_d --mount-dir lm_align_bucket"
    )


@pytest.mark.parametrize(
    "text, name",
    [("my-bucket", "my-bucket"), ("gs://my-bucket", "my-bucket"), ("gs://a.b_c-9/", "a.b_c-9"),
     (" abc ", "abc")],
)  # fmt: skip
def test_parse_bucket(text, name):
    assert tpu.parse_bucket(text) == name


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
        ([*BASE, "--bucket", "My-Bucket", "--", "train"],
         "--bucket 'My-Bucket': Cloud Storage bucket names are 3-63 lowercase letters, digits"),
        ([*BASE, "--bucket", "ab", "--", "train"], "--bucket 'ab': Cloud Storage bucket names"),
        ([*BASE, "--bucket", "gs://-ab", "--", "train"], "starting and ending with a letter"),
        ([*BASE, "--bucket", "x" * 64, "--", "train"], "are 3-63 lowercase letters"),
        ([*BASE, "--bucket", "gs://b-1/runs", "--", "train"],
         "--bucket 'gs://b-1/runs': give the bucket alone, without a path inside it (e.g. b-1)"),
        ([*BASE, "--bucket", "b-1", "--", "train", "--workdir", "../x"],
         "--workdir ../x leaves the bucket mount"),
        ([*BASE, "--gke-cluster", "c", "--docker-image", "i", "--bucket", "b-1", "--", "train"],
         "--bucket applies to TPU VMs, not to --gke-cluster"),
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
    """docs/launching_tpu.md pastes these dry runs (written where the temporary directory is
    /tmp): every line must still match; of the runs without --bucket, the warnings."""
    with open(os.path.join(SRC, "docs", "launching_tpu.md")) as f:
        doc = f.read()
    pasted = SINGLE_V5E_16_BUCKET + MULTISLICE_2_BUCKET + XPK_2
    warnings = [line for line in SINGLE_V5E_16.splitlines() if line.startswith("# WARNING")]
    assert len(warnings) == 2
    for line in pasted.replace(f"{TMP}/", "/tmp/").splitlines() + warnings:
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


SETUP_SCRIPT = os.path.join(SRC, tpu.SETUP_SCRIPT)
FAKE_TOOLS = {
    # Records its arguments; "mounts" by marking the mount point (its last argument).
    "gcsfuse": 'echo "gcsfuse $*" >>"$LOG"; touch "${@: -1}/.fake_mounted"',
    "mountpoint": '[ -L "${@: -1}" ] || [ -e "${@: -1}/.fake_mounted" ]',
    "lsb_release": "echo jammy",
    "curl": "echo FAKE-KEY",
    # `sudo tee F` logs what it would write; `sudo ... apt-get install ... gcsfuse` installs
    # the fake gcsfuse.
    "sudo": 'echo "sudo $*" >>"$LOG"; if [ "$1" = tee ]; then cat >>"$LOG"; fi; '
    'case "$*" in *apt-get*install*gcsfuse*) cp "$FAKES/gcsfuse" "$BIN/gcsfuse" ;; esac',
}


def _fake_worker(tmp_path, installed=True):
    """A fake worker: HOME, fake tools first on PATH; gcsfuse missing unless `installed`."""
    fakes, bin_dir, home = tmp_path / "fakes", tmp_path / "bin", tmp_path / "home"
    for d in (fakes, bin_dir, home):
        d.mkdir()
    for name, body in FAKE_TOOLS.items():
        (fakes / name).write_text(f"#!/bin/bash\n{body}\n")
        (fakes / name).chmod(0o755)
        if name != "gcsfuse" or installed:
            (bin_dir / name).symlink_to(fakes / name)
    env = dict(os.environ, HOME=str(home), LOG=str(tmp_path / "log"), FAKES=str(fakes))
    env.update(BIN=str(bin_dir), PATH=f"{bin_dir}:/usr/bin:/bin")
    return env


def _mount(env):
    """Sources the setup script (its main does not run) and calls mount_bucket."""
    import subprocess

    script = f'source "$1" && mount_bucket my-bucket "$HOME/{tpu.BUCKET_MOUNT}"'
    return subprocess.run(
        ["bash", "-c", script, "test", SETUP_SCRIPT], env=env, capture_output=True, text=True
    )


def test_setup_script_mounts_the_bucket_once(tmp_path):
    env = _fake_worker(tmp_path)
    first = _mount(env)
    assert first.returncode == 0, first.stderr
    mount = tmp_path / "home" / tpu.BUCKET_MOUNT
    assert "setup: mounted gs://my-bucket at" in first.stdout
    again = _mount(env)  # idempotent: a relaunch (--reuse) finds it mounted
    assert again.returncode == 0 and "already mounted" in again.stdout, again.stderr
    log = (tmp_path / "log").read_text().splitlines()
    assert log == [f"gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket {mount}"]
    assert os.listdir(mount) == [".fake_mounted"]  # the write check cleaned up after itself


def test_setup_script_installs_gcsfuse_when_missing(tmp_path):
    env = _fake_worker(tmp_path, installed=False)
    result = _mount(env)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "log").read_text()
    assert (
        "deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
        "https://packages.cloud.google.com/apt gcsfuse-jammy main\n"
    ) in log
    assert "sudo tee /usr/share/keyrings/cloud.google.asc\nFAKE-KEY\n" in log
    assert "apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse" in log
    assert log.rstrip().splitlines()[-1].startswith("gcsfuse --implicit-dirs")


def test_setup_script_says_when_the_bucket_is_read_only(tmp_path):
    env = _fake_worker(tmp_path)
    # "Mounted" (a link counts as mounted for the fake mountpoint) on a directory where
    # nobody, root included, can create a file.
    (tmp_path / "home" / tpu.BUCKET_MOUNT).symlink_to("/proc/self")
    result = _mount(env)
    assert result.returncode == 1, result.stderr
    assert "already mounted" in result.stdout
    assert "cannot write to gs://my-bucket" in result.stderr
    assert "roles/storage.objectUser" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [(["--bucket", "b"], "give both or neither"), (["--nope"], "usage:")],
)
def test_setup_script_argument_errors(args, message, tmp_path):
    import subprocess

    env = _fake_worker(tmp_path)
    result = subprocess.run(["bash", SETUP_SCRIPT, *args], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr, result.stderr
