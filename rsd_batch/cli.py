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
    "doctor": "verify every file of a run folder; say (or, with repair=true, do) what repairs it",
    "report": "one table + accuracy-vs-FLOPs plot for every run folder under a sweep folder",
    "calibrate": "bisect the RSD threshold δ on a pilot to meet a FLOPs budget or acceptance rate",
    "export": "a merged run as a Hugging Face dataset (SFT messages or step-labelled PRM data)",
    "train-toy": "retrain the embedded toy world (tokenizer, draft, target, PRM)",
}
# `rsd-batch report runs/sweep` reads better than `dir=runs/sweep`: a leading path is that key.
POSITIONAL = {"report": "dir", "export": "run_dir", "doctor": "run_dir"}


def read_only_job() -> None:
    """For jobs that only read a run (status) or write their own files (report, export): no Hydra
    output folder, log file or .hydra copy in the working directory or the run folder."""
    for arg in ("hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
                "hydra.run.dir=."):
        if not any(a.split("=")[0] == arg.split("=")[0] for a in sys.argv[1:]):
            sys.argv.append(arg)


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
    args = sys.argv[2:]
    if job in POSITIONAL:
        key = POSITIONAL[job]
        if args and "=" not in args[0] and not args[0].startswith("-"):
            args[0] = f"{key}={args[0]}"
        elif not any(a.startswith(f"{key}=") or a.startswith("-") for a in args):
            print(f"usage: rsd-batch {job} <{'sweep folder' if job == 'report' else 'run folder'}> "
                  f"[key=value ...]   ({JOBS[job]}; `rsd-batch {job} --cfg job` lists the keys)",
                  file=sys.stderr)
            sys.exit(2)
    sys.argv = [str(path)] + args
    runpy.run_path(str(path), run_name="__main__")
