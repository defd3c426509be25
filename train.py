"""Fine-tune granite-docling on your documents.

    python train.py                                                   # the default experiment (conf/config.yaml)
    python train.py experiment=demo                                   # tiny model, sample data, CPU
    python train.py dataset=[docling_matix,synth_formula] training.lr_connector=1e-3
    python train.py -m experiment=demo training.lr_connector=1e-4,1e-3   # a sweep
    python train.py --config conf/legacy/granite_docling_test.py [--resume CKPT] [overrides...]
    torchrun --nproc_per_node=4 train.py ...   |   accelerate launch train.py ...

Each run writes into its own folder under outputs/ (resolved config in .hydra/, checkpoints, metrics).
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from granite_docling.config import ConfigError, register_configs, validate
from granite_docling.launch import register_resolvers, translate_legacy_argv

register_configs()
register_resolvers()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from granite_docling.train_loop import train

    config = OmegaConf.to_object(cfg)
    validate(config)
    exit_code = train(config, run_dir=HydraConfig.get().runtime.output_dir)
    if exit_code:  # 75: interrupted after writing a checkpoint; 1: stopped on an error (see the log)
        sys.exit(exit_code)


if __name__ == "__main__":
    try:
        sys.argv[1:] = translate_legacy_argv(sys.argv[1:])
        main()
    except ConfigError as error:
        sys.exit(f"error: {error}")
