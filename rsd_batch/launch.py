"""Where a run's shards run: in this process (`launcher=local`, `launcher=debug`) or as SLURM job
arrays through submitit (`launcher=slurm`); the run's status; the dry-run plan.

    <run>/slurm/                              launcher.folder (default)
      20250101-120000-1a2b/                   one folder per submission (submitit's folder)
        submission.json                       what was submitted: arrays, tasks -> shards, merge job
        12_submission.sh                      the sbatch script of array 12
        12_3_0_log.out, 12_3_0_log.err        the logs of task 3 of array 12
        tasks/12_3.json                       written by that task: state, attempts, timeouts,
                                              preemptions, the error that stopped it

A SLURM task runs `runner.run(cfg, shard_indices, should_stop)` for its shards, which holds each
shard's lock (`<run>/locks/`, as in every launcher) while it runs it: an old task still winding down
after scancel, or a duplicate submission, never commits the same parts. SLURM's warning
signal (USR2, `--signal` from launcher.signal_delay_s) makes it stop taking batches; after the batch
in flight is committed it checkpoints and requeues itself through submitit (if the batch outlives
the warning, it requeues at once and the batch is redone), and on restart the runner resumes inside
the shard from the committed parts. Timeouts and preemptions are counted apart, each with its
limit. Errors that would repeat (bad config, missing model, ...) fail the task at once, with the
message in its task file, which `rsd-batch status` shows; nothing requeues on an error.

Knows nothing about decoding: the runner does that.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from .config import Config, to_container
from .errors import UserError
from .files import read_json, write_json

log = logging.getLogger(__name__)

SUBMISSION_FILE = "submission.json"
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED",
                 "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "SUSPENDED",
                  "STOPPED", "RESIZING"}


class LaunchError(UserError, RuntimeError):
    """A launcher problem the user can fix (no sbatch, impossible placement, nothing to merge)."""


# ---------------------------------------------------------------- entry points (from app.py)


def launch(cfg: DictConfig) -> dict:
    """`rsd-batch run`: the plan (run.dry_run), or the shards run here (local, debug) or submitted."""
    if cfg.run.dry_run:
        return dry_run(cfg)
    name = str(cfg.launcher.name)
    if name == "slurm":
        return submit(cfg)
    if name == "debug":
        return run_debug(cfg)
    return run_local(cfg)


def run_local(cfg: DictConfig) -> dict:
    """Every pending shard in this process. SIGTERM stops it after the batch in flight is committed."""
    from .runner import run as run_shards

    busy = _busy_shards_of_earlier_submissions(cfg)
    indices = None
    if busy:
        from .shards import read_manifest
        from .runner import shards_dir
        n = len(read_manifest(shards_dir(cfg))["shards"])
        indices = [i for i in range(n) if i not in busy]
        print(f"{len(busy)} shards are queued or running in SLURM jobs of this run "
              f"({_job_list(busy.values())}); they are left to them.")
    set_threads(cfg.run.threads)
    stop = _StopFlag()
    previous = signal.signal(signal.SIGTERM, stop.handler) if _main_thread() else None
    try:
        report = run_shards(cfg, shard_indices=indices, should_stop=stop)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not report["complete"]:
        print(f"stopped by {stop.signals[0] if stop.signals else 'a stop request'} after the last "
              f"committed batch; run the same command again to resume.", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    return report


def set_threads(threads: Optional[int]) -> int:
    """torch's thread count: `run.threads`, else the cores this process may run on. On a shared
    2-core machine, two threads made 60 decode steps take 46-74 s against 1.7-4.2 s with one."""
    import torch

    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    log.info("torch threads: %d (%s)", n, "run.threads" if threads else "the cores this process may use")
    return n


def run_debug(cfg: DictConfig) -> dict:
    """In this process, with no executor and no signal handling around it: for pdb and tracebacks.

    Runs the same body as a SLURM task (`run_task_body`), over every pending shard.
    """
    return run_task_body(cfg, shards=None, should_stop=None)


def run_task_body(cfg: DictConfig, shards: Optional[list[int]],
                  should_stop: Optional[Callable[[], bool]]) -> dict:
    from .runner import run as run_shards

    return run_shards(cfg, shard_indices=shards, should_stop=should_stop)


# ---------------------------------------------------------------- config helpers


POINTER_FILE = "launcher.json"  # <run>/launcher.json: where the run's SLURM folder is


def slurm_folder(cfg: DictConfig) -> Path:
    """launcher.folder, else the folder an earlier submission recorded in the run, else <run>/slurm."""
    if cfg.launcher.folder:
        return Path(cfg.launcher.folder).resolve()
    run_dir = Path(cfg.run.dir).resolve()
    try:
        return Path(read_json(run_dir / POINTER_FILE)["folder"])
    except (OSError, KeyError, TypeError, ValueError):
        return run_dir / "slurm"


def task_config(cfg: DictConfig, folder: Path) -> dict:
    """The resolved config a task gets: absolute paths (a job starts elsewhere), no progress bars."""
    c = to_container(cfg)
    c["run"]["dir"] = str(Path(c["run"]["dir"]).resolve())
    if c["run"].get("shards_from"):
        c["run"]["shards_from"] = str(Path(c["run"]["shards_from"]).resolve())
    c["launcher"]["folder"] = str(folder)
    c["run"]["progress"] = False
    c["run"]["dry_run"] = False
    for role in ("draft", "target"):
        c["model"][role]["path"] = _abs_if_local(c["model"][role]["path"])
    c["prm"]["path"] = _abs_if_local(c["prm"]["path"])
    return c


def config_from_container(c: dict) -> DictConfig:
    return OmegaConf.merge(OmegaConf.structured(Config), c)


def _abs_if_local(path: Optional[str]) -> Optional[str]:
    if path and (path.startswith((".", "/", "~")) or Path(path).exists()):
        return str(Path(path).expanduser().resolve())
    return path


def method_roles(method, cfg: DictConfig) -> tuple[str, ...]:
    """The models a method needs (a tuple, or a function of the method config)."""
    roles = method.roles
    return tuple(roles(cfg.method) if callable(roles) else roles)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------- the scheduler


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


def _time_left_s(job_id: str) -> Optional[float]:
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


# ---------------------------------------------------------------- submissions recorded in the run


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


def _task_index(subs: list[dict]) -> dict[int, dict]:
    """shard -> the latest task (of any submission) that was given it."""
    latest: dict[int, dict] = {}
    for sub in subs:
        for arr in sub.get("arrays", []):
            for task in arr["tasks"]:
                for shard in task["shards"]:
                    latest[shard] = {**task, "submitted_at": sub["submitted_at"], "folder": sub["folder"]}
    return latest


def _all_job_ids(subs: list[dict]) -> list[str]:
    ids = []
    for sub in subs:
        ids += [a["job_id"] for a in sub.get("arrays", [])]
        if sub.get("merge_job"):
            ids.append(sub["merge_job"]["job_id"])
    return ids


def _busy(subs: list[dict], view: dict[str, dict], grace_s: float = 600) -> dict[int, str]:
    """shard -> job id, for shards whose latest task is queued or running (or too new for sacct)."""
    busy = {}
    now = time.time()
    for shard, task in _task_index(subs).items():
        rec = view.get(task["job_id"])
        if rec is None:
            if now - task["submitted_at"] < grace_s:  # accounting lags submission a little
                busy[shard] = task["job_id"]
        elif rec["state"] in ACTIVE_STATES:
            busy[shard] = task["job_id"]
    return busy


def _busy_shards_of_earlier_submissions(cfg: DictConfig) -> dict[int, str]:
    subs = load_submissions(slurm_folder(cfg))
    if not subs or shutil.which("sacct") is None:
        return {}
    try:
        view = sacct(_all_job_ids(subs), since=min(s["submitted_at"] for s in subs))
    except LaunchError as e:
        log.warning("cannot ask SLURM which shards are still queued (%s); assuming none", e)
        return {}
    return _busy(subs, view)


def _job_list(ids: Iterable[str], k: int = 6) -> str:
    ids = sorted(set(ids))
    return ", ".join(ids[:k]) + (f" and {len(ids) - k} more" if len(ids) > k else "")


def _ranges(xs: Iterable[int]) -> str:
    xs = sorted(xs)
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


# ---------------------------------------------------------------- planning (shared by submit and dry run)


def split_arrays(groups: list[list[int]], max_size: Optional[int], parallelism: int
                 ) -> list[tuple[list[list[int]], int]]:
    """Tasks -> arrays of at most max_size tasks, each with its throttle (`%N`).

    The arrays of one run share launcher.array_parallelism: with k arrays each may run
    parallelism // k tasks at once (at least 1), so the run never exceeds the throttle.
    """
    size = max_size if max_size and max_size > 0 else len(groups) or 1
    chunks = [groups[i:i + size] for i in range(0, len(groups), size)]
    per = max(1, parallelism // max(1, len(chunks)))
    return [(c, min(len(c), per)) for c in chunks]


def sbatch_parameters(cfg: DictConfig, job_name: str, gpus: bool = True) -> dict:
    """The launcher config as submitit's SlurmExecutor parameters (sbatch names)."""
    lc = cfg.launcher
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": int(lc.timeout_min),
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": int(lc.cpus_per_task),
        "signal_delay_s": int(lc.signal_delay_s),
        "array_parallelism": int(lc.array_parallelism),
        "setup": list(lc.setup),
        # Requeueable whatever the cluster's JobRequeue default: the checkpoint requeues itself.
        "additional_parameters": {"requeue": True, **to_container(lc.additional_parameters)},
    }
    extra = params["additional_parameters"]
    for key in [k for k, v in extra.items() if v is False or v is None]:  # `key: false` = leave out
        del extra[key]
    if gpus and lc.gpus_per_task:
        params["gpus_per_task"] = int(lc.gpus_per_task)
    if lc.mem_gb:
        params["mem"] = f"{int(lc.mem_gb)}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if lc[key]:
            params[key] = str(lc[key])
    return params


def _check_models(cfg: DictConfig, roles: Iterable[str]) -> None:
    """Fail before submitting when a local model folder is missing (every task would fail on it)."""
    from .models import ModelLoadError

    for role in roles:
        node, key = (cfg.prm, "prm.path") if role == "prm" else (cfg.model[role], f"model.{role}.path")
        path = str(node.path)
        if path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
            raise ModelLoadError(f"{key}={path!r} does not exist (checked before submitting, so no "
                                 "task starts only to fail). Give a folder written by save_pretrained "
                                 "that the compute nodes can read, or a hub id.")


def _check_placement(cfg: DictConfig, roles: Iterable[str]) -> None:
    devices = {role: str((cfg.prm if role == "prm" else cfg.model[role]).device) for role in roles}
    on_gpu = [r for r, d in devices.items() if d.startswith("cuda")]
    if on_gpu and not cfg.launcher.gpus_per_task:
        raise LaunchError(f"model {', '.join(on_gpu)} is on {devices[on_gpu[0]]} but "
                          "launcher.gpus_per_task=0: the tasks would get no GPU. Set "
                          "launcher.gpus_per_task=1 (all models share it) or more for a device_map.")
    if not on_gpu and cfg.launcher.gpus_per_task:
        print(f"warning: launcher.gpus_per_task={cfg.launcher.gpus_per_task} but every model is on "
              f"the CPU ({', '.join(f'{r}: {d}' for r, d in devices.items())}); set "
              "model.<role>.device=cuda to use the GPU, or launcher.gpus_per_task=0.", file=sys.stderr)


def _run_state(cfg: DictConfig, claim: bool) -> dict:
    """Manifest, method, fingerprint and pending work of the run folder (claim=True records run.json)."""
    from .files import fingerprint
    from .methods import get_method
    from .runner import (RUN_FILE, RunConfigMismatch, claim_run_dir, pending_work, record_run, run_identity,
                         shards_dir)
    from .shards import read_manifest

    run_dir = Path(cfg.run.dir).resolve()
    manifest = read_manifest(shards_dir(cfg))
    method = get_method(str(cfg.method.name))
    identity = run_identity(cfg, manifest, method)
    if claim:  # a submission claims the folder for its tasks
        fp, unrecorded = claim_run_dir(run_dir, cfg, identity)
        if unrecorded:
            record_run(run_dir, cfg, identity, fp)
    else:
        fp = fingerprint(identity)
        old = read_json(run_dir / RUN_FILE) if (run_dir / RUN_FILE).exists() else None
        if old and old["fingerprint"] != fp and not cfg.run.fresh:
            raise RunConfigMismatch(f"{run_dir} holds results of another configuration (fingerprint "
                                    f"{old['fingerprint']}, now {fp}); `rsd-batch run` would refuse. "
                                    "Use another run.dir, or run.fresh=true.")
        if old and old["fingerprint"] != fp:  # run.fresh: everything would run again
            return {"run_dir": run_dir, "manifest": manifest, "method": method, "fp": fp,
                    "pending": {i: s["rows"] * cfg.method.n for i, s in enumerate(manifest["shards"])}}
    pending = pending_work(run_dir, manifest, fp, cfg.method.n)
    return {"run_dir": run_dir, "manifest": manifest, "method": method, "fp": fp, "pending": pending}


# ---------------------------------------------------------------- submission (launcher=slurm)


def submit(cfg: DictConfig) -> dict:
    """Submit the unfinished shards as job arrays and return at once (ids and paths are printed)."""
    from .methods import get_method

    method = get_method(str(cfg.method.name))
    _check_models(cfg, method_roles(method, cfg))  # config errors first: they need no cluster
    _check_placement(cfg, method_roles(method, cfg))
    if not sbatch_available():
        raise LaunchError("launcher=slurm needs sbatch on PATH: run this on a SLURM login node "
                          "(with SLURM_CONF set if the cluster needs it), or use launcher=local.")
    import submitit

    st = _run_state(cfg, claim=True)
    run_dir, manifest, pending = st["run_dir"], st["manifest"], st["pending"]
    folder = slurm_folder(cfg)
    subs = load_submissions(folder)
    busy: dict[int, str] = {}
    if subs:
        try:
            view = sacct(_all_job_ids(subs), since=min(s["submitted_at"] for s in subs))
        except LaunchError as e:
            raise LaunchError(f"{e}; without it there is no knowing which shards of {run_dir} are "
                              "still queued, so nothing is submitted (no shard runs twice).") from None
        busy = _busy(subs, view)
    todo = [i for i in sorted(pending) if i not in busy]
    per = max(1, int(cfg.launcher.shards_per_task))
    groups = [todo[i:i + per] for i in range(0, len(todo), per)]
    n_shards = len(manifest["shards"])
    report: dict[str, Any] = {"run_dir": str(run_dir), "fingerprint": st["fp"], "shards": n_shards,
                              "skipped": n_shards - len(pending), "busy": busy, "arrays": [],
                              "submitted": [], "merge_job": None}
    if not groups and not cfg.launcher.merge_after:
        print(f"nothing to submit: {n_shards - len(pending)} of {n_shards} shards are done"
              + (f", {len(busy)} are queued or running ({_job_list(busy.values())})" if busy else "")
              + f". `rsd-batch status run.dir={run_dir}` shows them"
              + ("." if busy else f"; `rsd-batch merge run.dir={run_dir}` merges the run."))
        return report

    sub_dir = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    sub_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"submitted_at": time.time(), "run_dir": str(run_dir),
                              "fingerprint": st["fp"], "arrays": [], "merge_job": None,
                              "launcher": to_container(cfg.launcher)}
    write_json(sub_dir / SUBMISSION_FILE, record)
    write_json(run_dir / POINTER_FILE, {"folder": str(folder)})
    tcfg = task_config(cfg, folder)
    limits = {k: int(cfg.launcher[k]) for k in ("max_timeouts", "max_preemptions", "signal_delay_s",
                                                 "timeout_min")}
    task = ShardTask(tcfg, str(sub_dir), limits)
    arrays = split_arrays(groups, max_array_size(), int(cfg.launcher.array_parallelism))
    if len(arrays) > 10:
        print(f"warning: {len(groups)} tasks need {len(arrays)} arrays; consider "
              f"launcher.shards_per_task={per * 4} (fewer, longer tasks).", file=sys.stderr)
    job_name = f"rsd-{run_dir.name}"
    for chunk, throttle in arrays:
        ex = submitit.SlurmExecutor(folder=sub_dir, max_num_timeout=limits["max_timeouts"]
                                    + limits["max_preemptions"] + 1)
        params = sbatch_parameters(cfg, job_name)
        params["array_parallelism"] = throttle
        ex.update_parameters(**params)
        jobs = ex.map_array(task, chunk)
        array_id = jobs[0].job_id.split("_")[0]
        tasks = [{"job_id": j.job_id, "shards": g, "stdout": str(j.paths.stdout),
                  "stderr": str(j.paths.stderr)} for j, g in zip(jobs, chunk)]
        record["arrays"].append({"job_id": array_id, "throttle": throttle, "tasks": tasks,
                                 "sbatch": str(jobs[0].paths.submission_file)})
        write_json(sub_dir / SUBMISSION_FILE, record)  # recorded as soon as it exists
    if cfg.launcher.merge_after:
        deps = [a["job_id"] for a in record["arrays"]] + sorted({j.split("_")[0] for j in busy.values()})
        record["merge_job"] = _submit_merge_job(cfg, sub_dir, run_dir, deps)
        write_json(sub_dir / SUBMISSION_FILE, record)
    report["arrays"] = record["arrays"]
    report["submitted"] = todo
    report["merge_job"] = record["merge_job"]
    report["folder"] = str(sub_dir)
    _print_submission(cfg, report, record, pending, busy, sub_dir)
    return report


def _submit_merge_job(cfg: DictConfig, sub_dir: Path, run_dir: Path, deps: list[str]) -> dict:
    import submitit

    ex = submitit.SlurmExecutor(folder=sub_dir, max_num_timeout=0)
    params = sbatch_parameters(cfg, f"rsd-merge-{run_dir.name}", gpus=False)
    params["cpus_per_task"] = min(int(cfg.launcher.cpus_per_task), 4)
    params["additional_parameters"] = {k: v for k, v in params["additional_parameters"].items()
                                       if k != "requeue"}
    if deps:
        params["dependency"] = "afterok:" + ":".join(deps)
        # A failed shard task makes afterok impossible: leave the queue instead of waiting forever.
        params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
    ex.update_parameters(**params)
    job = ex.submit(MergeTask(str(run_dir)))
    return {"job_id": job.job_id, "after": deps, "stdout": str(job.paths.stdout),
            "stderr": str(job.paths.stderr)}


def submit_merge(cfg: DictConfig) -> dict:
    """`rsd-batch merge launcher=slurm launcher.merge_after=true`: the merge as a job after the
    run's queued tasks (afterok); refused when shards are missing and nothing queued would make them."""
    if not sbatch_available():
        raise LaunchError("launcher.merge_after=true needs sbatch on PATH (a SLURM login node).")
    st = _run_state(cfg, claim=False)
    run_dir = st["run_dir"]
    folder = slurm_folder(cfg)
    subs = load_submissions(folder)
    busy = _busy(subs, sacct(_all_job_ids(subs), since=min(s["submitted_at"] for s in subs))) \
        if subs else {}
    missing = [i for i in st["pending"] if i not in busy]
    if missing:
        raise LaunchError(f"{run_dir}: shards {_ranges(missing)} are not done and no job of this run "
                          f"is queued to finish them; submit them first (rsd-batch run "
                          f"launcher=slurm run.dir={run_dir} launcher.merge_after=true).")
    sub_dir = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    sub_dir.mkdir(parents=True, exist_ok=True)
    deps = sorted({j.split("_")[0] for j in busy.values()}, key=int)
    record = {"submitted_at": time.time(), "run_dir": str(run_dir), "fingerprint": st["fp"],
              "arrays": [], "merge_job": None, "launcher": to_container(cfg.launcher)}
    record["merge_job"] = _submit_merge_job(cfg, sub_dir, run_dir, deps)
    write_json(sub_dir / SUBMISSION_FILE, record)
    m = record["merge_job"]
    print(f"submitted the merge of {run_dir} as job {m['job_id']}"
          + (f", after {', '.join(deps)} succeed (afterok)" if deps else "")
          + f"\n  log: {m['stdout']}\n  watch: rsd-batch status run.dir={run_dir}")
    return record


def _print_submission(cfg, report, record, pending, busy, sub_dir) -> None:
    run_dir = report["run_dir"]
    n_samples = sum(pending[i] for i in report["submitted"])
    lines = []
    if record["arrays"]:
        arrays = "; ".join(
            f"job {a['job_id']} ({len(a['tasks'])} task{'s' if len(a['tasks']) > 1 else ''}"
            + (f", at most {a['throttle']} at once" if len(a["tasks"]) > 1 else "") + ")"
            for a in record["arrays"])
        lines.append(f"submitted {len(report['submitted'])} shards ({n_samples} samples) of {run_dir} "
                     f"as {len(record['arrays'])} SLURM array{'s' if len(record['arrays']) > 1 else ''}: "
                     f"{arrays}")
        lines.append(f"  job ids: {' '.join(t['job_id'] for a in record['arrays'] for t in a['tasks'])}")
    lines.append(f"  skipped: {report['skipped']} shards already done"
                 + (f", {len(busy)} queued or running in {_job_list(busy.values())}" if busy else ""))
    if record.get("merge_job"):
        m = record["merge_job"]
        lines.append(f"  merge: job {m['job_id']}"
                     + (f" runs after {', '.join(m['after'])} succeed (afterok)" if m["after"] else ""))
    lines.append(f"  state and logs: {sub_dir}/ (sbatch scripts *_submission.sh, task logs "
                 f"<job>_<task>_0_log.out/.err, task states tasks/*.json)")
    lines.append(f"  watch: rsd-batch status run.dir={run_dir}")
    if not record.get("merge_job"):
        lines.append(f"  then: rsd-batch merge run.dir={run_dir}")
    print("\n".join(lines))


# ---------------------------------------------------------------- inside a SLURM task


class _StopFlag:
    """`should_stop` for the runner: true once a stop signal arrived (names kept in order)."""

    def __init__(self) -> None:
        self.signals: list[str] = []

    def handler(self, signum, frame) -> None:  # noqa: ARG002
        self.signals.append(signal.Signals(signum).name)

    def __call__(self) -> bool:
        return bool(self.signals)


def _setup_task_logging() -> None:
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

    # -- the task file: what status shows
    def _state_path(self) -> Path:
        return Path(self.sub_dir) / "tasks" / f"{self._job_id}.json"

    def _load_state(self, shards: list[int]) -> dict:
        path = self._state_path()
        if path.exists():
            try:
                return read_json(path)
            except (OSError, ValueError):
                pass
        return {"job_id": self._job_id, "shards": shards, "state": "new", "attempts": 0,
                "timeouts": 0, "preemptions": 0, "requeued_by_slurm": 0, "error": None,
                "error_kind": None, "history": []}

    def _save_state(self, record: dict, **changes) -> dict:
        record.update(changes, updated=time.time())
        write_json(self._state_path(), record)
        return record

    def __call__(self, shards: list[int]) -> dict:
        import submitit

        _setup_task_logging()
        self._started = time.time()
        env = submitit.JobEnvironment()
        self._job_id = env.job_id
        state = self._load_state(shards)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        counted = state["timeouts"] + state["preemptions"]
        if restarts > counted:  # requeued by SLURM itself (preemption, node failure, scontrol requeue)
            state["requeued_by_slurm"] += restarts - counted
            state["preemptions"] += restarts - counted
        cfg = config_from_container(self.config)
        from .runner import committed_count, result_paths

        run_dir = Path(cfg.run.dir)
        committed = {}
        for s in shards:
            final, done, parts = result_paths(run_dir, s)
            committed[s] = "done" if done.exists() else (committed_count(parts) if parts.exists() else 0)
        state["attempts"] += 1
        state["history"].append({"attempt": state["attempts"], "started": time.time(),
                                 "host": socket.gethostname(), "slurm_restart_count": restarts,
                                 "committed_at_start": committed})
        self._save_state(state, state="running", error=None, error_kind=None)
        log.info("task %s (attempt %d): shards %s, committed at start %s; run %s", self._job_id,
                 state["attempts"], shards, committed, run_dir)
        if state["preemptions"] > self.limits["max_preemptions"]:
            msg = (f"preempted {state['preemptions']} times, more than launcher.max_preemptions="
                   f"{self.limits['max_preemptions']}; not running again. Re-submit to continue.")
            self._save_state(state, state="failed", error=msg, error_kind="limit")
            raise LaunchError(msg)

        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and cpus.isdigit():
            import torch
            torch.set_num_threads(int(cpus))

        stop = _StopFlag()
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        watchdog: list[threading.Timer] = []
        grace = max(5.0, self.limits["signal_delay_s"] - 30.0)

        def on_warning(signum, frame):
            if stop.signals.count("SIGUSR2") or "watchdog" in stop.signals:
                # A second warning, or the batch in flight outlived the grace: requeue now (the
                # batch is redone after the restart; committed parts are kept).
                log.warning("checkpointing now, in the middle of a batch")
                signal.signal(signal.SIGUSR2, signal.SIG_IGN)
                submitit_handler(signum, frame)
                return
            stop.handler(signum, frame)
            log.warning("got %s: stopping after the batch in flight (at most %.0f s)",
                        signal.Signals(signum).name, grace)
            t = threading.Timer(grace, lambda: (stop.signals.append("watchdog"),
                                                os.kill(os.getpid(), signal.SIGUSR2)))
            t.daemon = True
            t.start()
            watchdog.append(t)

        def on_term(signum, frame):
            stop.handler(signum, frame)
            log.warning("got SIGTERM (scancel, preemption or requeue by SLURM): stopping after the "
                        "batch in flight")

        can_requeue = callable(submitit_handler)
        signal.signal(signal.SIGUSR2, on_warning)
        signal.signal(signal.SIGTERM, on_term)
        try:
            report = run_task_body(cfg, shards, should_stop=stop)
        except Exception as e:
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
            for t in watchdog:
                t.cancel()
            state = self._load_state(shards)
            if state.get("error_kind") != "limit":
                kind = "user" if isinstance(e, UserError) else "crash"
                msg = f"{type(e).__name__}: {e}" if kind == "crash" else str(e)
                self._save_state(state, state="failed", error=_last_line(msg) if kind == "crash" else msg,
                                 error_kind=kind, traceback=traceback.format_exc()[-4000:])
            raise
        for t in watchdog:
            t.cancel()
        if report["complete"]:
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
            state = self._load_state(shards)
            self._save_state(state, state="done")
            log.info("task %s: shards %s done", self._job_id, shards)
            return {"job_id": self._job_id, "shards": shards, "complete": True}
        # Stopped between batches by a signal. A preemption by submitit's convention sends SIGTERM
        # and then USR2: give the USR2 a moment to arrive before deciding.
        deadline = time.time() + 3
        while "SIGUSR2" not in stop.signals and "watchdog" not in stop.signals and time.time() < deadline:
            time.sleep(0.1)
        if ("SIGUSR2" in stop.signals or "watchdog" in stop.signals) and can_requeue:
            log.info("task %s: committed work is safe; checkpointing and requeueing", self._job_id)
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
            for t in watchdog:  # one armed during the wait above
                t.cancel()
            submitit_handler(signal.SIGUSR2, None)  # -> self.checkpoint, scontrol requeue, exit
        state = self._load_state(shards)
        self._save_state(state, state="stopped",
                         error=f"stopped by {', '.join(stop.signals)} after the last committed batch")
        log.warning("task %s: stopped by %s; the committed batches are kept", self._job_id, stop.signals)
        sys.exit(128 + signal.SIGTERM)

    def checkpoint(self, shards: list[int]):
        """Called by submitit's handler: count, and requeue a fresh task (None: do not requeue)."""
        from submitit.helpers import DelayedSubmission

        state = self._load_state(shards)
        timed_out = self._timed_out()
        key = "timeouts" if timed_out else "preemptions"
        state[key] += 1
        limit = self.limits["max_timeouts" if timed_out else "max_preemptions"]
        if state[key] > limit:
            what = "reached its time limit" if timed_out else "was preempted"
            hint = ("raise launcher.timeout_min or launcher.max_timeouts" if timed_out
                    else "raise launcher.max_preemptions")
            msg = (f"{what} {state[key]} times, more than launcher.max_{key}={limit}: not requeued "
                   f"({hint}, then re-submit; committed work is kept)")
            self._save_state(state, state="failed", error=msg, error_kind="limit")
            log.error("task %s: %s", self._job_id, msg)
            return None
        self._save_state(state, state="requeued", error=None,
                         last_requeue=("timeout" if timed_out else "preemption"))
        log.warning("task %s: %s %d/%d; requeueing", self._job_id,
                    "timeout" if timed_out else "preemption", state[key], limit)
        return DelayedSubmission(ShardTask(self.config, self.sub_dir, self.limits), shards)

    def _timed_out(self) -> bool:
        """The warning came because the time limit is near (not a preemption)?"""
        margin = self.limits["signal_delay_s"] + 90  # SLURM may signal up to ~60 s early
        left = _time_left_s(self._job_id) if self._job_id else None
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
        from .merge import format_summary, merge_run

        _setup_task_logging()
        summary = merge_run(Path(self.run_dir))
        print(format_summary(summary))
        print(f"merged dataset: {summary['dataset']}\nsummary: {Path(self.run_dir) / 'summary.json'}")
        return {"samples": summary["samples"], "dataset": summary["dataset"]}


# ---------------------------------------------------------------- status


def status(cfg: DictConfig) -> dict:
    """Per-shard state from the run folder, plus ONE sacct call for every job of the run."""
    from .runner import RUN_FILE, committed_count, result_paths, shards_dir
    from .shards import read_manifest

    run_dir = Path(cfg.run.dir).resolve()
    run_info = read_json(run_dir / RUN_FILE) if (run_dir / RUN_FILE).exists() else None
    if run_info is not None:
        manifest = read_manifest(Path(run_info["shards_dir"]))
        n = run_info["identity"]["method"]["n"]
        fp = run_info["fingerprint"]
    else:
        manifest = read_manifest(shards_dir(cfg))
        n, fp = cfg.method.n, None
    subs = load_submissions(slurm_folder(cfg))
    view: dict[str, dict] = {}
    sacct_error = None
    sacct_calls = 0
    if subs:
        if shutil.which("sacct") is None:
            sacct_error = "sacct is not on PATH: scheduler states unknown"
        else:
            try:
                sacct_calls += 1
                view = sacct(_all_job_ids(subs), since=min(s["submitted_at"] for s in subs))
            except LaunchError as e:
                sacct_error = str(e)
    tasks = _task_index(subs)
    task_files: dict[Path, Optional[dict]] = {}
    rows = []
    for entry in manifest["shards"]:
        i = entry["index"]
        total = entry["rows"] * n
        final, done, parts = result_paths(run_dir, i)
        row = {"index": i, "total": total, "job_id": None, "attempts": 0, "timeouts": 0,
               "preemptions": 0, "error": None, "log": None, "scheduler": None, "reason": None}
        is_done = False
        if done.exists():
            marker = read_json(done)
            is_done = fp is None or marker.get("fingerprint") == fp
        row["samples"] = total if is_done else (committed_count(parts) if parts.exists() else 0)
        task = tasks.get(i)
        tstate = None
        if task is not None:
            row["job_id"] = task["job_id"]
            row["log"] = task.get("stderr")
            tpath = Path(task["folder"]) / "tasks" / f"{task['job_id']}.json"
            if tpath not in task_files:  # one file per task, however many shards it has
                try:
                    task_files[tpath] = read_json(tpath) if tpath.exists() else None
                except (OSError, ValueError):
                    task_files[tpath] = None
            tstate = task_files[tpath]
            if tstate:
                for k in ("attempts", "timeouts", "preemptions"):
                    row[k] = tstate.get(k, 0)
            rec = view.get(task["job_id"])
            if rec:
                row["scheduler"], row["reason"] = rec["state_text"], rec["reason"]
        row["state"] = _shard_state(is_done, task, tstate, view.get(task["job_id"]) if task else None,
                                    row["samples"])
        if row["state"] == "failed":
            row["error"] = _error_line(task, tstate, view.get(task["job_id"]) if task else None)
        rows.append(row)
    merge_jobs = []
    for sub in subs:
        if sub.get("merge_job"):
            m = sub["merge_job"]
            rec = view.get(m["job_id"])
            merge_jobs.append({**m, "scheduler": rec["state_text"] if rec else None,
                               "reason": rec["reason"] if rec else None})
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    report = {"run_dir": str(run_dir), "fingerprint": fp, "shards": rows, "counts": counts,
              "samples": sum(r["samples"] for r in rows), "total": sum(r["total"] for r in rows),
              "merge_jobs": merge_jobs, "sacct_calls": sacct_calls, "sacct_error": sacct_error,
              "merged": (run_dir / "summary.json").exists(), "submissions": len(subs)}
    return report


def _shard_state(is_done: bool, task: Optional[dict], tstate: Optional[dict], rec: Optional[dict],
                 samples: int) -> str:
    if is_done:
        return "done"
    if task is None:
        return "partial" if samples else "not submitted"
    sched = rec["state"] if rec else None
    if sched in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
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
        lines.append(f"done: shards {_ranges(done)}")
    others = [r for r in report["shards"] if r["state"] != "done"]
    if others:
        lines.append(f"{'shard':>6}  {'state':<13} {'samples':>9}  {'job':<12} {'tries':>5}  note")
        for r in others[:limit]:
            tries = f"{r['attempts']}" + (f" t{r['timeouts']}p{r['preemptions']}"
                                          if r["timeouts"] or r["preemptions"] else "")
            note = r["error"] or (r["reason"] if r["state"] == "pending" and r["reason"] not in
                                  (None, "", "None") else "") or ""
            if r["state"] in ("failed", "running") and r["log"]:
                note = (note + "  " if note else "") + f"log: {r['log']}"
            lines.append(f"{r['index']:>6}  {r['state']:<13} {r['samples']:>4}/{r['total']:<4}  "
                         f"{r['job_id'] or '-':<12} {tries:>5}  {note}")
        if len(others) > limit:
            lines.append(f"... and {len(others) - limit} more")
    for m in report["merge_jobs"]:
        lines.append(f"merge job {m['job_id']}: {m['scheduler'] or 'not in accounting yet'}"
                     + (f" ({m['reason']})" if m.get("reason") not in (None, "", "None") else "")
                     + f"; log: {m['stdout']}")
    if report["merged"]:
        lines.append(f"merged: {Path(report['run_dir']) / 'summary.json'}")
    elif not others:
        lines.append(f"all shards done: rsd-batch merge run.dir={report['run_dir']}")
    elif counts.get("failed") or counts.get("not submitted") or counts.get("partial"):
        lines.append(f"to finish: fix what failed, then `rsd-batch run launcher=slurm "
                     f"run.dir={report['run_dir']}` (only the missing work runs)")
    return "\n".join(lines)


# ---------------------------------------------------------------- dry run


def dry_run(cfg: DictConfig) -> dict:
    """Print what `rsd-batch run` would do, submit and write nothing."""
    from .methods import get_method

    method = get_method(str(cfg.method.name))
    st = _run_state(cfg, claim=False)
    run_dir, manifest, pending = st["run_dir"], st["manifest"], st["pending"]
    name = str(cfg.launcher.name)
    busy: dict[int, str] = {}
    subs = load_submissions(slurm_folder(cfg))
    if subs and shutil.which("sacct"):
        try:
            busy = _busy(subs, sacct(_all_job_ids(subs), since=min(s["submitted_at"] for s in subs)))
        except LaunchError as e:
            print(f"warning: {e}", file=sys.stderr)
    todo = [i for i in sorted(pending) if i not in busy]
    n_shards = len(manifest["shards"])
    samples = sum(pending[i] for i in todo)
    lines = [f"dry run (nothing is submitted or written): launcher={name}, method={method.name}, "
             f"run {run_dir} (fingerprint {st['fp']})",
             f"shards: {len(todo)} to run ({_ranges(todo) or 'none'}), {n_shards - len(pending)} done "
             "(skipped)" + (f", {len(busy)} queued or running in {_job_list(busy.values())} (skipped)"
                            if busy else ""),
             f"samples: {samples} to run (method.n={cfg.method.n}) of "
             f"{sum(s['rows'] for s in manifest['shards']) * cfg.method.n}"]
    estimate = estimate_cost(cfg, method_roles(method, cfg), manifest, todo, samples)
    lines.append(estimate["text"])
    plan: dict[str, Any] = {"run_dir": str(run_dir), "fingerprint": st["fp"], "to_run": todo,
                            "done": n_shards - len(pending), "busy": busy, "samples": samples,
                            "estimate": estimate}
    if name == "slurm":
        per = max(1, int(cfg.launcher.shards_per_task))
        groups = [todo[i:i + per] for i in range(0, len(todo), per)]
        max_size = max_array_size() if sbatch_available() else None
        arrays = split_arrays(groups, max_size, int(cfg.launcher.array_parallelism))
        plan["arrays"] = [{"tasks": len(c), "throttle": t} for c, t in arrays]
        lc = cfg.launcher
        lines.append(
            f"slurm: {len(groups)} tasks ({per} shard{'s' if per > 1 else ''} each) in {len(arrays)} "
            f"array{'s' if len(arrays) != 1 else ''} (MaxArraySize "
            f"{max_size if max_size else 'unknown here: no split assumed'})"
            + "".join(f"; array {k}: {len(c)} tasks, at most {t} at once" for k, (c, t) in enumerate(arrays))
            + f"\n  per task: {lc.gpus_per_task} GPU, {lc.cpus_per_task} CPUs"
            + (f", {lc.mem_gb} GB" if lc.mem_gb else "") + f", {lc.timeout_min} min, warning "
            f"{lc.signal_delay_s} s before the limit; requeues: {lc.max_timeouts} timeouts, "
            f"{lc.max_preemptions} preemptions"
            + ("\n  then the merge as a job after them (afterok)" if lc.merge_after else ""))
        if arrays:
            script = sbatch_script(cfg, len(arrays[0][0]), arrays[0][1], slurm_folder(cfg) / "<submission>")
            plan["sbatch"] = script
            lines.append("sbatch script of the first array, as submitit would submit it:\n" + script)
    print("\n".join(lines))
    return {"plan": plan}


def sbatch_script(cfg: DictConfig, n_tasks: int, throttle: int, folder: Path) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    params = sbatch_parameters(cfg, f"rsd-{Path(cfg.run.dir).resolve().name}")
    params["array_parallelism"] = throttle
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                        shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder,
                               map_count=n_tasks if n_tasks > 1 else None, **params)


def estimate_cost(cfg: DictConfig, roles: Iterable[str], manifest: dict, todo: list[int],
                  samples: int) -> dict:
    """Tokens and FLOPs per role for the samples to run: from a pilot's summary.json (means per
    sample) when launcher.pilot names one, else an upper bound from method.max_new_tokens with the
    prompts' real token counts (a sample of them) and the models' sizes from their configs."""
    roles = list(roles)
    pilot = cfg.launcher.pilot
    if pilot:
        path = Path(pilot)
        path = path / "summary.json" if path.is_dir() else path
        if not path.exists():
            raise LaunchError(f"launcher.pilot={pilot!r}: no summary.json there; merge the pilot run "
                              "first (rsd-batch main dataset.limit=... run.dir=<pilot>).")
        summary = read_json(path)
        per_role = {}
        for role in roles:
            mean = summary["roles"][role]["mean"]
            per_role[role] = {k: mean[k] * samples for k in
                              ("prefill_tokens", "decode_tokens", "generated_tokens", "flops", "seconds")}
        note = (f"estimated cost from the pilot {path} ({summary['samples']} samples, method "
                f"{summary.get('method')}) × {samples} samples")
        if summary.get("method") != str(cfg.method.name):
            note += f" — warning: the pilot ran {summary.get('method')}, not {cfg.method.name}"
        source = "pilot"
    else:
        per_role = _estimate_from_max_tokens(cfg, roles, manifest, todo, samples)
        note = (f"estimated cost (no launcher.pilot): upper bound, every sample generating "
                f"method.max_new_tokens={cfg.method.max_new_tokens} tokens after its prompt, once "
                "per model (methods that write several candidates cost more: a pilot measures it)")
        source = "max_new_tokens"
    rows = [note, f"  {'role':<7} {'prefill tok':>14} {'decode tok':>14} {'FLOPs':>12}"
            + (f" {'seconds':>10}" if source == "pilot" else "")]
    for role, d in per_role.items():
        rows.append(f"  {role:<7} {d['prefill_tokens']:>14,.0f} {d['decode_tokens']:>14,.0f} "
                    f"{d['flops']:>12.3e}" + (f" {d['seconds']:>10.1f}" if source == "pilot" else ""))
    total = sum(d["flops"] for d in per_role.values())
    rows.append(f"  {'all':<7} {'':>14} {'':>14} {total:>12.3e}")
    return {"source": source, "roles": per_role, "flops": total, "text": "\n".join(rows)}


def _estimate_from_max_tokens(cfg, roles, manifest, todo, samples, sample_size: int = 256) -> dict:
    from transformers import AutoConfig

    from .ledger import CostModel
    from .models import ModelLoadError, load_tokenizer, render_prompt
    from .runner import shards_dir
    from .shards import read_shard

    problems: list[str] = []
    for i in todo:
        if len(problems) >= sample_size:
            break
        problems += read_shard(shards_dir(cfg), manifest, i, verify=False)["problem"].to_pylist()
    problems = problems[:sample_size]
    max_new = int(cfg.method.max_new_tokens)
    out = {}
    for role in roles:
        node, key = (cfg.prm, "prm.path") if role == "prm" else (cfg.model[role], f"model.{role}.path")
        tok = load_tokenizer(node, key)
        try:
            mcfg = AutoConfig.from_pretrained(node.path, revision=node.revision,
                                              trust_remote_code=node.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{key}={node.path!r}: its config could not be read ({e}).") from None
        cost = CostModel.from_config(mcfg)
        lens = [len(tok(render_prompt(tok, p, cfg.prompt), add_special_tokens=False)["input_ids"])
                for p in problems] or [0]
        prompt = sum(lens) / len(lens)
        p = int(round(prompt))
        per_sample_flops = cost.forward_flops(p, 0, 1) + cost.forward_flops(max_new, p, max_new)
        out[role] = {"prefill_tokens": prompt * samples, "decode_tokens": max_new * samples,
                     "generated_tokens": max_new * samples, "flops": per_sample_flops * samples,
                     "seconds": 0.0}
    return out
