"""The shards run in this process: `launcher=local` (SIGTERM stops it after the batch in flight is
committed; shards a SLURM job of the run holds are left to it) and `launcher=debug` (no signal
handling around it: for pdb and tracebacks)."""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Optional

from omegaconf import DictConfig

from .. import rundir
from ..shards import read_manifest
from .stopping import Stop
from .view import SchedulerView, job_list

log = logging.getLogger(__name__)


def run_local(cfg: DictConfig) -> dict:
    """Every pending shard in this process. SIGTERM stops it after the batch in flight is committed."""
    from ..runner import run as run_shards

    busy = SchedulerView.of(cfg).busy(strict=False)
    indices = None
    if busy:
        n = len(read_manifest(rundir.shards_dir(cfg))["shards"])
        indices = [i for i in range(n) if i not in busy]
        print(f"{len(busy)} shards are queued or running in SLURM jobs of this run "
              f"({job_list(busy.values())}); they are left to them.")
    set_threads(cfg.run.threads)
    with Stop() as stop:
        report = run_shards(cfg, shard_indices=indices, should_stop=stop)
    if not report["complete"]:
        print(f"stopped by {stop.signals[0] if stop.signals else 'a stop request'} after the last "
              f"committed batch; run the same command again to resume.", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    return report


def run_debug(cfg: DictConfig) -> dict:
    """In this process, over every pending shard, with nothing around it."""
    from ..runner import run as run_shards

    return run_shards(cfg)


def set_threads(threads: Optional[int]) -> int:
    """torch's thread count: `run.threads`, else the cores this process may run on. On a shared
    2-core machine, two threads made 60 decode steps take 46-74 s against 1.7-4.2 s with one."""
    import torch

    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    log.info("torch threads: %d (%s)", n, "run.threads" if threads else "the cores this process may use")
    return n
