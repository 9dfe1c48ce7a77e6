"""Where a run's shards run: in this process (`launcher=local`, `launcher=debug`) or as SLURM job
arrays through submitit (`launcher=slurm`); the run's status; the dry-run plan.

    local.py      launcher=local and launcher=debug
    scheduler.py  SLURM's command-line tools, wrapped and parsed
    view.py       the run's submissions and ONE batched view of their jobs' states
    submit.py     launcher=slurm: arrays, the merge job, sbatch parameters, pre-submit checks
    task.py       inside a SLURM task: its state record, checkpoint and requeue
    stopping.py   stop after the batch in flight, on a signal (every launcher)
    status.py     rsd-batch status
    plan.py       run.dry_run: the plan and its cost

A new launcher is one more module here and one more branch in `launch`. Knows nothing about
decoding: the runner does that.
"""
from __future__ import annotations

from omegaconf import DictConfig

from .task import MergeTask, ShardTask  # noqa: F401 - submission folders pickle them under this name too


def launch(cfg: DictConfig) -> dict:
    """`rsd-batch run`: the plan (run.dry_run), or the shards run here (local, debug) or submitted."""
    if cfg.run.dry_run:
        from .plan import dry_run
        return dry_run(cfg)
    name = str(cfg.launcher.name)
    if name == "slurm":
        from .submit import submit
        return submit(cfg)
    from .local import run_debug, run_local
    return run_debug(cfg) if name == "debug" else run_local(cfg)
