"""`rsd-batch report <sweep folder>`: report.md, report.json and frontier.png for every run under it."""
import hydra

from rsd_batch import app, config  # noqa: F401  (config registers the schema)
from rsd_batch.cli import read_only_job

read_only_job()


@hydra.main(version_base=None, config_path="../conf", config_name="report")
def main(cfg):
    app.report(cfg)


if __name__ == "__main__":
    main()
