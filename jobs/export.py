"""`rsd-batch export <run dir> layout=sft|prm [filters]`: a merged run as a Hugging Face dataset."""
import hydra

from rsd_batch import app, config  # noqa: F401  (config registers the schema)
from rsd_batch.cli import read_only_job

read_only_job()


@hydra.main(version_base=None, config_path="../conf", config_name="export")
def main(cfg):
    app.export(cfg)


if __name__ == "__main__":
    main()
