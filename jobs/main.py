"""`rsd-batch main`: shard -> run -> merge in one go."""
import hydra

from rsd_batch import app, config  # noqa: F401  (config registers the schema)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg):
    app.main(cfg)


if __name__ == "__main__":
    main()
