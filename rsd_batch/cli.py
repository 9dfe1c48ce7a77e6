"""`rsd-batch <job> [hydra overrides]`: runs jobs/<job>.py, the thin Hydra entry points."""
from __future__ import annotations

import runpy
import sys

from .config import ROOT

JOBS = {
    "shard": "read a problem set, write Arrow shards and a manifest",
    "run": "run a method over the pending shards of a run folder",
    "merge": "check coverage, merge a run into one dataset, print its summary",
    "main": "shard -> run -> merge in one go (the README's demo)",
    "status": "per-shard state of a run folder (and of its SLURM jobs)",
    "train-toy": "retrain the embedded toy world (tokenizer, draft, target, PRM)",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") or sys.argv[1] not in JOBS:
        width = max(map(len, JOBS))
        print("usage: rsd-batch <job> [key=value ...] [--cfg job] [-m]\n\njobs:")
        for name, what in JOBS.items():
            print(f"  {name:<{width}}  {what}")
        print("\nEvery config key can be overridden, e.g. `rsd-batch main dataset=math500 "
              "method=draft_only run.batch_size=8`;\n`rsd-batch <job> --help` lists the config groups.")
        sys.exit(0 if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help") else 2)
    job = sys.argv[1]
    path = ROOT / "jobs" / f"{job.replace('-', '_')}.py"
    if not path.exists():
        sys.exit(f"error: {path} is missing; rsd_batch must be installed from its checkout "
                 "(pip install -e .), since jobs/ and conf/ live there.")
    sys.argv = [str(path)] + sys.argv[2:]
    runpy.run_path(str(path), run_name="__main__")
