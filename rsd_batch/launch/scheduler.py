"""SLURM's command-line tools, wrapped and parsed: sbatch's presence, MaxArraySize, sacct, squeue.

Nothing here decides anything about a run; `view.SchedulerView` is what the rest of the launcher asks.
"""
from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
from typing import Iterable, Optional

from ..errors import UserError

ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED",
                 "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "SUSPENDED",
                  "STOPPED", "RESIZING"}
PENDING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}


class LaunchError(UserError, RuntimeError):
    """A launcher problem the user can fix (no sbatch, impossible placement, nothing to merge)."""


def sbatch_available() -> bool:
    return shutil.which("sbatch") is not None


def max_array_size() -> Optional[int]:
    """MaxArraySize from `scontrol show config` (arrays hold at most that many tasks); None if unknown."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(m.group(1)) if m else None


def parse_sacct(text: str) -> dict[str, dict]:
    """`sacct -X -P -n -o JobID,State,Reason,ExitCode,Submit,Start,End,NodeList` -> {job id: record}.

    Pending array tasks come as one line `12_[2-5,7%2]`; it is expanded to 12_2 ... 12_7. When a job id
    appears twice (ids restart after a cluster's state is wiped) the latest submission wins.
    """
    out: dict[str, dict] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) < 8:
            continue
        jid, state, reason, exit_code, submit, start, end, nodes = parts[:8]
        if "." in jid:  # a step
            continue
        rec = {"state": state.split()[0] if state else "UNKNOWN", "state_text": state, "reason": reason,
               "exit_code": exit_code, "submit": _sacct_time(submit), "start": start, "end": end,
               "nodes": nodes}
        for key in _expand_job_id(jid):
            old = out.get(key)
            if old is None or (rec["submit"] or 0) >= (old["submit"] or 0):
                out[key] = rec
    return out


def _expand_job_id(jid: str) -> list[str]:
    m = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", jid)
    if not m:
        return [jid]
    keys = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        keys += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return keys


def _sacct_time(text: str) -> Optional[float]:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def sacct(job_ids: Iterable[str], since: Optional[float] = None) -> dict[str, dict]:
    """ONE sacct call for all these jobs (array ids cover all their tasks). Raises LaunchError."""
    ids = sorted({str(j).split("_")[0] for j in job_ids}, key=int)
    if not ids:
        return {}
    cmd = ["sacct", "-X", "-P", "-n", "-o", "JobID,State,Reason,ExitCode,Submit,Start,End,NodeList",
           "-j", ",".join(ids)]
    if since is not None:
        cmd += ["-S", dt.datetime.fromtimestamp(since - 600).strftime("%Y-%m-%dT%H:%M:%S")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(f"sacct could not run: {e}") from None
    if proc.returncode != 0:
        raise LaunchError(f"sacct failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    return parse_sacct(proc.stdout)


def time_left_s(job_id: str) -> Optional[float]:
    """Seconds until the job's time limit, from squeue (None when unknown or unlimited)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_duration(out)


def parse_duration(text: str) -> Optional[float]:
    """SLURM's [days-][hours:]minutes:seconds -> seconds; None for INVALID/UNLIMITED/NOT_SET."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not m:
        return None
    d, h, mi, s = (int(x) if x else 0 for x in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def sacct_available() -> bool:
    return shutil.which("sacct") is not None
