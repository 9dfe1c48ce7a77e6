"""Submitting a run to SLURM: the unfinished shards as job arrays (submitit), and the merge as a job
after them; the checks that run before anything is submitted; the sbatch parameters.

    <scheduler folder>/<time>-<id>/submission.json   what was submitted: arrays, tasks -> shards, merge job
    <scheduler folder>/<time>-<id>/12_submission.sh  the sbatch script of array 12
    <scheduler folder>/<time>-<id>/12_3_0_log.out    the logs of task 3 of array 12 (and .err)
"""
from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import DictConfig

from .. import rundir
from ..config import to_container
from ..files import write_json
from ..shards import read_manifest
from .scheduler import LaunchError, max_array_size, sbatch_available
from .task import MergeTask, ShardTask
from .view import SUBMISSION_FILE, SchedulerView, job_list, ranges


@dataclass
class RunState:
    """What the run folder says before a launch: its manifest, method, fingerprint, work left."""
    run_dir: Path
    manifest: dict
    method: Any
    fp: str
    pending: dict[int, int]  # shard -> samples left


def run_state(cfg: DictConfig, claim: bool) -> RunState:
    """The run folder's state; claim=True records run.json (a submission claims the folder for its tasks)."""
    from ..methods import get_method
    from ..runner import run_identity, shard_ids

    run, shards_root = rundir.run_dir(cfg), rundir.shards_dir(cfg)
    manifest = read_manifest(shards_root)
    method = get_method(str(cfg.method.name))
    identity = run_identity(cfg, manifest, method)
    if claim:
        fp, unrecorded = rundir.claim(run, cfg, identity)
        if unrecorded:
            rundir.record(run, cfg, identity, fp)
    else:
        fp, fresh = rundir.check(run, cfg, identity)
        if fresh:  # run.fresh: everything would run again
            return RunState(run, manifest, method, fp,
                            {i: s["rows"] * cfg.method.n for i, s in enumerate(manifest["shards"])})
    pending = rundir.pending_work(run, manifest, fp, cfg.method.n, shard_ids(shards_root, manifest))
    return RunState(run, manifest, method, fp, pending)


def method_roles(method, cfg: DictConfig) -> tuple[str, ...]:  # noqa: ANN001
    """The models a method needs (a tuple, or a function of the method config)."""
    roles = method.roles
    return tuple(roles(cfg.method) if callable(roles) else roles)


def task_config(cfg: DictConfig, folder: Path) -> dict:
    """The resolved config a task gets: absolute paths (a job starts elsewhere), no progress bars."""
    c = to_container(cfg)
    c["run"]["dir"] = str(rundir.run_dir(cfg))
    if c["run"].get("shards_from"):
        c["run"]["shards_from"] = str(rundir.shards_dir(cfg))
    c["launcher"]["folder"] = str(folder)
    c["run"]["progress"] = False
    c["run"]["dry_run"] = False
    for role in ("draft", "target"):
        c["model"][role]["path"] = _abs_if_local(c["model"][role]["path"])
    c["prm"]["path"] = _abs_if_local(c["prm"]["path"])
    return c


def _abs_if_local(path: Optional[str]) -> Optional[str]:
    if path and (path.startswith((".", "/", "~")) or Path(path).exists()):
        return str(Path(path).expanduser().resolve())
    return path


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


def task_groups(cfg: DictConfig, todo: list[int]) -> list[list[int]]:
    per = max(1, int(cfg.launcher.shards_per_task))
    return [todo[i:i + per] for i in range(0, len(todo), per)]


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


def check_models(cfg: DictConfig, roles: Iterable[str]) -> None:
    """Fail before submitting when a local model folder is missing (every task would fail on it)."""
    from ..models import ModelLoadError

    for role in roles:
        node, key = (cfg.prm, "prm.path") if role == "prm" else (cfg.model[role], f"model.{role}.path")
        path = str(node.path)
        if path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
            raise ModelLoadError(f"{key}={path!r} does not exist (checked before submitting, so no "
                                 "task starts only to fail). Give a folder written by save_pretrained "
                                 "that the compute nodes can read, or a hub id.")


def check_placement(cfg: DictConfig, roles: Iterable[str]) -> None:
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


def _new_submission(cfg: DictConfig, folder: Path, st: RunState) -> tuple[Path, dict]:
    sub_dir = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    sub_dir.mkdir(parents=True, exist_ok=True)
    record = {"submitted_at": time.time(), "run_dir": str(st.run_dir), "fingerprint": st.fp, "arrays": [],
              "merge_job": None, "launcher": to_container(cfg.launcher)}
    write_json(sub_dir / SUBMISSION_FILE, record)
    return sub_dir, record


def submit(cfg: DictConfig) -> dict:
    """Submit the unfinished shards as job arrays and return at once (ids and paths are printed)."""
    from ..methods import get_method

    roles = method_roles(get_method(str(cfg.method.name)), cfg)
    check_models(cfg, roles)  # config errors first: they need no cluster
    check_placement(cfg, roles)
    if not sbatch_available():
        raise LaunchError("launcher=slurm needs sbatch on PATH: run this on a SLURM login node "
                          "(with SLURM_CONF set if the cluster needs it), or use launcher=local.")
    st = run_state(cfg, claim=True)
    view = SchedulerView.of(cfg)
    busy = view.busy(strict=True)
    todo = [i for i in sorted(st.pending) if i not in busy]
    groups = task_groups(cfg, todo)
    n_shards = len(st.manifest["shards"])
    report: dict[str, Any] = {"run_dir": str(st.run_dir), "fingerprint": st.fp, "shards": n_shards,
                              "skipped": n_shards - len(st.pending), "busy": busy, "arrays": [],
                              "submitted": [], "merge_job": None}
    if not groups and not cfg.launcher.merge_after:
        print(f"nothing to submit: {n_shards - len(st.pending)} of {n_shards} shards are done"
              + (f", {len(busy)} are queued or running ({job_list(busy.values())})" if busy else "")
              + f". `rsd-batch status run.dir={st.run_dir}` shows them"
              + ("." if busy else f"; `rsd-batch merge run.dir={st.run_dir}` merges the run."))
        return report
    sub_dir, record = _new_submission(cfg, view.folder, st)
    write_json(st.run_dir / rundir.POINTER_FILE, {"folder": str(view.folder)})
    _submit_arrays(cfg, groups, sub_dir, record, st, view.folder)
    if cfg.launcher.merge_after:
        deps = [a["job_id"] for a in record["arrays"]] + sorted({j.split("_")[0] for j in busy.values()})
        record["merge_job"] = _submit_merge_job(cfg, sub_dir, st.run_dir, deps)
        write_json(sub_dir / SUBMISSION_FILE, record)
    report.update(arrays=record["arrays"], submitted=todo, merge_job=record["merge_job"], folder=str(sub_dir))
    _print_submission(report, record, st.pending, busy, sub_dir)
    return report


def _submit_arrays(cfg: DictConfig, groups: list[list[int]], sub_dir: Path, record: dict, st: RunState,
                   folder: Path) -> None:
    """One submitit array per chunk of tasks, each recorded in submission.json as soon as it exists."""
    import submitit

    limits = {k: int(cfg.launcher[k]) for k in ("max_timeouts", "max_preemptions", "signal_delay_s", "timeout_min")}
    task = ShardTask(task_config(cfg, folder), str(sub_dir), limits)
    arrays = split_arrays(groups, max_array_size(), int(cfg.launcher.array_parallelism))
    if len(arrays) > 10:
        print(f"warning: {len(groups)} tasks need {len(arrays)} arrays; consider launcher.shards_per_task="
              f"{max(1, int(cfg.launcher.shards_per_task)) * 4} (fewer, longer tasks).", file=sys.stderr)
    for chunk, throttle in arrays:
        ex = submitit.SlurmExecutor(folder=sub_dir, max_num_timeout=limits["max_timeouts"]
                                    + limits["max_preemptions"] + 1)
        params = sbatch_parameters(cfg, f"rsd-{st.run_dir.name}")
        params["array_parallelism"] = throttle
        ex.update_parameters(**params)
        jobs = ex.map_array(task, chunk)
        tasks = [{"job_id": j.job_id, "shards": g, "stdout": str(j.paths.stdout),
                  "stderr": str(j.paths.stderr)} for j, g in zip(jobs, chunk)]
        record["arrays"].append({"job_id": jobs[0].job_id.split("_")[0], "throttle": throttle, "tasks": tasks,
                                 "sbatch": str(jobs[0].paths.submission_file)})
        write_json(sub_dir / SUBMISSION_FILE, record)


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
    st = run_state(cfg, claim=False)
    view = SchedulerView.of(cfg)
    busy = view.busy(strict=True)
    missing = [i for i in st.pending if i not in busy]
    if missing:
        raise LaunchError(f"{st.run_dir}: shards {ranges(missing)} are not done and no job of this run "
                          f"is queued to finish them; submit them first (rsd-batch run "
                          f"launcher=slurm run.dir={st.run_dir} launcher.merge_after=true).")
    sub_dir, record = _new_submission(cfg, view.folder, st)
    deps = sorted({j.split("_")[0] for j in busy.values()}, key=int)
    record["merge_job"] = m = _submit_merge_job(cfg, sub_dir, st.run_dir, deps)
    write_json(sub_dir / SUBMISSION_FILE, record)
    print(f"submitted the merge of {st.run_dir} as job {m['job_id']}"
          + (f", after {', '.join(deps)} succeed (afterok)" if deps else "")
          + f"\n  log: {m['stdout']}\n  watch: rsd-batch status run.dir={st.run_dir}")
    return record


def _print_submission(report: dict, record: dict, pending: dict, busy: dict, sub_dir: Path) -> None:
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
                 + (f", {len(busy)} queued or running in {job_list(busy.values())}" if busy else ""))
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
