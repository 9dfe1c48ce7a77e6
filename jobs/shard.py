"""`rsd-batch shard`: read a problem set and write Arrow shards and a manifest."""
import hydra

from rsd_batch import app, config  # noqa: F401  (config registers the schema)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg):
    app.shard(cfg)


if __name__ == "__main__":
    main()
