"""Evaluate a checkpoint: generate answers for held-out (or all) samples, score them, write a report.

    python evaluate.py checkpoint=outputs/demo/final_model dataset=[sample] eval.split=all
    python evaluate.py checkpoint=outputs/run/final_model dataset=[docling_matix]         # its validation split
    python evaluate.py checkpoint=outputs/run/final_model compare_to=ibm-granite/granite-docling-258M ...
    python evaluate.py eval.predictions=outputs/.../predictions.jsonl                     # re-score, no model
    torchrun --nproc_per_node=4 evaluate.py checkpoint=...   |   accelerate launch ...   |   srun python ...

Each run writes into its own folder under outputs/ (predictions.jsonl, metrics.json, report.md, metrics.png,
report.html, pages/); the last lines printed say where. conf/evaluate.yaml lists every option.
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from granite_docling.errors import exit_on_user_error, user_errors
from granite_docling.evaluation.config import register_eval_configs, validate_eval
from granite_docling.launch import register_resolvers
from granite_docling.preflight import check_eval_paths
from granite_docling.slurm import apply_slurm_environment

register_eval_configs()
register_resolvers()


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    apply_slurm_environment()  # the tasks of an srun step (or a submitit job) become one process group

    config = OmegaConf.to_object(cfg)
    validate_eval(config)
    check_eval_paths(config)  # before the runner's imports, the data and the model

    from granite_docling.evaluation.runner import evaluate

    result = evaluate(config, run_dir=HydraConfig.get().runtime.output_dir)
    if result is not None:
        print(result.summary())


if __name__ == "__main__":
    with user_errors():  # a mistake: one "error: ..." line, exit code 2 (HYDRA_FULL_ERROR=1: the traceback)
        main()
