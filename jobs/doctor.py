"""`rsd-batch doctor <run dir> [repair=true]`: verify every file of a run folder and say how to repair it."""
import hydra

from rsd_batch import app, config  # noqa: F401  (config registers the schema)
from rsd_batch.cli import read_only_job

read_only_job()


@hydra.main(version_base=None, config_path="../conf", config_name="doctor")
def main(cfg):
    app.doctor(cfg)


if __name__ == "__main__":
    main()
