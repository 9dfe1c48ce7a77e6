"""`rsd-batch status`: per-shard state of a run folder, and of its SLURM jobs (one sacct call)."""
import hydra

from rsd_batch import app, config  # noqa: F401  (config registers the schema)
from rsd_batch.cli import read_only_job

read_only_job()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg):
    app.status(cfg)


if __name__ == "__main__":
    main()
