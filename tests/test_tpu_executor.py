"""TPUExecutor: the argv of every step of its plan, and against a fake `gcloud` on PATH: the
plan is what runs, runs spread over slices, a preempted run retried, results copied back, the
sweep summary, and a stopped sweep resumed.

The fake (a Python script written to tmp_path) logs its argv, keeps each TPU VM's state
in a file, gives each VM a "remote home" directory (deleted with the VM), and for `ssh`
runs the setup command (minus the pip install; `--bucket B --mount-dir D` "mounts"
<root>/buckets/B, which outlives the VMs, at D) or "trains" by writing
final.json/metrics.jsonl/config.json into the run directory named by --workdir, and a
"checkpoint" after step 1 that a later attempt resumes from (final.json records
resumed_from). FAKE_GCLOUD_PREEMPT=<run prefix>:<attempt> makes
that attempt fail like a preemption (exit 255, state PREEMPTED); FAKE_GCLOUD_SLOW=<run
prefix> makes that run wait until a `pkill` arrives; FAKE_GCLOUD_TRAIN_S=<seconds> makes
every run take that long.
"""

import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

from lm_align import cli
from lm_align.launch import gcloud
from lm_align.launch.steps import Create, Run, Wait
from lm_align.sweeps import load_summary, plan_sweep, run_sweep
from lm_align.sweeps.tpu_executor import TPUExecutor
from tests.helpers import DEFAULT_EXPERIMENT, REPO

FAKE_GCLOUD = """\
#!{python}
import json, os, re, shlex, shutil, subprocess, sys, time

ROOT = os.environ["FAKE_GCLOUD_ROOT"]
argv = sys.argv[1:]
with open(os.path.join(ROOT, "log.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\\n")


def flag(name):
    return next((a.split("=", 1)[1] for a in argv if a.startswith(name + "=")), None)


def state_file(node):
    return os.path.join(ROOT, "state", node)


def state(node):
    path = state_file(node)
    return open(path).read().strip() if os.path.exists(path) else None


def home(node):
    path = os.path.join(ROOT, "remote", node)
    os.makedirs(path, exist_ok=True)
    return path


def set_state(node, value):
    os.makedirs(os.path.join(ROOT, "state"), exist_ok=True)
    with open(state_file(node), "w") as f:
        f.write(value + "\\n")


assert argv[:3] == ["compute", "tpus", "tpu-vm"], argv
verb = argv[3]
pos = [a for a in argv[4:] if not a.startswith("--")]
if verb == "describe":
    if state(pos[0]) is None:
        sys.exit(f"ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: {{pos[0]}}")
    print(state(pos[0]))
elif verb == "create":
    shutil.rmtree(os.path.join(ROOT, "remote", pos[0]), ignore_errors=True)
    set_state(pos[0], "READY")
elif verb == "delete":
    os.remove(state_file(pos[0]))
    shutil.rmtree(os.path.join(ROOT, "remote", pos[0]), ignore_errors=True)
elif verb == "scp":
    src, dst = pos
    if ":" in dst:  # upload
        node, path = dst.split(":", 1)
        shutil.copy(src, os.path.join(home(node), path))
    else:  # download, --recurse
        node, path = src.split(":", 1)
        remote = os.path.join(home(node), path)
        if not os.path.isdir(remote):
            sys.exit(f"scp: {{path}}: No such file or directory")
        shutil.copytree(remote, os.path.join(dst, os.path.basename(path)), dirs_exist_ok=True)
elif verb == "ssh":
    node, command = pos[0], flag("--command")
    if state(node) != "READY":
        sys.exit(print("ssh: connect to host: Connection refused", file=sys.stderr) or 255)
    if "pkill" in command:
        open(os.path.join(ROOT, "stop-" + node), "w").close()
    elif "lm_align.cli" not in command:  # the setup: unpack, "mount", but install nothing
        setup = re.search(r"bash lm_align/launch/tpu_worker_setup.sh(.*)$", command)
        words = shlex.split(setup.group(1))
        if words:
            assert words[0::2] == ["--bucket", "--mount-dir"], words
            bucket = os.path.join(ROOT, "buckets", words[1])
            os.makedirs(bucket, exist_ok=True)
            mount = os.path.join(home(node), words[3])
            if not os.path.islink(mount):
                os.symlink(bucket, mount)
        command = command[: setup.start()] + "true"
        sys.exit(subprocess.run(["bash", "-c", command], cwd=home(node)).returncode)
    else:  # "train"
        words = shlex.split(command)
        checkout = os.path.join(home(node), "lm_align")
        config = words[words.index("--config") + 1].split(":")[0]
        if not os.path.exists(os.path.join(checkout, config)):
            sys.exit(f"error: no such experiment file {{config}} in the checkout")
        run_dir = os.path.normpath(os.path.join(checkout, words[words.index("--workdir") + 1]))
        name = os.path.basename(run_dir)
        counter = os.path.join(ROOT, "attempts-" + name)
        attempt = (int(open(counter).read()) if os.path.exists(counter) else 0) + 1
        open(counter, "w").write(str(attempt))
        os.makedirs(run_dir, exist_ok=True)
        checkpoint = os.path.join(run_dir, "checkpoint")
        resumed_from = int(open(checkpoint).read()) if os.path.exists(checkpoint) else None
        json.dump({{"argv": words}}, open(os.path.join(run_dir, "config.json"), "w"))
        print(f"training {{name}} on {{node}}, attempt {{attempt}}")
        print("W0000 some warning", file=sys.stderr)
        metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        metrics.write(json.dumps({{"step": 1, "loss": 5.5}}) + "\\n")
        metrics.flush()
        open(checkpoint, "w").write("1")
        preempt = os.environ.get("FAKE_GCLOUD_PREEMPT", "::").split(":")
        if name.startswith(preempt[0]) and str(attempt) == preempt[1]:
            set_state(node, "PREEMPTED")
            sys.exit(print("Connection to worker closed by remote host.", file=sys.stderr) or 255)
        slow = os.environ.get("FAKE_GCLOUD_SLOW")
        if slow and name.startswith(slow):
            stop = os.path.join(ROOT, "stop-" + node)
            for _ in range(500):
                if os.path.exists(stop):
                    os.remove(stop)
                    print("SIGTERM: checkpoint saved")
                    sys.exit(0)
                time.sleep(0.01)
        time.sleep(float(os.environ.get("FAKE_GCLOUD_TRAIN_S", "0")))
        metrics.write(json.dumps({{"step": 4, "loss": 4.0}}) + "\\n")
        metrics.close()
        final = {{"step": 4, "eval_loss": 4.25, "resumed_from": resumed_from}}
        json.dump(final, open(os.path.join(run_dir, "final.json"), "w"))
else:
    sys.exit(f"fake gcloud: unexpected {{argv}}")
"""

EXPERIMENT = textwrap.dedent("""
    import importlib.util

    spec = importlib.util.spec_from_file_location("default_experiment", {default!r})
    default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(default)


    def get_config(arg=None):
        return default.get_config()


    def get_sweep(arg=None):
        return [{{"optimizer.lr": lr}} for lr in (1e-3, 3e-3, 1e-2, 3e-2)]
""")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake gcloud first on PATH; returns its root directory (states, remote homes, log)."""
    root = tmp_path / "gcloud"
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "gcloud"
    script.write_text(FAKE_GCLOUD.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_ROOT", str(root))
    for var in ("FAKE_GCLOUD_PREEMPT", "FAKE_GCLOUD_SLOW", "FAKE_GCLOUD_TRAIN_S"):
        monkeypatch.delenv(var, raising=False)
    (root / "log.jsonl").write_text("")
    return root


@pytest.fixture
def checkout(tmp_path):
    """A git checkout holding the sweep's experiment file (what is copied to the workers)."""
    src = tmp_path / "src"
    (src / "experiments").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    (src / "experiments" / "tpu_sweep.py").write_text(EXPERIMENT.format(default=DEFAULT_EXPERIMENT))
    return src


def calls(root, start=0):
    with open(root / "log.jsonl") as f:
        return [json.loads(line) for line in f.readlines()[start:]]


def train_calls(log):
    """(TPU VM, run name) of every ssh that ran a run."""
    out = []
    for argv in log:
        command = next((a[len("--command=") :] for a in argv if a.startswith("--command=")), "")
        if argv[3] == "ssh" and "lm_align.cli train" in command:
            workdir = command.split("--workdir ")[1].split()[0]
            out.append((argv[4], os.path.basename(workdir)))
    return out


def set_state(root, node, value):
    (root / "state").mkdir(exist_ok=True)
    (root / "state" / node).write_text(value + "\n")


VM = ["gcloud", "compute", "tpus", "tpu-vm"]
LOC = ["--zone=us-west4-a", "--project=proj"]
SETUP = (
    "--command=mkdir -p lm_align && tar -xzf lm_align_src.tar.gz -C lm_align && "
    "bash lm_align/launch/tpu_worker_setup.sh"
)


def test_plan_is_the_argv_of_every_step(checkout, tmp_path, monkeypatch):
    """Two slices, two runs with a bucket: per slice lookup, create, wait, copy, setup; per
    run the ssh that runs it, the state check and the copy back."""
    monkeypatch.chdir(tmp_path)
    runs = plan_sweep(str(checkout / "experiments" / "tpu_sweep.py"), "sweeps/lr")[:2]
    executor = TPUExecutor("sw", "v5e-8", "us-west4-a", num_slices=2, project="proj",
                           bucket="b-1", source_dir=str(checkout))  # fmt: skip
    archive = f"{tempfile.gettempdir()}/lm_align-sweep-XXXX.tar.gz"
    expected = [None]  # pack, here
    for node in ("sw-0", "sw-1"):
        describe = [*VM, "describe", node, *LOC, "--format=value(state)"]
        expected += [
            describe,
            [*VM, "create", node, *LOC, "--accelerator-type=v5litepod-8",
             "--version=v2-alpha-tpuv5-lite"],
            describe,
            [*VM, "scp", archive, f"{node}:lm_align_src.tar.gz", *LOC, "--worker=all"],
            [*VM, "ssh", node, *LOC, "--worker=all",
             f"{SETUP} --bucket b-1 --mount-dir lm_align_bucket"],
        ]  # fmt: skip
    for run, node, lr in zip(runs, ("sw-0", "sw-1"), ("0.001", "0.003"), strict=True):
        remote = f"lm_align_bucket/lr/{run.name}"
        command = (
            f"cd lm_align && mkdir -p ../{remote} && PYTHONUNBUFFERED=1 exec python3 -m "
            f"lm_align.cli train --config experiments/tpu_sweep.py --workdir ../{remote} "
            f"--config.optimizer.lr={lr}"
        )
        expected += [
            [*VM, "ssh", node, *LOC, "--worker=all", f"--command={command}"],
            [*VM, "describe", node, *LOC, "--format=value(state)"],
            [*VM, "scp", f"{node}:{remote}", "sweeps/lr", "--recurse", *LOC, "--worker=0"],
        ]
    assert [list(s.argv) if s.argv else None for s in executor.plan(runs)] == expected


def test_a_slice_set_up_already_is_only_found_and_waited_for(checkout):
    executor = TPUExecutor("sw", "v4-8", "z", source_dir=str(checkout))
    s = executor.slices[0]
    fresh = executor.slice_steps(s, "/a.tar.gz")
    assert [type(x) for x in fresh] == [Create, Wait, Run, Run]
    assert list(fresh[0].lookup.delete) == [*VM, "delete", "sw", "--zone=z", "--quiet"]
    assert [type(x) for x in executor.slice_steps(s, "/a.tar.gz", setup=False)] == [Create, Wait]


def test_a_missing_slice_runs_exactly_the_planned_commands(fake, checkout, tmp_path, monkeypatch):
    """One slice, not there yet, one run: the fake gcloud sees the plan's commands, in order
    (the archive has its real temporary name)."""
    monkeypatch.chdir(tmp_path)
    runs = plan_sweep(str(checkout / "experiments" / "tpu_sweep.py"), "sweeps/lr")[:1]
    executor = TPUExecutor("sw", "v5e-8", "us-west4-a", project="proj",
                           source_dir=str(checkout), poll_s=0.01, log=lambda s: None)  # fmt: skip
    planned = [list(s.argv) for s in executor.plan(runs) if s.argv]
    events = []
    executor.run(runs, events.append)
    assert [e.kind for e in events] == ["started", "ended"] and events[1].returncode == 0
    ran = [["gcloud", *argv] for argv in calls(fake)]
    archive = ran[3][5]  # the scp of the checkout: gcloud compute tpus tpu-vm scp ARCHIVE ...
    assert archive.startswith(os.path.join(tempfile.gettempdir(), "lm_align-sweep-"))
    dry_archive = f"{tempfile.gettempdir()}/lm_align-sweep-XXXX.tar.gz"
    assert ran == [[a.replace(dry_archive, archive) for a in argv] for argv in planned]


def test_runs_spread_over_slices_and_a_preempted_run_is_retried(fake, checkout, tmp_path,
                                                                monkeypatch):  # fmt: skip
    """2 slices (sw-0 exists, sw-1 is created); run 001's first attempt is preempted: its
    slice is recreated and the run finishes on the second attempt. Every result is copied
    back and the summary has every run."""
    set_state(fake, "sw-0", "READY")
    monkeypatch.setenv("FAKE_GCLOUD_PREEMPT", "001_:1")
    monkeypatch.setenv("FAKE_GCLOUD_TRAIN_S", "0.2")  # sw-1 is ready before sw-0 is done
    lines = []
    executor = TPUExecutor(
        "sw", "v5e-8", "us-west4-a", num_slices=2, project="proj", max_retries=2,
        source_dir=str(checkout), poll_s=0.01, log=lines.append,
    )  # fmt: skip
    workdir = tmp_path / "sweeps" / "lr"
    config = str(checkout / "experiments" / "tpu_sweep.py")
    result = run_sweep(config, str(workdir), executor=executor, log=lines.append)

    assert list(result.statuses.values()) == ["finished"] * 4, "\n".join(lines)
    log = calls(fake)
    assert all("--zone=us-west4-a" in a and "--project=proj" in a for a in log)
    ran = train_calls(log)
    assert {node for node, _ in ran} == {"sw-0", "sw-1"}  # both slices took runs
    by_run = {}
    for node, name in ran:
        by_run.setdefault(name, []).append(node)
    names = [r.name for r in result.runs]
    assert sorted(by_run) == sorted(names)
    assert len(by_run[names[1]]) == 2 and all(len(by_run[n]) == 1 for n in names if n != names[1])
    preempted_on = by_run[names[1]][0]
    assert by_run[names[1]] == [preempted_on] * 2  # retried on its slice, once recreated
    verbs = [(a[3], a[4]) for a in log if a[3] in ("create", "delete")]
    assert verbs[0] == ("create", "sw-1")  # missing at the start; sw-0 was reused
    deleted = verbs.index(("delete", preempted_on))  # it was PREEMPTED: deleted, created again
    assert ("create", preempted_on) in verbs[deleted:]
    assert any("retry 1/2" in line for line in lines)

    for run in result.runs:
        files = set(os.listdir(run.workdir))
        assert {"final.json", "metrics.jsonl", "config.json", "stdout.log", "stderr.log"} <= files
        with open(os.path.join(run.workdir, "stdout.log")) as f:
            assert f"training {run.name}" in f.read()
        with open(os.path.join(run.workdir, "config.json")) as f:  # the remote command line
            argv = json.load(f)["argv"]
        assert "--config" in argv and argv[argv.index("--config") + 1] == (
            "experiments/tpu_sweep.py"
        )
        assert argv[argv.index("--workdir") + 1] == f"../lm_align_runs/lr/{run.name}"
    with open(os.path.join(result.runs[1].workdir, "run.json")) as f:
        record = json.load(f)
    assert record["status"] == "finished" and record["attempts"] == 2
    with open(os.path.join(result.runs[1].workdir, "final.json")) as f:
        # Without a bucket the run directory was on the deleted VM's disk: started over.
        assert json.load(f)["resumed_from"] is None
    with open(os.path.join(result.runs[1].workdir, "stderr.log")) as f:
        assert "closed by remote host" in f.read()  # the preempted attempt's stderr is kept

    rows = load_summary(str(workdir))
    assert [r["name"] for r in rows] == names
    assert all(r["status"] == "finished" and r["eval_loss"] == 4.25 for r in rows)


def test_with_a_bucket_a_run_resumes_on_a_recreated_vm(fake, checkout, tmp_path, monkeypatch):
    """--bucket: every worker mounts it and the run directories live there, so the run
    preempted on a 4-host slice (VM deleted and created again) resumes from its checkpoint;
    results are copied back from worker 0's mount as without a bucket."""
    set_state(fake, "sw", "READY")
    monkeypatch.setenv("FAKE_GCLOUD_PREEMPT", "001_:1")
    lines = []
    executor = TPUExecutor(
        "sw", "v5e-16", "us-west4-a", bucket="gs://my-bucket", source_dir=str(checkout),
        poll_s=0.01, log=lines.append,
    )  # fmt: skip
    assert executor.bucket == "my-bucket"
    workdir = tmp_path / "sweeps" / "lr"
    config = str(checkout / "experiments" / "tpu_sweep.py")
    result = run_sweep(config, str(workdir), executor=executor, log=lines.append)

    assert list(result.statuses.values()) == ["finished"] * 4, "\n".join(lines)
    names = [r.name for r in result.runs]
    log = calls(fake)
    setups = [a for a in log if a[3] == "ssh" and "tpu_worker_setup.sh" in a[-1]]
    assert len(setups) == 2  # set up again on the recreated VM: mounted again
    assert all(a[-1].endswith("--bucket my-bucket --mount-dir lm_align_bucket") for a in setups)
    assert ("delete", "sw") in [(a[3], a[4]) for a in log]
    bucket = fake / "buckets" / "my-bucket"
    for run in result.runs:
        with open(os.path.join(run.workdir, "config.json")) as f:
            argv = json.load(f)["argv"]
        assert argv[argv.index("--workdir") + 1] == f"../lm_align_bucket/lr/{run.name}"
        assert (bucket / "lr" / run.name / "final.json").exists()  # kept in the bucket
        with open(os.path.join(run.workdir, "final.json")) as f:  # copied back
            resumed_from = json.load(f)["resumed_from"]
        assert resumed_from == (1 if run.name == names[1] else None), run.name
    assert any("mount gs://my-bucket" in line for line in lines)


def test_a_multi_host_slice_without_a_bucket_is_refused_before_anything_runs(
    fake, checkout, tmp_path
):
    runs = plan_sweep(str(checkout / "experiments" / "tpu_sweep.py"), str(tmp_path / "w"))
    executor = TPUExecutor("sw", "v5e-16", "z", source_dir=str(checkout))
    assert executor.comments(runs)[0].startswith("# WARNING: the 4 hosts write one run directory")
    with pytest.raises(gcloud.LaunchError, match="the 4 hosts write .*add --bucket BUCKET"):
        executor.run(runs, lambda e: None)
    assert calls(fake) == []
    one_host = TPUExecutor("sw", "v5e-8", "z", source_dir=str(checkout))
    assert one_host.shared_dir_problem() is None and one_host.comments(runs) == []
    assert one_host.remote_run_dir(runs[0]) == f"lm_align_runs/w/{runs[0].name}"


def test_stopped_sweep_restarts_only_the_runs_not_done(fake, checkout, tmp_path, monkeypatch):
    """One slice: stop() while run 001 runs (pkill over ssh); 001 is interrupted, 002 and
    003 never start. The rerun starts exactly 001, 002 and 003."""
    set_state(fake, "sw", "READY")
    monkeypatch.setenv("FAKE_GCLOUD_SLOW", "001_")
    config = str(checkout / "experiments" / "tpu_sweep.py")
    workdir = str(tmp_path / "sweeps" / "lr")
    executor = TPUExecutor(
        "sw", "v4-8", "us-central2-b", source_dir=str(checkout), poll_s=0.01, log=lambda s: None
    )

    def log(line):
        if "001_" in line and line.endswith("started"):
            executor.stop()

    first = run_sweep(config, workdir, executor=executor, log=log)
    names = [r.name for r in first.runs]
    assert [first.statuses[n] for n in names] == ["finished", "interrupted", "pending", "pending"]
    assert any("pkill -TERM" in " ".join(a) for a in calls(fake))
    assert [n for _, n in train_calls(calls(fake))] == names[:2]

    monkeypatch.delenv("FAKE_GCLOUD_SLOW")
    start = len(calls(fake))
    again = TPUExecutor(
        "sw", "v4-8", "us-central2-b", source_dir=str(checkout), poll_s=0.01, log=lambda s: None
    )
    lines = []
    second = run_sweep(config, workdir, executor=again, log=lines.append)
    assert [n for _, n in train_calls(calls(fake, start))] == names[1:]
    assert f"[1/4] {names[0]} finished earlier; skipped" in lines
    assert list(second.statuses.values()) == ["finished"] * 4
    assert [r["status"] for r in load_summary(workdir)] == ["finished"] * 4


def test_a_run_that_keeps_being_preempted_fails_after_max_retries(fake, checkout, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    set_state(fake, "sw", "READY")
    monkeypatch.setenv("FAKE_GCLOUD_PREEMPT", "000_:1")
    executor = TPUExecutor(
        "sw", "v5e-4", "z", max_retries=0, source_dir=str(checkout), poll_s=0.01,
        log=lambda s: None,
    )  # fmt: skip
    runs = plan_sweep(str(checkout / "experiments" / "tpu_sweep.py"), str(tmp_path / "w"))
    events = []
    executor.run(runs[:2], events.append)
    ended = {e.run.name: e for e in events if e.kind == "ended"}
    assert ended[runs[0].name].returncode == 255
    assert "gave up after 1 tries" in ended[runs[0].name].stderr_tail
    assert ended[runs[1].name].returncode == 0  # the slice was recreated for the next run


def test_experiment_outside_the_checkout_is_an_error_before_anything_runs(fake, tmp_path):
    (tmp_path / "src").mkdir()
    subprocess.run(["git", "init", "-q", str(tmp_path / "src")], check=True)
    outside = tmp_path / "exp.py"
    outside.write_text(EXPERIMENT.format(default=DEFAULT_EXPERIMENT))
    runs = plan_sweep(str(outside), str(tmp_path / "w"))
    executor = TPUExecutor("sw", "v4-8", "z", source_dir=str(tmp_path / "src"))
    with pytest.raises(gcloud.LaunchError, match="outside the checkout"):
        executor.run(runs, lambda e: None)
    assert calls(fake) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--zone", "z"], "--zone applies to --executor tpu; add --executor tpu"),
        (["--executor", "tpu", "--zone", "z"], "--executor tpu needs --tpu-name, --accelerator"),
        (["--executor", "tpu", "--tpu-name", "s", "--accelerator", "v9-8", "--zone", "z"],
         "unknown accelerator 'v9-8'"),
        (["--executor", "tpu", "--tpu-name", "s", "--accelerator", "v4-8", "--zone", "z",
          "--parallel", "2"], "--parallel=2 applies to --executor local"),
        (["--executor", "tpu", "--tpu-name", "s", "--accelerator", "v4-8", "--zone", "z",
          "--num-slices", "0"], "--num-slices=0; use 1 or more"),
        (["--bucket", "b-1"], "--bucket applies to --executor tpu"),
        (["--executor", "tpu", "--tpu-name", "s", "--accelerator", "v4-8", "--zone", "z",
          "--bucket", "B"], "--bucket 'B': Cloud Storage bucket names are 3-63 lowercase"),
    ],
)  # fmt: skip
def test_sweep_tpu_flag_errors(extra, message, capsys):
    status = cli.main(["sweep", "--config", "x.py", "--workdir", "w", *extra])
    err = capsys.readouterr().err
    assert status == 2 and message in err, err


def test_docs_show_the_current_sweep_dry_run(tmp_path, monkeypatch, capsys):
    """docs/launching_tpu.md pastes this dry run (from "--executor tpu:" on; the fit check
    lines printed before it are tested in test_aot.py)."""
    monkeypatch.chdir(tmp_path)  # the sweep directory runs/lr_width, relative to here
    status = cli.main(
        ["sweep", "--config", os.path.join(REPO, "experiments", "lr_width.py"), "--workdir",
         "runs/lr_width", "--executor", "tpu", "--tpu-name", "lr-sweep", "--accelerator",
         "v5e-8", "--zone", "us-west4-a", "--project", "my-project", "--num-slices", "2",
         "--bucket", "my-bucket", "--dry-run", "--skip-fit-check"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    plan = out[out.index("--executor tpu:") :].replace(tempfile.gettempdir() + "/", "/tmp/")
    assert "# --bucket: every worker mounts gs://my-bucket at ~/lm_align_bucket" in plan
    with open(os.path.join(REPO, "docs", "launching_tpu.md")) as f:
        doc = f.read()
    for line in plan.splitlines():
        assert line in doc, line
