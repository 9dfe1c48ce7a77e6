"""`rsd-batch run`: run a method over every pending shard of a run folder."""
import hydra

from rsd_batch import app, config  # noqa: F401  (config registers the schema)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg):
    app.run(cfg)


if __name__ == "__main__":
    main()
