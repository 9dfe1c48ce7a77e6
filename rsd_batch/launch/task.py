"""Inside a SLURM task: run the task's shards, checkpoint and requeue on the scheduler's warning.

    <submission>/tasks/12_3.json     written by task 3 of array 12: state, attempts, timeouts,
                                     preemptions, the error that stopped it (what status shows)

The task runs `runner.run(cfg, shards, should_stop)`, which holds each shard's lock while it runs it.
SLURM's warning signal (USR2, launcher.signal_delay_s before the limit) makes it stop taking batches;
after the batch in flight is committed it checkpoints and requeues itself through submitit (if the
batch outlives the warning, it requeues at once and the batch is redone), and on restart the runner
resumes inside the shard from the committed parts. Timeouts and preemptions are counted apart,
each with its limit. Errors that would repeat (bad config, missing model, ...) fail the task at
once, with the message in its task file; nothing requeues on an error.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from .. import rundir
from ..config import Config
from ..errors import UserError
from ..files import read_json, write_json
from .scheduler import LaunchError, time_left_s
from .stopping import Stop

log = logging.getLogger(__name__)


def config_from_container(c: dict) -> DictConfig:
    return OmegaConf.merge(OmegaConf.structured(Config), c)


@dataclass
class TaskState:
    """What a task records of itself, in <submission>/tasks/<job id>.json."""
    job_id: str
    shards: list[int]
    state: str = "new"  # new | running | requeued | done | stopped | failed
    attempts: int = 0
    timeouts: int = 0
    preemptions: int = 0
    requeued_by_slurm: int = 0
    error: Optional[str] = None
    error_kind: Optional[str] = None  # user | crash | limit
    history: list[dict] = field(default_factory=list)
    updated: Optional[float] = None
    traceback: Optional[str] = None
    last_requeue: Optional[str] = None

    @staticmethod
    def path(sub_dir: str, job_id: str) -> Path:
        return Path(sub_dir) / "tasks" / f"{job_id}.json"

    @classmethod
    def load(cls, sub_dir: str, job_id: str, shards: list[int]) -> "TaskState":
        path = cls.path(sub_dir, job_id)
        try:
            d = read_json(path) if path.exists() else {}
        except (OSError, ValueError):
            d = {}
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{"job_id": job_id, "shards": shards, **known})

    def save(self, sub_dir: str, **changes) -> "TaskState":
        for k, v in changes.items():
            setattr(self, k, v)
        self.updated = time.time()
        write_json(self.path(sub_dir, self.job_id), asdict(self))
        return self


def setup_task_logging() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, logging.StreamHandler) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
    root.setLevel(logging.INFO)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def log_error_line(text: str) -> str:
    """The line of a task's stderr that says what went wrong: the last exception line, else the
    last line that is not srun's own exit report."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("srun: ")]
    for ln in reversed(lines):
        if re.match(r"^(slurmstepd\S*: error: \*\*\*|[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b)", ln):
            return ln
    return lines[-1] if lines else ""


class ShardTask:
    """One array task: runs its shards; checkpoints and requeues on SLURM's warning signal.

    submitit pickles this object into the submission folder; `checkpoint` (called by submitit's
    signal handler, which this task invokes only after the batch in flight is committed) counts the
    timeout or preemption and returns a fresh copy to requeue, or None when a limit is reached.
    """

    def __init__(self, config: dict, sub_dir: str, limits: dict) -> None:
        self.config = config
        self.sub_dir = sub_dir
        self.limits = limits
        self._started = time.time()
        self._job_id: Optional[str] = None

    def __call__(self, shards: list[int]) -> dict:
        import submitit

        setup_task_logging()
        self._started = time.time()
        self._job_id = submitit.JobEnvironment().job_id
        cfg = config_from_container(self.config)
        self._begin(shards, rundir.run_dir(cfg))
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and cpus.isdigit():
            import torch
            torch.set_num_threads(int(cpus))
        from ..runner import run as run_shards

        submitit_handler = signal.getsignal(signal.SIGUSR2)
        grace = max(5.0, self.limits["signal_delay_s"] - 30.0)
        with Stop(warning=signal.SIGUSR2, grace_s=grace, now=submitit_handler) as stop:
            try:
                report = run_shards(cfg, shard_indices=shards, should_stop=stop)
            except Exception as e:
                stop.ignore_warnings()
                self._failed(shards, e)
                raise
            stop.cancel_watchdog()
            if report["complete"]:
                stop.ignore_warnings()
                TaskState.load(self.sub_dir, self._job_id, shards).save(self.sub_dir, state="done")
                log.info("task %s: shards %s done", self._job_id, shards)
                return {"job_id": self._job_id, "shards": shards, "complete": True}
            self._stopped(shards, stop, callable(submitit_handler) and submitit_handler)

    def _begin(self, shards: list[int], run: Path) -> None:
        """Count this attempt (and requeues SLURM did by itself); refuse past the preemption limit."""
        state = TaskState.load(self.sub_dir, self._job_id, shards)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        counted = state.timeouts + state.preemptions
        if restarts > counted:  # requeued by SLURM itself (preemption, node failure, scontrol requeue)
            state.requeued_by_slurm += restarts - counted
            state.preemptions += restarts - counted
        progress = {s: rundir.shard_progress(run, s, None) for s in shards}
        committed = {s: "done" if n is None else n for s, n in progress.items()}
        state.attempts += 1
        state.history.append({"attempt": state.attempts, "started": time.time(), "host": socket.gethostname(),
                              "slurm_restart_count": restarts, "committed_at_start": committed})
        state.save(self.sub_dir, state="running", error=None, error_kind=None)
        log.info("task %s (attempt %d): shards %s, committed at start %s; run %s", self._job_id,
                 state.attempts, shards, committed, run)
        if state.preemptions > self.limits["max_preemptions"]:
            msg = (f"preempted {state.preemptions} times, more than launcher.max_preemptions="
                   f"{self.limits['max_preemptions']}; not running again. Re-submit to continue.")
            state.save(self.sub_dir, state="failed", error=msg, error_kind="limit")
            raise LaunchError(msg)

    def _failed(self, shards: list[int], e: Exception) -> None:
        state = TaskState.load(self.sub_dir, self._job_id, shards)
        if state.error_kind != "limit":
            kind = "user" if isinstance(e, UserError) else "crash"
            msg = str(e) if kind == "user" else _last_line(f"{type(e).__name__}: {e}")
            state.save(self.sub_dir, state="failed", error=msg, error_kind=kind,
                       traceback=traceback.format_exc()[-4000:])

    def _stopped(self, shards: list[int], stop: Stop, requeue) -> None:  # noqa: ANN001
        """Stopped between batches by a signal: requeue on a warning, else record the stop and exit."""
        # A preemption by submitit's convention sends SIGTERM and then USR2: give the USR2 a moment.
        deadline = time.time() + 3
        while not stop.warned() and time.time() < deadline:
            time.sleep(0.1)
        if stop.warned() and requeue:
            log.info("task %s: committed work is safe; checkpointing and requeueing", self._job_id)
            stop.ignore_warnings()
            stop.cancel_watchdog()  # one armed during the wait above
            requeue(signal.SIGUSR2, None)  # -> self.checkpoint, scontrol requeue, exit
        TaskState.load(self.sub_dir, self._job_id, shards).save(
            self.sub_dir, state="stopped", error=f"stopped by {', '.join(stop.signals)} after the last committed batch")
        log.warning("task %s: stopped by %s; the committed batches are kept", self._job_id, stop.signals)
        sys.exit(128 + signal.SIGTERM)

    def checkpoint(self, shards: list[int]):
        """Called by submitit's handler: count, and requeue a fresh task (None: do not requeue)."""
        from submitit.helpers import DelayedSubmission

        state = TaskState.load(self.sub_dir, self._job_id, shards)
        timed_out = self._timed_out()
        key = "timeouts" if timed_out else "preemptions"
        setattr(state, key, getattr(state, key) + 1)
        limit = self.limits["max_timeouts" if timed_out else "max_preemptions"]
        if getattr(state, key) > limit:
            what = "reached its time limit" if timed_out else "was preempted"
            hint = ("raise launcher.timeout_min or launcher.max_timeouts" if timed_out
                    else "raise launcher.max_preemptions")
            msg = (f"{what} {getattr(state, key)} times, more than launcher.max_{key}={limit}: not requeued "
                   f"({hint}, then re-submit; committed work is kept)")
            state.save(self.sub_dir, state="failed", error=msg, error_kind="limit")
            log.error("task %s: %s", self._job_id, msg)
            return None
        state.save(self.sub_dir, state="requeued", error=None, last_requeue="timeout" if timed_out else "preemption")
        log.warning("task %s: %s %d/%d; requeueing", self._job_id,
                    "timeout" if timed_out else "preemption", getattr(state, key), limit)
        return DelayedSubmission(ShardTask(self.config, self.sub_dir, self.limits), shards)

    def _timed_out(self) -> bool:
        """The warning came because the time limit is near (not a preemption)?"""
        margin = self.limits["signal_delay_s"] + 90  # SLURM may signal up to ~60 s early
        left = time_left_s(self._job_id) if self._job_id else None
        if left is not None:
            return left <= margin
        return time.time() - self._started >= self.limits["timeout_min"] * 60 - margin

    def __getstate__(self):
        return {"config": self.config, "sub_dir": self.sub_dir, "limits": self.limits}

    def __setstate__(self, d):
        self.__init__(d["config"], d["sub_dir"], d["limits"])


class MergeTask:
    """The merge as a SLURM job (launcher.merge_after): refuses an incomplete run like `rsd-batch merge`."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def __call__(self) -> dict:
        from ..merge import format_summary, merge_run

        setup_task_logging()
        summary = merge_run(Path(self.run_dir))
        print(format_summary(summary))
        print(f"merged dataset: {summary['dataset']}\nsummary: {Path(self.run_dir) / rundir.SUMMARY_FILE}")
        return {"samples": summary["samples"], "dataset": summary["dataset"]}
