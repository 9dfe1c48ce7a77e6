"""`launcher=slurm` on a real single-node SLURM cluster (scripts/slurm/start.sh): real sbatch, sacct,
scancel and scontrol, real submitit arrays, real Arrow files.

The cluster is started once per session (idempotent; Debian's packages are installed if missing)
and stopped at the end if this session started it (RSD_SLURM_KEEP=1 keeps it). Deselect with
`-m "not slurm"`. Where the cluster cannot start, the tests are skipped — except in CI (CI=true),
where they fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from rsd_batch import app
from rsd_batch.config import ROOT
from rsd_batch.launch.status import format_status, status
from rsd_batch.launch.view import SchedulerView
from rsd_batch.merge import merge_run

from conftest import cli, make_config

pytestmark = pytest.mark.slurm
START, STOP = ROOT / "scripts" / "slurm" / "start.sh", ROOT / "scripts" / "slurm" / "stop.sh"


@pytest.fixture(scope="session", autouse=True)
def slurm_cluster():
    try:
        proc = subprocess.run(["bash", str(START), "--env"], capture_output=True, text=True, timeout=900)
        ok, why = proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-1000:]
    except (OSError, subprocess.SubprocessError) as e:
        ok, why, proc = False, str(e), None
    if not ok:
        msg = f"the SLURM test cluster did not start (scripts/slurm/start.sh):\n{why}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    conf = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # every rsd-batch, sbatch and sacct below, and the jobs
    yield conf
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    if "started" in proc.stderr and os.environ.get("RSD_SLURM_KEEP") != "1":
        subprocess.run(["bash", str(STOP)], capture_output=True, text=True, timeout=120)


def wait_for(what: str, pred, timeout: float = 300, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def all_done(run_dir: Path, n: int) -> bool:
    return len(list((run_dir / "results").glob("*.done.json"))) == n


def committed(run_dir: Path, shard: int) -> int:
    """Samples committed in a shard in progress (0 once it is finished: its parts are gone)."""
    from rsd_batch.rundir import committed_count
    folder = run_dir / "results" / f"shard-{shard:05d}.parts"
    try:
        return committed_count(folder)
    except FileNotFoundError:
        return 0


def done(run_dir: Path, shard: int) -> bool:
    return (run_dir / "results" / f"shard-{shard:05d}.done.json").exists()


def gone(job_id: str) -> bool:
    """Cancelled in accounting and no longer in the queue (its processes are gone)."""
    queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout
    return sacct_state(job_id) == "CANCELLED" and not queued.strip()


def submissions(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) | {"folder": str(p.parent)}
            for p in sorted((run_dir / "slurm").glob("*/submission.json"))]


def task_state(run_dir: Path, job_id: str) -> dict:
    path = next((run_dir / "slurm").glob(f"*/tasks/{job_id}.json"))
    return json.loads(path.read_text())


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-X", "-P", "-n", "-o", "JobID,State", "-j", job_id.split("_")[0]],
                         capture_output=True, text=True).stdout
    states = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
    return states.get(job_id, "").split(" ")[0]


def shard(args: list[str]):
    """Shard in this process (the CLI's own path is tested elsewhere; each CLI call costs seconds)."""
    cfg = make_config(*args)
    app.shard(cfg)
    return cfg


def submit(args: list[str], capsys) -> str:
    """`rsd-batch run launcher=slurm ...` in this process: what it prints."""
    capsys.readouterr()
    app.run(make_config(*args))
    return capsys.readouterr().out


def status_text(args: list[str]) -> str:
    return format_status(status(make_config(*args)))


def merged_samples(run_dir: Path) -> int:
    return merge_run(run_dir)["samples"]  # merge_run proves coverage: every sample exactly once


def slurm_args(tiny_run_args, **overrides) -> list[str]:
    args = [a for a in tiny_run_args if a.split("=")[0] not in overrides]
    return args + ["launcher=slurm_test"] + [f"{k}={v}" for k, v in overrides.items()]


def slow(tiny_run_args, **overrides) -> list[str]:
    """One sample per batch, 2 per problem, longer outputs: a shard lasts long enough to interrupt."""
    return slurm_args(tiny_run_args, **{"run.batch_size": 1, "method.max_new_tokens": 40,
                                        "method.n": 2, "method.temperature": 0.8, **overrides})


def test_four_shard_array_completes_and_merges(tiny_run_args, tmp_path, capsys):
    args = slurm_args(tiny_run_args, **{"dataset.shard_size": 6})
    run_dir = tmp_path / "run"
    shard(args)
    t0 = time.time()
    out = cli("run", *args).stdout
    assert time.time() - t0 < 60  # returns once submitted, does not wait for the tasks
    (sub,) = submissions(run_dir)
    (array,) = sub["arrays"]
    jid = array["job_id"]
    assert f"submitted 4 shards (24 samples) of {run_dir} as 1 SLURM array: job {jid} (4 tasks, " \
           "at most 2 at once)" in out
    assert f"job ids: {jid}_0 {jid}_1 {jid}_2 {jid}_3" in out
    assert f"state and logs: {sub['folder']}/" in out and f"watch: rsd-batch status run.dir={run_dir}" in out
    script = Path(array["sbatch"]).read_text()
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --signal=USR2@60" in script
    assert [t["shards"] for t in array["tasks"]] == [[0], [1], [2], [3]]

    early = status_text(args)  # while the array is queued or running
    assert "4 shards" in early and any(s in early for s in ("pending", "running", "done 4"))

    wait_for("the 4 shards", lambda: all_done(run_dir, 4))
    rep = cli("status", *args).stdout
    assert "24/24 samples committed · done 4" in rep and "done: shards 0-3" in rep
    merged = cli("merge", *args).stdout
    assert "24 samples of 24 problems" in merged
    for t in array["tasks"]:
        assert task_state(run_dir, t["job_id"])["state"] == "done"
    again = submit(args, capsys)  # nothing left: nothing submitted
    assert "nothing to submit: 4 of 4 shards are done" in again and len(submissions(run_dir)) == 1


def test_scancel_mid_shard_then_resubmit_runs_only_the_missing_work(tiny_run_args, tmp_path, capsys):
    args = slow(tiny_run_args, **{"dataset.shard_size": 12})
    run_dir = tmp_path / "run"
    shard(args)
    submit(args, capsys)
    (first,) = submissions(run_dir)
    task0 = first["arrays"][0]["tasks"][0]
    assert task0["shards"] == [0]
    wait_for("shard 0 to commit some samples", lambda: committed(run_dir, 0) >= 2, every=0.1)
    subprocess.run(["scancel", task0["job_id"]], check=True)
    wait_for("the cancelled task to end", lambda: gone(task0["job_id"]), timeout=120)
    rep = status_text(args)
    line0 = next(ln for ln in rep.splitlines() if ln.split()[:2] == ["0", "failed"])
    assert "CANCELLED" in line0 and task0["job_id"] in line0
    kept = committed(run_dir, 0)
    assert 0 < kept < 24 and not done(run_dir, 0)

    out = submit(args, capsys)  # re-submit: shard 0 again (shard 1 is done, or still queued: skipped)
    subs = submissions(run_dir)
    assert len(subs) == 2
    resubmitted = [t["shards"] for a in subs[1]["arrays"] for t in a["tasks"]]
    assert [0] in resubmitted and len(resubmitted) <= 2
    if resubmitted == [[0]]:
        assert "submitted 1 shards" in out
    wait_for("both shards", lambda: all_done(run_dir, 2))
    new0 = next(t for a in subs[1]["arrays"] for t in a["tasks"] if t["shards"] == [0])
    history = task_state(run_dir, new0["job_id"])["history"]
    assert 0 < history[0]["committed_at_start"]["0"] < 24  # resumed inside the shard
    assert merged_samples(run_dir) == 48


def squeue_field(job_id: str, fmt: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", fmt], capture_output=True,
                          text=True).stdout.strip()


def test_time_limit_and_preemptions_requeue_resume_inside_the_shard_and_are_limited(
        tiny_run_args, tmp_path, capsys):
    from submitit.slurm.slurm import SlurmJob

    from rsd_batch.launch.scheduler import parse_duration

    # 48 samples (2 per problem) in one shard: long enough to interrupt it three times.
    args = slow(tiny_run_args, **{"dataset.shard_size": 24, "launcher.max_preemptions": 1})
    run_dir = tmp_path / "run"
    shard(args)
    submit(args, capsys)
    (sub,) = submissions(run_dir)
    (task,) = sub["arrays"][0]["tasks"]
    jid = task["job_id"]
    assert "#SBATCH --signal=USR2@60" in Path(sub["arrays"][0]["sbatch"]).read_text()

    def attempt(k):
        return lambda: (task_state(run_dir, jid)["attempts"] == k
                        and task_state(run_dir, jid)["state"] == "running")

    # 1. The time limit: shorten the running job's limit to 1-2 minutes left, and send the warning
    #    as submitit's timeout interrupt does (USR2 alone; SLURM's own --signal timer may send it
    #    too, at its next time-limit check). The task stops taking samples, commits the ones in
    #    flight, asks squeue for its time left, counts a timeout, checkpoints and requeues itself.
    wait_for("some committed samples", lambda: committed(run_dir, 0) >= 2, every=0.1)
    elapsed = parse_duration(squeue_field(jid, "%M"))
    subprocess.run(["scontrol", "update", f"JobId={jid}", f"TimeLimit={elapsed // 60 + 2}"], check=True)
    SlurmJob(folder=sub["folder"], job_id=jid)._interrupt(timeout=True)
    wait_for("the checkpoint", lambda: task_state(run_dir, jid)["state"] == "requeued", timeout=120,
             every=0.2)
    st = task_state(run_dir, jid)
    assert st["timeouts"] == 1 and st["preemptions"] == 0 and st["last_requeue"] == "timeout"
    subprocess.run(["scontrol", "update", f"JobId={jid}", "TimeLimit=20"], check=True)  # room again
    wait_for("the second attempt", attempt(2), timeout=180, every=0.5)
    first_resume = task_state(run_dir, jid)["history"][1]["committed_at_start"]["0"]
    assert 2 <= first_resume < 48  # resumed inside the shard from the committed samples

    # 2. SLURM requeues it by itself (as a preemption with PreemptMode=REQUEUE would: SIGTERM, no
    #    warning): the task commits and exits, and on restart counts a preemption from
    #    SLURM_RESTART_COUNT, then resumes.
    wait_for("more committed samples", lambda: committed(run_dir, 0) > first_resume, every=0.1)
    subprocess.run(["scontrol", "requeue", jid], check=True)
    wait_for("the third attempt", attempt(3), timeout=180, every=0.5)
    st = task_state(run_dir, jid)
    assert (st["timeouts"], st["preemptions"], st["requeued_by_slurm"]) == (1, 1, 1)
    second_resume = st["history"][2]["committed_at_start"]["0"]
    assert first_resume < second_resume < 48

    # 3. A preemption the submitit way (SIGTERM, then USR2): the second one, more than
    #    launcher.max_preemptions=1, so the task is not requeued: it fails and status says why.
    wait_for("more committed samples", lambda: committed(run_dir, 0) > second_resume, every=0.1)
    assert not done(run_dir, 0)
    SlurmJob(folder=sub["folder"], job_id=jid)._interrupt()
    wait_for("the limit to stop the task", lambda: task_state(run_dir, jid)["state"] == "failed"
             and sacct_state(jid) == "FAILED", timeout=120)
    st = task_state(run_dir, jid)
    assert (st["timeouts"], st["preemptions"], st["attempts"], st["error_kind"]) == (1, 2, 3, "limit")
    assert "was preempted 2 times, more than launcher.max_preemptions=1: not requeued" in status_text(args)
    time.sleep(3)
    assert sacct_state(jid) == "FAILED" and task_state(run_dir, jid)["attempts"] == 3  # no loop
    submit(args, capsys)  # a re-submission finishes the rest
    wait_for("the shard", lambda: all_done(run_dir, 1))
    assert merged_samples(run_dir) == 48


def test_failing_task_shows_its_error_in_status_without_requeue(tiny_run_args, tmp_path, capsys):
    empty = tmp_path / "not-a-model"
    empty.mkdir()  # exists (so the submit-time check passes) but holds no model
    args = slurm_args(tiny_run_args, **{"model.target.path": str(empty)})
    run_dir = tmp_path / "run"
    shard(args)
    submit(args, capsys)
    (sub,) = submissions(run_dir)
    jids = [t["job_id"] for a in sub["arrays"] for t in a["tasks"]]
    wait_for("the tasks to fail", lambda: all(sacct_state(j) == "FAILED" for j in jids), timeout=240)
    rep = cli("status", *args).stdout
    assert "failed 3" in rep
    for j in jids:
        st = task_state(run_dir, j)
        assert st["state"] == "failed" and st["error_kind"] == "user" and st["attempts"] == 1
        line = next(ln for ln in rep.splitlines() if f" {j} " in ln)
        assert f"model.target.path='{empty}' has no config.json" in st["error"]
        assert "model.target.path=" in line and "failed" in line  # status shows it, shortened to fit
    for j in jids:  # never requeued
        show = subprocess.run(["scontrol", "-o", "show", "job", j], capture_output=True, text=True).stdout
        assert " Restarts=0 " in show and "JobState=FAILED" in show, show
    refused = cli("merge", *args, check=False)
    assert refused.returncode == 2 and "3 of 3 shards are not done (shards 0, 1, 2)" in refused.stderr


def test_arrays_larger_than_max_array_size_are_split(tiny_run_args, tmp_path, capsys):
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    assert "MaxArraySize            = 4" in out  # the test cluster's setting
    args = slurm_args(tiny_run_args, **{"dataset.shard_size": 2, "launcher.shards_per_task": 2})
    run_dir = tmp_path / "run"
    shard(args)
    plan = submit(args + ["run.dry_run=true"], capsys)
    assert "slurm: 6 tasks (2 shards each) in 2 arrays (MaxArraySize 4)" in plan
    assert not (run_dir / "slurm").exists()
    out = submit(args, capsys)
    (sub,) = submissions(run_dir)
    a, b = sub["arrays"]
    assert "submitted 12 shards (24 samples)" in out and "as 2 SLURM arrays" in out
    assert [t["shards"] for t in a["tasks"] + b["tasks"]] == [[i, i + 1] for i in range(0, 12, 2)]
    # Two arrays share launcher.array_parallelism=2: one task at a time each.
    assert "#SBATCH --array=0-3%1" in Path(a["sbatch"]).read_text()
    assert "#SBATCH --array=0-1%1" in Path(b["sbatch"]).read_text()
    rep = status(make_config(*args))
    assert rep["sacct_calls"] == 1 and {r["job_id"].split("_")[0] for r in rep["shards"]} == \
        {a["job_id"], b["job_id"]}
    # One view, asked again and again within its interval: one sacct call (submitit's InfoWatcher).
    first = {a["tasks"][0]["job_id"], b["tasks"][0]["job_id"]}
    wait_for("the arrays in accounting", lambda: first <= set(SchedulerView.of(make_config(*args)).states()))
    view = SchedulerView.of(make_config(*args))
    for _ in range(3):
        states = view.states()
    assert first <= set(states) and view.calls == 1 and view.error is None
    wait_for("12 shards", lambda: all_done(run_dir, 12))
    assert merged_samples(run_dir) == 24


def test_multirun_sweep_each_point_its_own_run_folder_and_merge_job(tiny_run_args, tmp_path):
    args = [a for a in slurm_args(tiny_run_args, **{"dataset.shard_size": 12})
            if not a.startswith(("run.dir", "method="))]  # the sweep sets the method
    out = cli("main", "-m", "method=target_only,draft_only", *args, f"hydra.sweep.dir={tmp_path}/multirun",
              f"run.dir={tmp_path}/sweep/" + "${method.name}").stdout
    assert out.count("submitted 2 shards (24 samples)") == 2 and out.count("(afterok)") == 2
    for m in ("target_only", "draft_only"):
        (sub,) = submissions(tmp_path / "sweep" / m)
        merge = sub["merge_job"]
        assert merge["after"] == [sub["arrays"][0]["job_id"]]
    for m in ("target_only", "draft_only"):
        path = tmp_path / "sweep" / m / "summary.json"
        wait_for(f"the merge job of {m}", path.exists)
        summary = json.loads(path.read_text())
        assert summary["method"] == m and summary["samples"] == 24
    rep = cli("status", *args, f"run.dir={tmp_path}/sweep/draft_only").stdout
    assert "done 2" in rep and "COMPLETED" in rep and "merged:" in rep
