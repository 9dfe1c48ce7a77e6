"""`rsd-batch status`: per-shard state of a run folder, and of its SLURM jobs (one sacct call)."""
import sys

import hydra

from rsd_batch import app, config  # noqa: F401  (config registers the schema)

# Reading state writes nothing: no Hydra output folder or log file in the run folder for a status.
for _arg in ("hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
             "hydra.run.dir=."):
    if not any(a.split("=")[0] == _arg.split("=")[0] for a in sys.argv[1:]):
        sys.argv.append(_arg)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg):
    app.status(cfg)


if __name__ == "__main__":
    main()
