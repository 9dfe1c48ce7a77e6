"""What each job does, from a resolved config: the bodies behind the thin entry points in jobs/.

Errors a user can fix (bad input, a mixed-config resume, an incomplete merge, a model that will not
load) end the job with one clear message and exit status 2, not a stack trace.
"""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from . import rundir
from .errors import UserError


log = logging.getLogger("rsd_batch")


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(cfg: DictConfig):
        try:
            return fn(cfg)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


@user_errors
def shard(cfg: DictConfig) -> dict:
    from .config import check_settings
    from .shards import write_shards

    check_settings(cfg)
    run = rundir.run_dir(cfg)
    manifest = write_shards(cfg.dataset, run, fresh=cfg.run.fresh)
    print(f"sharded {manifest['num_rows']} problems of {cfg.dataset.name} into "
          f"{len(manifest['shards'])} shards: {run / rundir.MANIFEST}")
    if manifest.get("quarantine"):
        q = manifest["quarantine"]
        print(f"warning: {q['rows']} bad rows were quarantined to {run / q['path']}",
              file=sys.stderr)
    return manifest


@user_errors
def run(cfg: DictConfig) -> dict:
    from .config import check_settings
    from .launch import launch

    check_settings(cfg)
    # launcher=local/debug: runs here; slurm: submits the arrays and returns; run.dry_run: the plan.
    report = launch(cfg)
    if "ran" in report:
        print(f"{len(report['ran'])} shards run, {report['skipped']} already done; "
              f"results in {rundir.run_dir(cfg) / rundir.RESULTS}")
    return report


@user_errors
def status(cfg: DictConfig) -> dict:
    from .launch.status import format_status, status as run_status

    report = run_status(cfg)
    print(format_status(report))
    return report


@user_errors
def doctor(cfg: DictConfig) -> dict:
    from .doctor import examine, format_findings

    report = examine(Path(cfg.run_dir), repair=cfg.repair)
    print(format_findings(report))
    if report["findings"] and not cfg.repair:
        sys.exit(1)
    return report


@user_errors
def merge(cfg: DictConfig) -> dict:
    from .merge import format_summary, merge_run

    if str(cfg.launcher.name) == "slurm" and cfg.launcher.merge_after:
        from .launch.submit import submit_merge
        return submit_merge(cfg)  # a job that runs after the run's queued tasks succeed
    summary = merge_run(rundir.run_dir(cfg))
    print(format_summary(summary))
    print(f"merged dataset: {summary['dataset']}\nsummary: {rundir.run_dir(cfg) / rundir.SUMMARY_FILE}")
    return summary


@user_errors
def report(cfg: DictConfig) -> dict:
    from .report import build_report, format_markdown

    rep = build_report(Path(cfg.dir), Path(cfg.out) if cfg.out else None, cfg.by)
    print(format_markdown(rep))
    print("\n".join(f"{k}: {v}" for k, v in rep["files"].items()))
    return rep


@user_errors
def calibrate(cfg: DictConfig) -> dict:
    from .calibrate import calibrate as run_calibration, format_calibration
    from .config import check_settings

    check_settings(cfg)
    result = run_calibration(cfg)
    print(format_calibration(result))
    return result


@user_errors
def export(cfg: DictConfig) -> dict:
    from .export import export_run

    rep = export_run(cfg)
    print(f"exported {rep['rows']} of {rep['kept_after_each_filter']['merged samples']} samples "
          f"({cfg.layout} layout) from {rep['source_run']}")
    for name, left in rep["kept_after_each_filter"].items():
        print(f"  {name:<40} {left:>8}")
    print(f"dataset: {rep['path']}\nload it with datasets.load_dataset({str(Path(rep['path']).parents[1])!r})")
    return rep


@user_errors
def main(cfg: DictConfig) -> dict:
    """shard -> run -> merge in one go (each step skips what is already done)."""
    from .config import check_settings

    check_settings(cfg)  # before the shards are written
    shard(cfg)
    if str(cfg.launcher.name) == "slurm" and not cfg.run.dry_run:
        # Submitting does not wait: the merge becomes a job that runs after the tasks (afterok).
        cfg.launcher.merge_after = True
        return run(cfg)
    report = run(cfg)
    if cfg.run.dry_run:
        return report
    return merge(cfg)
