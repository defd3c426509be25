"""Pre-flight: the paths a config names are checked before anything is loaded, with one line per problem.

``train.py`` calls :func:`check_config` and :func:`check_paths`, ``evaluate.py`` :func:`check_eval_paths` after
validating the config and before importing torch, the model or the data: a mistyped folder fails in a second, not
after the model has loaded. Apart from ``validate``, so that configs naming other machines' paths still compose
and validate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from granite_docling.checkpoint_manifest import (
    is_pickled_checkpoint,
    is_training_checkpoint,
    model_folder_problem,
    pickled_state_message,
)
from granite_docling.config import Config, DatasetConfig, config_problems, raise_problems
from granite_docling.data.formats import AUTO, FORMATS, detect_format, format_problems
from granite_docling.data.formats.base import DatasetNotFoundError
from granite_docling.data.formats.hub import is_hub_id
from granite_docling.evaluation.config import EvaluateConfig, needs_data


def dataset_path_problems(datasets: Dict[str, DatasetConfig]) -> list[str]:
    """What is wrong with the local paths of ``datasets``: missing, not a dataset in a known format, or not usable
    as its format says (its ``layout_problem``: a Docling folder without the split...). Hub ids are left to the
    download."""
    problems = []
    for key, source in datasets.items():
        if not source.path:
            continue  # validate says so
        given = f"dataset.{key}.path={source.path}"
        path = Path(source.path)
        hint = f"pass dataset.{key}.path=<folder of anns/ JSON + images, or parquet files> or a hub id such as org/name"
        if not path.exists():
            if not is_hub_id(source.path):
                problems.append(f"{given}: no such file or folder; {hint}")
            continue
        try:
            layout = detect_format(path) if source.format == AUTO else source.format
        except DatasetNotFoundError:
            problems.append(f"{given} holds no dataset (no anns/<split>/*.json, no parquet or Arrow files); {hint}")
            continue
        if layout in FORMATS and (problem := FORMATS[layout].layout_problem(path, source.split)) is not None:
            what, splits = problem
            fix = f"set dataset.{key}.split to one of {', '.join(splits)}" if splits else hint
            problems.append(f"{given} {what}; {fix}")
    return problems


def check_config(cfg: Config) -> None:
    """:func:`~granite_docling.config.validate` with the dataset formats' own checks (which the data side knows:
    :func:`~granite_docling.data.formats.format_problems`), every problem in one error; train.py calls it."""
    raise_problems(config_problems(cfg) + format_problems(cfg.dataset))


def check_paths(cfg: Config) -> None:
    """Check the paths the config names, before anything is loaded: every local dataset path, model.checkpoint
    and training.resume must exist and hold what they should. Apart from :func:`validate`, so that configs
    naming other machines' paths still compose and validate."""
    problems = dataset_path_problems(cfg.dataset)
    checkpoint_problem = model_folder_problem("model.checkpoint", cfg.model.checkpoint)
    if checkpoint_problem:
        problems.append(checkpoint_problem)
    resume = cfg.training.resume
    if resume not in (None, "auto") and Path(resume).is_dir():
        if not is_training_checkpoint(Path(resume)):
            problems.append(
                f"training.resume={resume} holds no training state, so it is no training checkpoint: "
                f"give a checkpoints/checkpoint_* folder or 'auto' (to fine-tune a model folder, set "
                f"model.checkpoint={resume})"
            )
        elif is_pickled_checkpoint(Path(resume)) and not cfg.training.trust_checkpoint:
            problems.append(pickled_state_message(Path(resume)))
    raise_problems(problems)


def check_eval_paths(cfg: EvaluateConfig) -> None:
    """Check, before any data is read, that the models, predictions files and datasets named exist where they are
    local paths (a hub id is checked when it is downloaded)."""
    problems = []
    for key in ("checkpoint", "compare_to"):
        value = getattr(cfg, key)
        if value is not None and value.endswith(".jsonl"):
            if not Path(value).is_file():
                problems.append(f"{key}={value}: no such file (give a predictions.jsonl, or a model folder)")
        elif (problem := model_folder_problem(key, value)) is not None:
            problems.append(problem)
    if needs_data(cfg):
        problems += format_problems(cfg.dataset) + dataset_path_problems(cfg.dataset)
    raise_problems(problems)
