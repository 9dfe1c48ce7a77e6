"""One view of a run's SLURM jobs: its submissions as recorded in the run, and what the scheduler says
of them, asked in ONE batched sacct call, at most once per `min_interval_s` (as submitit's InfoWatcher).

    <scheduler folder>/                       launcher.folder, else <run>/slurm
      20250101-120000-1a2b/submission.json    one folder per submission: arrays, tasks -> shards, merge job

Every caller (local run, submit, merge job, dry run, status) asks `SchedulerView`; the error policy is
here too: when sacct cannot answer, `states()` is empty and `error` says why, and `busy(strict=True)`
refuses (a submission must never run a shard twice), while `busy(strict=False)` assumes none.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable, Optional

from .. import rundir
from ..files import read_json
from .scheduler import ACTIVE_STATES, LaunchError, sacct, sacct_available

log = logging.getLogger(__name__)
SUBMISSION_FILE = "submission.json"


def scheduler_folder(cfg) -> Path:  # noqa: ANN001
    """launcher.folder, else the folder an earlier submission recorded in the run, else <run>/slurm."""
    if cfg.launcher.folder:
        return Path(cfg.launcher.folder).resolve()
    run = rundir.run_dir(cfg)
    try:
        return Path(read_json(run / rundir.POINTER_FILE)["folder"])
    except (OSError, KeyError, TypeError, ValueError):
        return run / rundir.SCHEDULER_FOLDER


def load_submissions(folder: Path) -> list[dict]:
    """Every submission of the run, oldest first (folder names start with the time)."""
    subs = []
    if folder.exists():
        for path in sorted(folder.glob(f"*/{SUBMISSION_FILE}")):
            try:
                sub = read_json(path)
            except (OSError, ValueError):
                continue
            sub["folder"] = str(path.parent)
            subs.append(sub)
    return subs


class SchedulerView:
    """A run's submissions and their jobs' scheduler states."""

    def __init__(self, folder: Path, min_interval_s: float = 10.0) -> None:
        self.folder = folder
        self.subs = load_submissions(folder)
        self.min_interval_s = min_interval_s
        self.error: Optional[str] = None
        self.calls = 0
        self._states: dict[str, dict] = {}
        self._asked = -float("inf")

    @classmethod
    def of(cls, cfg) -> "SchedulerView":  # noqa: ANN001
        return cls(scheduler_folder(cfg))

    def job_ids(self) -> list[str]:
        ids = []
        for sub in self.subs:
            ids += [a["job_id"] for a in sub.get("arrays", [])]
            if sub.get("merge_job"):
                ids.append(sub["merge_job"]["job_id"])
        return ids

    def states(self) -> dict[str, dict]:
        """job id -> sacct record, for every job of the run (empty when there are none or sacct fails)."""
        if not self.subs or time.monotonic() - self._asked < self.min_interval_s:
            return self._states
        self._asked = time.monotonic()
        if not sacct_available():
            self.error = "sacct is not on PATH: scheduler states unknown"
            return self._states
        try:
            self.calls += 1
            self._states = sacct(self.job_ids(), since=min(s["submitted_at"] for s in self.subs))
            self.error = None
        except LaunchError as e:
            self.error = str(e)
        return self._states

    def state(self, job_id: Optional[str]) -> Optional[dict]:
        return self.states().get(job_id) if job_id else None

    def tasks(self) -> dict[int, dict]:
        """shard -> the latest task (of any submission) that was given it."""
        latest: dict[int, dict] = {}
        for sub in self.subs:
            for arr in sub.get("arrays", []):
                for task in arr["tasks"]:
                    for shard in task["shards"]:
                        latest[shard] = {**task, "submitted_at": sub["submitted_at"], "folder": sub["folder"]}
        return latest

    def busy(self, strict: bool, grace_s: float = 600) -> dict[int, str]:
        """shard -> job id, for shards whose latest task is queued or running (or too new for sacct).
        When the scheduler cannot say: strict raises LaunchError, else none are assumed busy."""
        if not self.subs:
            return {}
        view = self.states()
        if self.error is not None:
            if strict:
                raise LaunchError(f"{self.error}; without it there is no knowing which shards are still "
                                  "queued, so nothing is submitted (no shard runs twice).")
            log.warning("cannot ask SLURM which shards are still queued (%s); assuming none", self.error)
            return {}
        busy, now = {}, time.time()
        for shard, task in self.tasks().items():
            rec = view.get(task["job_id"])
            if rec is None:
                if now - task["submitted_at"] < grace_s:  # accounting lags submission a little
                    busy[shard] = task["job_id"]
            elif rec["state"] in ACTIVE_STATES:
                busy[shard] = task["job_id"]
        return busy

    def merge_jobs(self) -> list[dict]:
        out = []
        for sub in self.subs:
            if sub.get("merge_job"):
                m = sub["merge_job"]
                rec = self.state(m["job_id"])
                out.append({**m, "scheduler": rec["state_text"] if rec else None,
                            "reason": rec["reason"] if rec else None})
        return out


def job_list(ids: Iterable[str], k: int = 6) -> str:
    ids = sorted(set(ids))
    return ", ".join(ids[:k]) + (f" and {len(ids) - k} more" if len(ids) > k else "")


def ranges(xs: Iterable[int]) -> str:
    """1,2,3,5 -> "1-3,5"."""
    xs = sorted(xs)
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)
