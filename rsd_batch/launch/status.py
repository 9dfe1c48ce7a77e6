"""`rsd-batch status`: each shard's state from the run folder (markers, part names, task files) and
the scheduler view (one sacct call for every job of the run). Opens no results file and imports no
model code, so it answers in well under a second on a finished million-sample run."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from .. import rundir
from ..files import read_json
from ..shards import read_manifest
from .scheduler import PENDING_STATES, RUNNING_STATES
from .task import TaskState, log_error_line
from .view import SchedulerView, ranges


def status(cfg: DictConfig) -> dict:
    """Per-shard state from the run folder, plus ONE sacct call for every job of the run."""
    run = rundir.run_dir(cfg)
    info = read_json(run / rundir.RUN_FILE) if (run / rundir.RUN_FILE).exists() else None
    if info is not None:
        manifest = read_manifest(Path(info["shards_dir"]))
        n, fp = info["identity"]["method"]["n"], info["fingerprint"]
    else:
        manifest = read_manifest(rundir.shards_dir(cfg))
        n, fp = cfg.method.n, None
    view = SchedulerView.of(cfg)
    view.states()
    tasks = view.tasks()
    task_files: dict[Path, Optional[dict]] = {}  # one file per task, however many shards it has
    rows = [_shard_row(run, entry, n, fp, tasks.get(entry["index"]), view, task_files)
            for entry in manifest["shards"]]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return {"run_dir": str(run), "fingerprint": fp, "shards": rows, "counts": counts,
            "samples": sum(r["samples"] for r in rows), "total": sum(r["total"] for r in rows),
            "merge_jobs": view.merge_jobs(), "sacct_calls": view.calls, "sacct_error": view.error,
            "merged": (run / rundir.SUMMARY_FILE).exists(), "submissions": len(view.subs)}


def _shard_row(run: Path, entry: dict, n: int, fp: Optional[str], task: Optional[dict], view: SchedulerView,
               task_files: dict) -> dict:
    i, total = entry["index"], entry["rows"] * n
    committed = rundir.shard_progress(run, i, fp)
    row = {"index": i, "total": total, "job_id": None, "attempts": 0, "timeouts": 0, "preemptions": 0,
           "error": None, "log": None, "scheduler": None, "reason": None,
           "samples": total if committed is None else committed}
    tstate = rec = None
    if task is not None:
        row["job_id"], row["log"] = task["job_id"], task.get("stderr")
        tpath = TaskState.path(task["folder"], task["job_id"])
        if tpath not in task_files:
            try:
                task_files[tpath] = read_json(tpath) if tpath.exists() else None
            except (OSError, ValueError):
                task_files[tpath] = None
        tstate = task_files[tpath]
        if tstate:
            for k in ("attempts", "timeouts", "preemptions"):
                row[k] = tstate.get(k, 0)
        rec = view.state(task["job_id"])
        if rec:
            row["scheduler"], row["reason"] = rec["state_text"], rec["reason"]
    row["state"] = _shard_state(committed is None, task, tstate, rec, row["samples"])
    if row["state"] == "failed":
        row["error"] = _error_line(task, tstate, rec)
    return row


def _shard_state(is_done: bool, task: Optional[dict], tstate: Optional[dict], rec: Optional[dict],
                 samples: int) -> str:
    if is_done:
        return "done"
    if task is None:
        return "partial" if samples else "not submitted"
    sched = rec["state"] if rec else None
    if sched in PENDING_STATES:
        return "pending"
    if sched in RUNNING_STATES:
        return "running"
    if sched is None:  # not in accounting yet (just submitted) or sacct unavailable
        if tstate and tstate.get("state") == "failed":
            return "failed"
        if tstate and tstate.get("state") in ("running",):
            return "running"
        return "pending"
    return "failed"  # ended (COMPLETED without the DONE marker, FAILED, CANCELLED, TIMEOUT, ...)


def _error_line(task: Optional[dict], tstate: Optional[dict], rec: Optional[dict]) -> str:
    if tstate and tstate.get("state") in ("failed", "stopped") and tstate.get("error"):
        err = tstate["error"]
        if rec and rec["state"] not in ("FAILED", "COMPLETED") and tstate.get("state") == "stopped":
            return f"{rec['state_text']}: {err}"
        return err
    text = ""
    if task and task.get("stderr") and Path(task["stderr"]).exists():
        with open(task["stderr"], "rb") as f:
            f.seek(max(0, os.path.getsize(task["stderr"]) - 8192))
            text = f.read().decode("utf-8", "replace")
    last = log_error_line(text)
    sched = rec["state_text"] if rec else "ended"
    return f"{sched}: {last}" if last else f"{sched} (exit {rec['exit_code'] if rec else '?'})"


def format_status(report: dict, limit: int = 60) -> str:
    counts = report["counts"]
    order = ("done", "running", "pending", "partial", "failed", "not submitted")
    head = (f"{report['run_dir']}: {len(report['shards'])} shards, {report['samples']}/{report['total']} "
            f"samples committed · " + ", ".join(f"{k} {counts[k]}" for k in order if counts.get(k)))
    lines = [head]
    if report["sacct_error"]:
        lines.append(f"warning: {report['sacct_error']}")
    done = [r["index"] for r in report["shards"] if r["state"] == "done"]
    if done:
        lines.append(f"done: shards {ranges(done)}")
    others = [r for r in report["shards"] if r["state"] != "done"]
    if others:
        lines += _shard_lines(others, limit)
    for m in report["merge_jobs"]:
        lines.append(f"merge job {m['job_id']}: {m['scheduler'] or 'not in accounting yet'}"
                     + (f" ({m['reason']})" if m.get("reason") not in (None, "", "None") else "")
                     + f"; log: {m['stdout']}")
    if report["merged"]:
        lines.append(f"merged: {Path(report['run_dir']) / rundir.SUMMARY_FILE}")
    elif not others:
        lines.append(f"all shards done: rsd-batch merge run.dir={report['run_dir']}")
    elif counts.get("failed") or counts.get("not submitted") or counts.get("partial"):
        lines.append(f"to finish: fix what failed, then `rsd-batch run launcher=slurm "
                     f"run.dir={report['run_dir']}` (only the missing work runs)")
    return "\n".join(lines)


def _shard_lines(rows: list[dict], limit: int) -> list[str]:
    lines = [f"{'shard':>6}  {'state':<13} {'samples':>9}  {'job':<12} {'tries':>5}  note"]
    for r in rows[:limit]:
        tries = f"{r['attempts']}" + (f" t{r['timeouts']}p{r['preemptions']}" if r["timeouts"] or r["preemptions"] else "")
        note = r["error"] or (r["reason"] if r["state"] == "pending" and r["reason"] not in
                              (None, "", "None") else "") or ""
        if r["state"] in ("failed", "running") and r["log"]:
            note = (note + "  " if note else "") + f"log: {r['log']}"
        lines.append(f"{r['index']:>6}  {r['state']:<13} {r['samples']:>4}/{r['total']:<4}  "
                     f"{r['job_id'] or '-':<12} {tries:>5}  {note}")
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more")
    return lines
