"""Regenerate the embedded toy world (tokenizer, held-out problems, draft, target, Math-Shepherd PRM).

    python jobs/train_toy.py                         # everything, from seeds (the target beside draft + PRM: 44 min here, the shipped folders)
    python jobs/train_toy.py stages=[eval]           # re-measure the shipped folders, print the table
    python jobs/train_toy.py draft.steps=4000 out_dir=/tmp/toy data_dir=/tmp/toy_data

Every field of rsd_batch.toy.train.ToyTrainConfig can be overridden on the command line.
"""
import hydra
from omegaconf import OmegaConf

from rsd_batch.toy.train import ToyTrainConfig, register_configs, run

register_configs()


@hydra.main(version_base=None, config_path=None, config_name="train_toy")
def main(cfg: ToyTrainConfig) -> None:
    run(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
