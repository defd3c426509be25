"""Fine-tune granite-docling on your documents.

    python train.py                                                   # the default experiment (conf/config.yaml)
    python train.py experiment=demo                                   # tiny model, sample data, CPU
    python train.py dataset=[docling_matix,synth_formula] training.lr_connector=1e-3
    python train.py -m experiment=demo training.lr_connector=1e-4,1e-3   # a sweep
    python train.py --config conf/legacy/granite_docling_test.py [--resume CKPT] [overrides...]
    python train.py -m hydra/sweeper=optuna 'training.lr_connector=interval(1e-4,1e-2)' ...   # optimises the objective
    torchrun --nproc_per_node=4 train.py ...   |   accelerate launch train.py ...   |   srun python train.py ...

Each run writes into its own folder under outputs/ (resolved config in .hydra/, checkpoints, metrics).
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from granite_docling.config import register_configs
from granite_docling.errors import exit_on_user_error, user_errors
from granite_docling.launch import register_resolvers
from granite_docling.legacy_config import translate_legacy_argv
from granite_docling.preflight import check_config, check_paths
from granite_docling.slurm import apply_slurm_environment

register_configs()
register_resolvers()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    """Train; returns ``training.objective`` (the final validation loss by default) for Hydra's sweepers."""
    from hydra.core.hydra_config import HydraConfig

    apply_slurm_environment()  # the tasks of an srun step (or a submitit job) become one process group
    from hydra.types import RunMode

    config = OmegaConf.to_object(cfg)
    check_config(config)
    check_paths(config)  # before the imports of torch & co., the model and the data

    from granite_docling.tracking import objective
    from granite_docling.train_loop import train

    hydra_config = HydraConfig.get()
    result = train(config, run_dir=hydra_config.runtime.output_dir)
    if result.exit_code == 1 and hydra_config.mode == RunMode.MULTIRUN:  # a failed trial; the sweep goes on
        raise RuntimeError(f"training stopped on an error, see {hydra_config.runtime.output_dir}/train.log")
    if result.exit_code:  # 75: interrupted after writing a checkpoint (a sweep stops too); 1: an error (see the log)
        sys.exit(result.exit_code)
    return objective(result.latest, config.training.objective)


if __name__ == "__main__":
    with user_errors():  # a mistake: one "error: ..." line, exit code 2 (HYDRA_FULL_ERROR=1: the traceback)
        sys.argv[1:] = translate_legacy_argv(sys.argv[1:])
        main()
