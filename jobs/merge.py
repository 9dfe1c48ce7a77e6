"""`rsd-batch merge`: check coverage and merge a run into one dataset with a summary."""
import hydra

from rsd_batch import app, config  # noqa: F401  (config registers the schema)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg):
    app.merge(cfg)


if __name__ == "__main__":
    main()
