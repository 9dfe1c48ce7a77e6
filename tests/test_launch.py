"""Launchers without a cluster: the dry-run plan, the debug and local launchers, status of a run
folder, merge refusing an incomplete run, and the pure helpers the SLURM path relies on."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rsd_batch.launch.plan import sbatch_script
from rsd_batch.launch.scheduler import parse_duration, parse_sacct
from rsd_batch.launch.status import status
from rsd_batch.launch.submit import split_arrays
from rsd_batch.launch.task import log_error_line
from rsd_batch.runner import run
from rsd_batch.shards import write_shards

from conftest import CLI, cli, make_config


def shard_here(args: list[str]):
    cfg = make_config(*args)
    write_shards(cfg.dataset, Path(cfg.run.dir))
    return cfg


def test_dry_run_prints_the_plan_and_submits_nothing(tiny_run_args, tmp_path):
    cfg = shard_here(tiny_run_args)
    run(cfg, shard_indices=[0])  # one shard done already: the plan skips it
    def files():  # Hydra's own logs (logs/hydra/) aside
        return sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "logs" not in p.parts)
    before = files()
    out = cli("run", *tiny_run_args, "launcher=slurm", "run.dry_run=true").stdout
    assert "dry run (nothing is submitted or written): launcher=slurm, method=target_only" in out
    assert "shards: 2 to run (1-2), 1 done (skipped)" in out
    assert "samples: 16 to run (method.n=1) of 24" in out
    # No pilot: an upper bound from max_new_tokens (12 per sample), prompts tokenized for real.
    assert "upper bound, every sample generating method.max_new_tokens=12" in out
    target = next(ln for ln in out.splitlines() if ln.strip().startswith("target"))
    prefill, decode, flops = target.split()[1:4]
    assert int(decode.replace(",", "")) == 16 * 12 and int(prefill.replace(",", "")) > 16
    assert float(flops) > 0
    # The script submitit would submit: an array over 2 tasks, one GPU each, the warning signal.
    assert "slurm: 2 tasks (1 shard each) in 1 array" in out
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --gpus-per-task=1", "#SBATCH --signal=USR2@120",
                 "#SBATCH --requeue", "#SBATCH --time=240", "-m submitit.core._submit"):
        assert line in out, line
    assert files() == before  # wrote nothing


def test_dry_run_prices_samples_from_a_pilot(tiny_run_args, tmp_path):
    pilot = tmp_path / "pilot"
    args = [a for a in tiny_run_args if not a.startswith("run.dir")]
    cli("main", *args, "dataset.limit=4", f"run.dir={pilot}")
    summary = json.loads((pilot / "summary.json").read_text())
    shard_here(tiny_run_args)
    out = cli("run", *tiny_run_args, "run.dry_run=true", f"launcher.pilot={pilot}").stdout
    assert f"estimated cost from the pilot {pilot / 'summary.json'} (4 samples, method target_only)" in out
    target = next(ln for ln in out.splitlines() if ln.strip().startswith("target"))
    decode = float(target.split()[2].replace(",", ""))
    assert decode == pytest.approx(summary["roles"]["target"]["mean"]["decode_tokens"] * 24, abs=1)
    assert "#SBATCH" not in out  # launcher=local: no script


def test_debug_launcher_runs_in_process(tiny_run_args, tmp_path):
    out = cli("main", *tiny_run_args, "launcher=debug").stdout
    assert "3 shards run, 0 already done" in out and "24 samples of 24 problems" in out


def test_status_of_a_run_folder_and_merge_naming_missing_shards(tiny_run_args, tmp_path):
    cfg = shard_here(tiny_run_args)
    run(cfg, shard_indices=[0])
    polls = []
    report = run(cfg, shard_indices=[1], should_stop=lambda: polls.append(1) or len(polls) > 3)
    assert not report["complete"]  # a few samples committed, then stopped
    rep = status(cfg)
    states = {r["index"]: r["state"] for r in rep["shards"]}
    assert states == {0: "done", 1: "partial", 2: "not submitted"}
    k = rep["shards"][1]["samples"]
    assert 0 < k < 8 and rep["shards"][0]["samples"] == 8 and rep["shards"][2]["samples"] == 0
    assert rep["sacct_calls"] == 0  # never submitted: no scheduler to ask
    out = cli("status", *tiny_run_args).stdout
    assert f"3 shards, {8 + k}/24 samples committed · done 1, partial 1, not submitted 1" in out
    assert "done: shards 0" in out
    assert not list(Path(cfg.run.dir).glob("logs/hydra/*status*"))  # status writes nothing
    merged = cli("merge", *tiny_run_args, check=False)
    assert merged.returncode == 2 and "2 of 3 shards are not done (shards 1, 2)" in merged.stderr


def test_local_launcher_stops_on_sigterm_after_a_committed_batch(tiny_run_args, tmp_path):
    args = [a for a in tiny_run_args if not a.startswith(("run.batch_size", "method.max_new_tokens"))]
    args += ["run.batch_size=1", "method.max_new_tokens=40"]
    cfg = shard_here(args)
    parts = Path(cfg.run.dir) / "results"
    proc = subprocess.Popen([CLI, "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while len(list(parts.glob("*.parts/part-*.arrow"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM after the last committed batch" in err
    committed = status(cfg)["samples"]
    assert 2 <= committed < 24  # what was committed stays (resuming it is test_kill_resume's job)
    assert not list(parts.glob("*.parts/*.tmp"))  # and nothing half-written


def test_config_errors_fail_before_submitting(tiny_run_args, tmp_path):
    shard_here(tiny_run_args)
    gpu = cli("run", *tiny_run_args, "launcher=slurm_test", "model.target.device=cuda", check=False)
    assert gpu.returncode == 2 and "launcher.gpus_per_task=0: the tasks would get no GPU" in gpu.stderr
    missing = cli("run", *tiny_run_args, "launcher=slurm", "model.target.path=/nope/model", check=False)
    assert missing.returncode == 2 and "model.target.path='/nope/model' does not exist" in missing.stderr
    assert not (tmp_path / "run" / "slurm").exists()


def test_cluster_preset_becomes_sbatch_lines(tmp_path):
    cfg = make_config("launcher=example_a100", f"run.dir={tmp_path}", "launcher.mem_gb=80",
                      "+launcher.additional_parameters.mail-type=FAIL")
    script = sbatch_script(cfg, n_tasks=10, throttle=3, folder=tmp_path / "sub")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --qos=normal", "#SBATCH --constraint=a100",
                 "#SBATCH --gpus-per-task=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=80GB",
                 "#SBATCH --time=720", "#SBATCH --array=0-9%3", "#SBATCH --mail-type=FAIL",
                 "module load cuda/12.4"):
        assert line in script, line
    assert "--account" not in script  # null settings stay out


def test_arrays_split_and_share_the_throttle():
    groups = [[i] for i in range(10)]
    assert [(len(c), t) for c, t in split_arrays(groups, 4, 64)] == [(4, 4), (4, 4), (2, 2)]
    assert [(len(c), t) for c, t in split_arrays(groups, 4, 6)] == [(4, 2), (4, 2), (2, 2)]
    assert [(len(c), t) for c, t in split_arrays(groups, None, 3)] == [(10, 3)]
    assert [(len(c), t) for c, t in split_arrays(groups, 1001, 2)] == [(10, 2)]


def test_sacct_output_is_read_with_array_ranges_and_duplicates():
    text = "\n".join([
        "12_0|COMPLETED|None|0:0|2030-01-01T10:00:00|2030-01-01T10:00:01|2030-01-01T10:01:00|n1",
        "12_1|CANCELLED by 0|None|0:15|2030-01-01T10:00:00|2030-01-01T10:00:01|2030-01-01T10:00:30|n1",
        "12_[2-4,7%2]|PENDING|JobArrayTaskLimit|0:0|2030-01-01T10:00:00|Unknown|Unknown|None assigned",
        "13|RUNNING|None|0:0|2020-01-01T10:00:00|2020-01-01T10:00:01|Unknown|n1",
        "13|PENDING|Dependency|0:0|2030-01-01T10:00:00|Unknown|Unknown|None assigned",  # id reused
        "13.batch|RUNNING||0:0|||Unknown|n1",
    ])
    view = parse_sacct(text)
    assert sorted(view) == ["12_0", "12_1", "12_2", "12_3", "12_4", "12_7", "13"]
    assert view["12_1"]["state"] == "CANCELLED" and view["12_3"]["reason"] == "JobArrayTaskLimit"
    assert view["13"]["state"] == "PENDING"  # the later submission wins


def test_small_parsers():
    assert parse_duration("1-02:03:04") == 93784 and parse_duration("05:00") == 300
    assert parse_duration("UNLIMITED") is None
    err = ("Traceback (most recent call last):\n  File \"x\", line 1\n"
           "rsd_batch.models.ModelLoadError: model.target.path='/m' could not be loaded: no config\n"
           "srun: error: localhost: task 0: Exited with exit code 1\n")
    assert log_error_line(err).startswith("rsd_batch.models.ModelLoadError: model.target.path")
    limit = "slurmstepd-n1: error: *** JOB 5 ON n1 CANCELLED AT 2030-01-01 DUE TO TIME LIMIT ***\n"
    assert "DUE TO TIME LIMIT" in log_error_line(limit)


def test_scheduler_view_error_policy(tmp_path, monkeypatch):
    """Where sacct cannot answer, a submission refuses (a shard must never run twice) while a local
    run or a dry run assumes nothing is queued. (Its one call per interval is tested on the real
    cluster: test_slurm.py.)"""
    from rsd_batch.launch.scheduler import LaunchError
    from rsd_batch.launch.view import SUBMISSION_FILE, SchedulerView

    sub = tmp_path / "slurm" / "20260101-000000-abcd"
    sub.mkdir(parents=True)
    (sub / SUBMISSION_FILE).write_text(json.dumps({
        "submitted_at": time.time() - 3600, "run_dir": str(tmp_path), "fingerprint": "f",
        "arrays": [{"job_id": "12", "throttle": 1, "tasks": [{"job_id": "12_0", "shards": [0, 1]}]}],
        "merge_job": None}))
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    view = SchedulerView(tmp_path / "slurm", min_interval_s=60)
    assert view.tasks()[1]["job_id"] == "12_0" and view.job_ids() == ["12"]
    assert view.busy(strict=False) == {} and "sacct is not on PATH" in view.error
    with pytest.raises(LaunchError, match="sacct is not on PATH.*nothing is submitted"):
        view.busy(strict=True)


def test_stop_context_stops_after_the_batch_and_restores_the_handlers():
    """SIGTERM inside `Stop` only sets the flag (the runner finishes the batch in flight); the
    previous handler is back afterwards. A warning signal arms the watchdog, whose grace running out
    (or a second warning) calls `now`."""
    from rsd_batch.launch.stopping import Stop

    before = signal.getsignal(signal.SIGTERM)
    called = []
    with Stop(warning=signal.SIGUSR2, grace_s=0.2, now=lambda *a: called.append(a[0])) as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop() and stop.signals == ["SIGTERM"] and not stop.warned()
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.6)  # the grace runs out: the watchdog re-sends the warning, which calls `now`
        assert stop.warned() and stop.signals[-1] == "watchdog" and called == [signal.SIGUSR2]
    assert signal.getsignal(signal.SIGTERM) is before


def test_launch_is_a_package_of_small_rooms_that_nothing_below_imports():
    """The orchestration side's house rules: launch/ is imported only by the job bodies above it,
    rundir.py (the run folder's one owner) asks no room above it, and no function in launch/ is
    longer than ~60 lines."""
    import ast

    from rsd_batch.config import ROOT

    pkg = ROOT / "rsd_batch"

    def imports(path):
        """The rooms (top-level modules or packages of rsd_batch) a module imports, lazily or not."""
        here = path.relative_to(pkg).with_suffix("").parts[:-1]  # the package it is in
        rooms = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = list(here[: len(here) - node.level + 1]) + (node.module.split(".") if node.module else [])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rsd_batch."):
                parts = node.module.split(".")[1:]
            else:
                continue
            rooms |= {parts[0]} if parts else {a.name for a in node.names}
        return rooms

    importers = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py")
                 if "launch" in imports(p) and p.parent.name != "launch"}
    assert importers == {"app.py"}, importers
    assert imports(pkg / "rundir.py") <= {"errors", "files", "config"}, imports(pkg / "rundir.py")
    long = [(p.name, n.name, n.end_lineno - n.lineno + 1) for p in (pkg / "launch").glob("*.py")
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.FunctionDef)
            and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long
