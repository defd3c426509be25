"""Evaluate a checkpoint: generate answers for held-out (or all) samples, score them, write a report.

    python evaluate.py checkpoint=outputs/demo/final_model dataset=[sample] eval.split=all
    python evaluate.py checkpoint=outputs/run/final_model dataset=[docling_matix]         # its validation split
    python evaluate.py checkpoint=outputs/run/final_model compare_to=ibm-granite/granite-docling-258M ...
    python evaluate.py eval.predictions=outputs/.../predictions.jsonl                     # re-score, no model
    torchrun --nproc_per_node=4 evaluate.py checkpoint=...   |   accelerate launch evaluate.py ...

Each run writes into its own folder under outputs/ (predictions.jsonl, metrics.json, report.md, metrics.png,
samples.html, pages/); the last lines printed say where. conf/evaluate.yaml lists every option.
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from granite_docling.config import ConfigError
from granite_docling.evaluation.config import register_eval_configs, validate_eval
from granite_docling.launch import register_resolvers

register_eval_configs()
register_resolvers()


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from granite_docling.evaluation.runner import evaluate

    config = OmegaConf.to_object(cfg)
    validate_eval(config)
    result = evaluate(config, run_dir=HydraConfig.get().runtime.output_dir)
    if result is not None:
        print(result.summary())


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:
        sys.exit(f"error: {error}")
