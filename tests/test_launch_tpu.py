"""`lm-align launch tpu`: the argv of every step (`launch_steps`), the interpreter
(`steps.execute`) against a fake runner (reuse, failures, preemption, Ctrl-C, teardown), input
errors, and the worker setup script against fake tools. No network, no gcloud."""

import argparse
import os
import signal
import tempfile
import threading
import time

import pytest

from lm_align import cli
from lm_align import config as config_lib
from lm_align.launch import commands, gcloud, steps, tpu
from lm_align.launch.accelerators import parse_accelerator
from lm_align.launch.steps import Create, Pack, Result, Teardown, Together, Wait

SRC = steps.SOURCE_DIR
TMP = tempfile.gettempdir()
LOC = ["--zone=us-west4-a", "--project=my-project"]
VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
SETUP = (
    "mkdir -p lm_align && tar -xzf lm_align_src.tar.gz -C lm_align && "
    "bash lm_align/launch/tpu_worker_setup.sh"
)
MOUNT = " --bucket my-bucket --mount-dir lm_align_bucket"
RUN = "cd lm_align && PYTHONUNBUFFERED=1 exec python3 -m lm_align.cli"
STOP = "pkill -TERM -f '[l]m_align[.]cli' || true"
BASE = ["--name", "t", "--accelerator", "v5e-16", "--zone", "us-west4-a"]


def parser():
    root = argparse.ArgumentParser(prog="lm-align")
    commands.add_parsers(root.add_subparsers(dest="command", required=True))
    return root


def job_of(*argv):
    """The checked Job of `lm-align launch tpu ARGV` (overrides parsed as cli.main does)."""
    overrides, rest = config_lib.parse_override_args(["launch", "tpu", *argv])
    return tpu.job_from_args(parser().parse_args(rest), overrides)


def launch(argv, capsys, runner=None):
    """Runs `lm-align launch tpu ARGV` as cli.main would; returns (status, stdout, stderr)."""
    overrides, rest = config_lib.parse_override_args(["launch", "tpu", *argv])
    args = parser().parse_args(rest)
    status = args.fn(args, overrides, runner=runner)
    out, err = capsys.readouterr()
    return status, out, err


def argvs(step_list):
    """The argv of every command the steps run into an empty cloud (the dry run), in order."""
    return [list(s.argv) if s.argv else None for s in steps.dry_run(step_list)]


# ---------------------------------------------------------------------------
# The steps of a launch


def test_one_slice_with_a_bucket():
    """v5e-16 (alias of v5litepod-16): one TPU VM of 4 hosts; the bucket is mounted in the
    setup step and the relative --workdir is moved into it."""
    job = job_of("--name", "my-tpu", "--accelerator", "v5e-16", "--zone", "us-west4-a",
                 "--project", "my-project", "--bucket", "my-bucket", "--", "train", "--config",
                 "experiments/default.py", "--workdir", "runs/default",
                 "--config.train.steps=1000")  # fmt: skip
    plan = tpu.launch_steps(job)
    assert [type(s) for s in plan] == [Create, Wait, Pack, Together, Together, Together]
    create, wait, pack, copy, setup, run = plan
    assert create.lookup is None and (wait.ready, wait.dead) == ("READY", gcloud.TPU_VM_DEAD)
    assert (pack.source_dir, pack.archive) == (SRC, f"{TMP}/lm_align-my-tpu.tar.gz")
    assert [r.prefix for r in copy.runs + setup.runs + run.runs] == ["[slice 0] "] * 3
    assert (copy.main, setup.main, run.main) == (False, False, True)
    assert run.stop == ((*VM, "ssh", "my-tpu", *LOC, "--worker=all", f"--command={STOP}"),)
    train = "train --config experiments/default.py --workdir ../lm_align_bucket/runs/default"
    assert argvs(plan) == [
        [*VM, "create", "my-tpu", *LOC, "--accelerator-type=v5litepod-16",
         "--version=v2-alpha-tpuv5-lite"],
        [*VM, "describe", "my-tpu", *LOC, "--format=value(state)"],
        None,  # pack, here
        [*VM, "scp", f"{TMP}/lm_align-my-tpu.tar.gz", "my-tpu:lm_align_src.tar.gz", *LOC,
         "--worker=all"],
        [*VM, "ssh", "my-tpu", *LOC, "--worker=all", f"--command={SETUP}{MOUNT}"],
        [*VM, "ssh", "my-tpu", *LOC, "--worker=all",
         f"--command={RUN} {train} --config.train.steps=1000"],
    ]  # fmt: skip


def test_two_slices_are_one_queued_resource_reused_and_torn_down():
    """--num-slices 2: a queued resource (looked up first with --reuse) whose nodes ms-0 and
    ms-1 each get the checkout and run the command together; --teardown deletes it."""
    job = job_of("--name", "ms", "--accelerator", "v5litepod-16", "--num-slices", "2",
                 "--zone", "us-west4-a", "--project", "my-project", "--spot", "--reuse",
                 "--teardown", "--config.train.steps=1000", "--", "lm-align", "train")  # fmt: skip
    plan = tpu.launch_steps(job)
    assert [type(s) for s in plan] == [Create, Wait, Pack, Together, Together, Together, Teardown]
    create, wait, *_, run, _ = plan
    describe = [*QR, "describe", "ms", *LOC, "--format=value(state.state)"]
    assert list(create.lookup.argv) == describe and create.lookup.delete is None
    assert create.lookup.dead == wait.dead == gcloud.QUEUED_RESOURCE_DEAD
    assert wait.ready == "ACTIVE"
    assert [r.prefix for r in run.runs] == ["[slice 0] ", "[slice 1] "]
    assert [a[5] for a in run.stop] == ["ms-0", "ms-1"]
    archive = f"{TMP}/lm_align-ms.tar.gz"
    assert argvs(plan) == [
        describe,
        [*QR, "create", "ms", *LOC, "--accelerator-type=v5litepod-16",
         "--runtime-version=v2-alpha-tpuv5-lite", "--node-count=2", "--node-prefix=ms", "--spot"],
        describe,
        None,
        [*VM, "scp", archive, "ms-0:lm_align_src.tar.gz", *LOC, "--worker=all"],
        [*VM, "scp", archive, "ms-1:lm_align_src.tar.gz", *LOC, "--worker=all"],
        [*VM, "ssh", "ms-0", *LOC, "--worker=all", f"--command={SETUP}"],
        [*VM, "ssh", "ms-1", *LOC, "--worker=all", f"--command={SETUP}"],
        [*VM, "ssh", "ms-0", *LOC, "--worker=all", f"--command={RUN} train --config.train.steps=1000"],
        [*VM, "ssh", "ms-1", *LOC, "--worker=all", f"--command={RUN} train --config.train.steps=1000"],
        [*QR, "delete", "ms", *LOC, "--force", "--quiet"],
    ]  # fmt: skip


def test_gke_with_xpk():
    job = job_of("--name", "lm-job", "--accelerator", "v5e-16", "--num-slices", "2", "--zone",
                 "us-west4-a", "--project", "my-project", "--gke-cluster", "my-cluster",
                 "--docker-image", "gcr.io/p/lm_align:latest", "--teardown", "--", "train",
                 "--config", "experiments/default.py")  # fmt: skip
    plan = tpu.launch_steps(job)
    assert plan[1].main and plan[1].stop == ()  # xpk's pods get no pkill
    assert argvs(plan) == [
        ["xpk", "workload", "create", "--cluster=my-cluster", "--workload=lm-job",
         "--tpu-type=v5litepod-16", "--num-slices=2", "--docker-image=gcr.io/p/lm_align:latest",
         *LOC, "--command=python3 -m lm_align.cli train --config experiments/default.py"],
        ["xpk", "workload", "list", "--cluster=my-cluster", "--wait-for-job-completion=lm-job",
         *LOC],
        ["xpk", "workload", "delete", "--cluster=my-cluster", "--workload=lm-job", *LOC, "--force"],
    ]  # fmt: skip


def test_runtime_version_overrides_the_generations_default():
    plan = tpu.launch_steps(job_of(*BASE, "--runtime-version", "v2-custom", "--", "bench"))
    assert plan[0].argv[-1] == "--version=v2-custom"
    assert tpu.launch_steps(job_of(*BASE, "--", "bench"))[0].argv[-1] == (
        "--version=v2-alpha-tpuv5-lite"
    )


@pytest.mark.parametrize(
    "command, moved",
    [
        (["align", "--config", "x.py", "--workdir=runs/a/"],
         ["align", "--config", "x.py", "--workdir=../lm_align_bucket/runs/a"]),
        (["train"], ["train", "--workdir", "../lm_align_bucket/runs/t"]),
        (["train", "--workdir", "/mnt/nfs/r"], ["train", "--workdir", "/mnt/nfs/r"]),
        (["bench", "--workdir", "x"], ["bench", "--workdir", "x"]),
    ],
)  # fmt: skip
def test_bucket_moves_only_a_relative_run_directory_of_train_and_align(command, moved):
    job = job_of(*BASE, "--bucket", "b-1", "--", *command)
    assert list(job.command) == moved
    assert tpu.shared_dir_problem(job) is None
    setup = tpu.launch_steps(job)[4].runs[0].argv[-1]
    assert setup.endswith("tpu_worker_setup.sh --bucket b-1 --mount-dir lm_align_bucket")


@pytest.mark.parametrize(
    "argv, shared",
    [
        (["--name", "t", "--accelerator", "v5e-8", "--zone", "z", "--", "train"], True),
        ([*BASE, "--", "train", "--workdir", "/mnt/shared/x"], True),
        ([*BASE, "--", "bench"], True),
        ([*BASE, "--", "train", "--workdir", "runs/x"], False),
        ([*BASE, "--num-slices", "2", "--", "train"], False),
        (["--name", "t", "--accelerator", "v4-8", "--zone", "z", "--num-slices", "2",
          "--gke-cluster", "c", "--docker-image", "i", "--", "align"], False),
    ],
)  # fmt: skip
def test_which_jobs_need_a_shared_run_directory(argv, shared):
    """One host, an absolute --workdir or a command without a run directory is fine; a
    relative one over several hosts (slices, or GKE pods) is not."""
    problem = tpu.shared_dir_problem(job_of(*argv))
    assert (problem is None) == shared


# ---------------------------------------------------------------------------
# The command line


def test_dry_run_prints_each_step_then_its_command_line(capsys):
    """The printed command lines are the steps' argvs, shell-quoted, each under `# N.`."""
    argv = [*BASE, "--project", "my-project", "--bucket", "my-bucket", "--teardown", "--",
            "train", "--config", "experiments/default.py"]  # fmt: skip
    status, out, err = launch(["--dry-run", *argv], capsys)
    assert (status, err) == (0, "")
    expected = argvs(tpu.launch_steps(job_of(*argv)))
    lines = out.splitlines()
    numbered = [i for i, line in enumerate(lines) if line.startswith("# ") and ". " in line[:6]]
    assert [lines[i].split(".")[0] for i in numbered] == [f"# {n}" for n in range(1, 8)]
    shown = [lines[i + 1] if argv else None for i, argv in zip(numbered, expected, strict=True)]
    assert shown == [gcloud.shell_line(a) if a else None for a in expected]
    assert lines[0] == "# accelerator v5e-16 is an alias of v5litepod-16"


def test_shell_line_quotes_values_and_keeps_flags_outside():
    assert gcloud.shell_line(["a", "--format=value(state)", "--command=x && y", "it's"]) == (
        "a --format='value(state)' --command='x && y' 'it'\"'\"'s'"
    )


def test_cli_wires_launch_tpu(capsys):
    status = cli.main(
        ["launch", "tpu", "--dry-run", "--skip-fit-check", "--name", "t", "--accelerator", "v4-8",
         "--zone", "z", "--", "train"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    assert gcloud.shell_line([*VM, "create", "t", "--zone=z", "--accelerator-type=v4-8",
                              "--version=tpu-ubuntu2204-base"]) in out.splitlines()  # fmt: skip


def test_docs_show_the_current_dry_runs():
    """docs/launching_tpu.md pastes these dry runs (written where the temporary directory is
    /tmp): every line they print must still be in it."""
    with open(os.path.join(SRC, "docs", "launching_tpu.md")) as f:
        doc = f.read()
    runs = [
        ["--name", "my-tpu", "--accelerator", "v5e-16", "--zone", "us-west4-a", "--project",
         "my-project", "--bucket", "my-bucket", "--", "train", "--config",
         "experiments/default.py", "--workdir", "runs/default", "--config.train.steps=1000"],
        ["--name", "ms", "--accelerator", "v5litepod-16", "--num-slices", "2", "--zone",
         "us-west4-a", "--project", "my-project", "--spot", "--teardown", "--bucket",
         "gs://my-bucket", "--", "train", "--config", "experiments/default.py",
         "--config.train.steps=1000"],
        ["--name", "lm-job", "--accelerator", "v5e-16", "--num-slices", "2", "--zone",
         "us-west4-a", "--project", "my-project", "--gke-cluster", "my-cluster",
         "--docker-image", "gcr.io/my-project/lm_align:latest", "--teardown", "--", "train",
         "--config", "experiments/default.py", "--config.train.steps=1000"],
    ]  # fmt: skip
    for argv in runs:
        out = []
        job = job_of(*argv)
        out += tpu.header(job)
        steps.dry_run(tpu.launch_steps(job), out.append)
        for line in out:
            assert line.replace(f"{TMP}/", "/tmp/") in doc, line
    warnings = [line for line in tpu.header(job_of(*BASE, "--", "train", "--workdir", "runs/x"))
                if line.startswith("# WARNING")]  # fmt: skip
    assert len(warnings) == 2
    for line in warnings:
        assert line.replace("runs/x", "runs/default") in doc, line


def test_the_python_example_of_the_docs_runs(capsys):
    """docs/launching_tpu.md's ```python block prints the steps of a one-host launch."""
    with open(os.path.join(SRC, "docs", "launching_tpu.md")) as f:
        blocks = f.read().split("```python\n")[1:]
    assert len(blocks) == 1
    exec(compile(blocks[0].split("```")[0], "docs/launching_tpu.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# Create the TPU VM my-tpu: v5litepod-8, 1 host"
    assert lines[1].split() == [
        *VM,
        "create",
        "my-tpu",
        "--zone=us-west4-a",
        "--accelerator-type=v5litepod-8",
        "--version=v2-alpha-tpuv5-lite",
    ]
    assert lines[-1].startswith("gcloud compute tpus tpu-vm ssh my-tpu")


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
    acc = parse_accelerator(accelerator)
    assert (acc.chips, acc.hosts, acc.generation.runtime_version) == (chips, hosts, runtime)


@pytest.mark.parametrize(
    "text, name",
    [("my-bucket", "my-bucket"), ("gs://my-bucket", "my-bucket"), ("gs://a.b_c-9/", "a.b_c-9"),
     (" abc ", "abc")],
)  # fmt: skip
def test_parse_bucket(text, name):
    assert gcloud.parse_bucket(text) == name


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
        ([*BASE, "--num-slices", "0", "--", "train"], "--num-slices=0; use 1 or more"),
        ([*BASE, "--"], "no command after `--`: give the lm-align command every worker runs"),
        (BASE, "no command after `--`"),
        ([*BASE, "--gke-cluster", "c", "--", "train"],
         "--gke-cluster and --docker-image go together"),
        ([*BASE, "--gke-cluster", "c", "--docker-image", "i", "--spot", "--", "train"],
         "--spot applies to TPU VMs, not to --gke-cluster"),
        (["--name", "My_TPU", "--accelerator", "v4-8", "--zone", "z", "--", "train"],
         "--name 'My_TPU': TPU and workload names are lowercase letters"),
        (["--name", "a" * 61, "--accelerator", "v4-8", "--zone", "z", "--num-slices", "2", "--",
          "train"], f"node name '{'a' * 61}-0': TPU and workload names"),
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


# ---------------------------------------------------------------------------
# Running the steps


class FakeRunner:
    """Records every command. A describe prints the next of `states` (the last one again
    when they run out; None: not found); the workers' command exits `run_status`."""

    def __init__(self, states=("READY",), run_status=0, on_run=None):
        self.calls, self.packed = [], []
        self.states, self.run_status, self.on_run = list(states), run_status, on_run

    def __call__(self, argv, *, prefix=None, out=None, err=None):
        self.calls.append(list(argv))
        if "describe" in argv:
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return Result(1, "") if state is None else Result(0, state + "\n")
        if argv[-1].startswith(f"--command={RUN}"):
            if self.on_run:
                self.on_run()
            return Result(self.run_status)
        return Result(0)

    def pack(self, source_dir, archive):
        self.packed.append((source_dir, archive))
        return 3

    def verbs(self):
        return [" ".join(c[3:5]) if c[0] == "gcloud" else " ".join(c[:3]) for c in self.calls]


def run_job(runner, *argv):
    job = job_of(*BASE, *argv, "--", "train", "--workdir", "/mnt/shared/x")
    return steps.execute(tpu.launch_steps(job), runner, poll_s=0, log=lambda s: None,
                         show=lambda comment, argv: None)  # fmt: skip


def test_reuse_keeps_an_existing_tpu_and_tears_down():
    runner = FakeRunner()
    assert run_job(runner, "--reuse", "--teardown") == 0
    assert runner.verbs() == [
        "tpu-vm describe",  # lookup: found, so no create
        "tpu-vm describe",  # wait: READY
        "tpu-vm scp",
        "tpu-vm ssh",  # setup
        "tpu-vm ssh",  # the command
        "tpu-vm delete",  # --teardown
    ]
    assert runner.packed == [(SRC, f"{TMP}/lm_align-t.tar.gz")]


def test_reuse_creates_a_missing_tpu_waits_and_passes_the_workers_status_on():
    runner = FakeRunner(states=[None, "CREATING", "CREATING", "READY"], run_status=7)
    assert run_job(runner, "--reuse", "--teardown") == 7  # the workers' exit status
    assert runner.verbs()[:5] == ["tpu-vm describe", "tpu-vm create"] + ["tpu-vm describe"] * 3
    assert runner.verbs()[-1] == "tpu-vm delete"


def test_reuse_refuses_a_dead_tpu():
    runner = FakeRunner(states=["PREEMPTED"])
    with pytest.raises(gcloud.LaunchError, match="t exists but is PREEMPTED: delete it"):
        run_job(runner, "--reuse")
    assert runner.verbs() == ["tpu-vm describe"]


def test_a_tpu_preempted_while_waiting_stops_the_launch_and_is_still_torn_down():
    runner = FakeRunner(states=["PREEMPTED"])
    with pytest.raises(gcloud.LaunchError, match="t is PREEMPTED"):
        run_job(runner, "--teardown")
    assert runner.verbs() == ["tpu-vm create", "tpu-vm describe", "tpu-vm delete"]
    assert runner.packed == []


def test_a_failed_setup_stops_before_the_command():
    class FailingSetup(FakeRunner):
        def __call__(self, argv, **kw):
            result = super().__call__(argv, **kw)
            return Result(5) if "tpu_worker_setup.sh" in argv[-1] else result

    runner = FailingSetup()
    with pytest.raises(gcloud.LaunchError, match="step failed .exit status 5.: Unpack it"):
        run_job(runner)
    assert runner.verbs()[-1] == "tpu-vm ssh" and "setup" in runner.calls[-1][-1]


def test_ctrl_c_stops_the_workers_then_tears_down():
    """Ctrl-C while the command runs: pkill on every slice's workers, then --teardown."""

    def interrupt():  # in a runner thread, as the terminal's SIGINT would arrive
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the command is still running when the main thread handles it (loaded CI)

    runner = FakeRunner(states=["ACTIVE"], on_run=interrupt)
    assert threading.current_thread() is threading.main_thread()
    # Python's own SIGINT handler, whatever an earlier test in this process installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert run_job(runner, "--num-slices", "2", "--teardown") == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    stops = [c[5] for c in runner.calls if c[-1] == f"--command={STOP}"]
    assert stops == ["t-0", "t-1"]  # SIGTERM to every slice's workers
    assert runner.verbs()[-1] == "queued-resources delete"


def test_a_run_over_several_hosts_needs_a_shared_run_directory(capsys):
    """Without --bucket and with a relative --workdir the launcher refuses before running
    anything; an absolute --workdir (the user's own shared mount) or --bucket is accepted."""
    runner = FakeRunner()
    status, _, err = launch([*BASE, "--", "train", "--workdir", "runs/x"], capsys, runner)
    assert status == 2 and runner.calls == []
    assert err.startswith("error: the 4 hosts write one run directory together") and (
        "add --bucket BUCKET" in err and "an absolute --workdir" in err
    ), err
    status, _, _ = launch([*BASE, "--", "train", "--workdir", "/mnt/shared/x"], capsys, runner)
    assert status == 0 and runner.verbs()[0] == "tpu-vm create"
    runner = FakeRunner()
    status, _, _ = launch([*BASE, "--bucket", "b-1", "--", "train"], capsys, runner)
    assert status == 0 and runner.verbs()[0] == "tpu-vm create"


# ---------------------------------------------------------------------------
# The interpreter


def run_step(step, runner, **kw):
    return steps.execute([step], runner, show=lambda c, a: None, log=lambda s: None, **kw)


def test_a_lookup_with_delete_recreates_a_dead_tpu():
    lookup = steps.Lookup("look up", ("describe",), ("PREEMPTED",), delete=("delete",))
    runner = FakeRunner(states=["PREEMPTED"])
    run_step(Create("create", ("create",), "t", lookup), runner)
    assert runner.calls == [["describe"], ["delete"], ["create"]]


def test_wait_times_out():
    runner = FakeRunner(states=["CREATING"])
    with pytest.raises(gcloud.LaunchError, match="t was not READY after 0 s .last: CREATING."):
        run_step(Wait("wait", ("describe",), "t", "READY"), runner, poll_s=0, timeout_s=0)


def test_together_fails_on_any_failure_unless_main():
    class Codes(FakeRunner):
        def __call__(self, argv, **kw):
            self.calls.append(list(argv))
            return Result(int(argv[0]))

    runs = (steps.Run("a", ("0",)), steps.Run("b", ("4",)), steps.Run("c", ("6",)))
    assert run_step(Together(runs, main=True), Codes()) == 4
    with pytest.raises(gcloud.LaunchError, match="exit status 4.: b"):
        run_step(Together(runs), Codes())


def test_a_failed_teardown_says_how_to_delete_by_hand():
    class Fails(FakeRunner):
        def __call__(self, argv, **kw):
            return Result(1)

    lines = []
    steps.execute([Teardown("delete", ("gcloud", "delete", "t"))], Fails(),
                  show=lambda c, a: None, log=lines.append)  # fmt: skip
    assert lines == ["teardown failed (exit status 1); delete it by hand: gcloud delete t"]


def test_the_dry_runner_runs_and_packs_nothing(tmp_path):
    archive = tmp_path / "a.tar.gz"
    shown = steps.dry_run([Pack(str(tmp_path), str(archive)), steps.Run("x", ("false",))])
    assert [s.argv for s in shown] == [None, ("false",)]
    assert not archive.exists()  # tmp_path is not even a git checkout


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
    assert steps.pack_source(str(src), archive) == 2
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == [".gitignore", "pkg/a.py"]
    with pytest.raises(gcloud.LaunchError, match="not a git checkout"):
        steps.pack_source(str(tmp_path / "nowhere"), archive)
    assert os.path.exists(archive)


# ---------------------------------------------------------------------------
# The worker setup script


SETUP_SCRIPT = os.path.join(SRC, gcloud.SETUP_SCRIPT)
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

    script = f'source "$1" && mount_bucket my-bucket "$HOME/{gcloud.BUCKET_MOUNT}"'
    return subprocess.run(
        ["bash", "-c", script, "test", SETUP_SCRIPT], env=env, capture_output=True, text=True
    )


def test_setup_script_mounts_the_bucket_once(tmp_path):
    env = _fake_worker(tmp_path)
    first = _mount(env)
    assert first.returncode == 0, first.stderr
    mount = tmp_path / "home" / gcloud.BUCKET_MOUNT
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
    (tmp_path / "home" / gcloud.BUCKET_MOUNT).symlink_to("/proc/self")
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
