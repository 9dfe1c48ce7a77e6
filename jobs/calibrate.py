"""`rsd-batch calibrate calibrate.goal=flops calibrate.flops_ratio=0.5`: the δ to use, from pilot runs."""
import hydra

from rsd_batch import app, config  # noqa: F401  (config registers the schema)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg):
    app.calibrate(cfg)


if __name__ == "__main__":
    main()
