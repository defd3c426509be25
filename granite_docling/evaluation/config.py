"""The ``evaluate.py`` schema: what to evaluate (a checkpoint or a saved predictions file), on which data, how.

``conf/evaluate.yaml`` composes :class:`EvaluateConfig` with the training ``dataset`` group, so ``dataset=[...]``
and ``dataset.<name>.path=...`` mean exactly what they mean for ``train.py``::

    python evaluate.py checkpoint=outputs/demo/final_model dataset=[sample] eval.split=all
    python evaluate.py checkpoint=outputs/run/final_model compare_to=ibm-granite/granite-docling-258M
    python evaluate.py eval.predictions=outputs/eval/predictions.jsonl      # re-score a file, no model loaded

``eval.split=val`` evaluates the samples training held out: the same index and ``split_positions``
with the training run's seed and val_ratio (read from the checkpoint's run folder when ``eval.seed`` /
``eval.val_ratio`` are null).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from granite_docling.checkpoint_manifest import (
    PICKLED_STATE_FILE,
    STATE_FILE,
    CheckpointError,
    is_pickled_checkpoint,
    read_manifest,
)
from granite_docling.config import DTYPES, DataConfig, DatasetConfig, TrainingConfig, raise_problems

log = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "all")
ENGINES = ("transformers", "server")


@dataclass
class EvalConfig:
    """How to evaluate."""

    split: str = "val"  # val: the samples training held out (same seed and val_ratio); all: every sample
    max_samples: Optional[int] = None  # evaluate at most N samples of each dataset (after the split)
    engine: str = "transformers"  # transformers (generate here) or server (an OpenAI-compatible server: vLLM)
    server_url: Optional[str] = None  # engine=server: the server's address, e.g. http://localhost:8000
    server_concurrency: int = 16  # engine=server: requests in flight at once (the server batches them)
    batch_size: int = 4  # prompts per generate call, per process
    max_new_tokens: int = 4096  # answer budget in tokens; an answer cut here counts as not stopped with eos
    reference_length_factor: Optional[float] = 2.0  # also cut at this x the reference's tokens + 32; null = off
    stop_loops: bool = False  # end an answer once it loops (docling's rules, every 32 tokens); engine=transformers
    dtype: str = "float32"  # weight dtype for generation: float32, bfloat16 (GPU) or float16
    val_ratio: Optional[float] = None  # data.val_ratio of the run; null = read from the run folder, else 0.05
    seed: Optional[int] = None  # training.seed of the run; null = read from the run folder, else 42
    predictions: Optional[str] = None  # score this predictions.jsonl instead of generating (no model is loaded)
    num_examples: int = 6  # samples shown side by side in samples.html
    page_exports: bool = True  # write Markdown / HTML of every page conversion under pages/
    docling_eval_export: bool = True  # write the page predictions as a docling-eval dataset under docling_eval/
    docling_eval_strip_loops: bool = False  # docling-eval export: looping answers without their loop (default: as is)


@dataclass
class EvaluateConfig:
    """One evaluation: ``checkpoint`` (and optionally ``compare_to``) on the selected datasets."""

    checkpoint: Optional[str] = None  # model folder or hub id to evaluate
    compare_to: Optional[str] = None  # a second model folder / hub id, or a predictions.jsonl: before vs after
    dataset: Dict[str, DatasetConfig] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trust_checkpoint: bool = False  # read the run config from an older pickled training_state.pt (plain data only)


def register_eval_configs() -> None:
    """Put the schema into Hydra's ConfigStore; ``conf/evaluate.yaml`` lists it first in its defaults."""
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def is_predictions_file(value: str | None) -> bool:
    return value is not None and value.endswith(".jsonl") and Path(value).is_file()


def validate_eval(cfg: EvaluateConfig) -> None:
    """Check everything that spans fields; raise one :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    e = cfg.eval
    if e.split not in EVAL_SPLITS:
        problems.append(f"eval.split={e.split!r} is not one of {', '.join(EVAL_SPLITS)}")
    if e.dtype not in DTYPES:
        problems.append(f"eval.dtype={e.dtype!r} is not one of {', '.join(DTYPES)}")
    if e.engine not in ENGINES:
        problems.append(f"eval.engine={e.engine!r} is not one of {', '.join(ENGINES)}")
    if e.engine == "server":
        if not e.server_url:
            problems.append("eval.engine=server needs eval.server_url=http://HOST:PORT (start one: make serve)")
        if e.stop_loops:
            problems.append(
                "eval.stop_loops=true stops generation here (eval.engine=transformers); a server generates each "
                "answer to its budget: drop eval.stop_loops (loops are detected and reported either way)"
            )
        if cfg.compare_to is not None and not is_predictions_file(cfg.compare_to):
            problems.append(
                "eval.engine=server answers with the one model it serves: give compare_to=PREDICTIONS.jsonl"
                " of the other model, or use eval.engine=transformers"
            )
    for name in ("batch_size", "max_new_tokens", "server_concurrency"):
        if getattr(e, name) < 1:
            problems.append(f"eval.{name}={getattr(e, name)} must be at least 1")
    if e.max_samples is not None and e.max_samples < 1:
        problems.append(f"eval.max_samples={e.max_samples} must be at least 1 (or null for all)")
    if e.num_examples < 0:
        problems.append(f"eval.num_examples={e.num_examples} must not be negative")
    if e.reference_length_factor is not None and e.reference_length_factor <= 0:
        problems.append(f"eval.reference_length_factor={e.reference_length_factor} must be positive (or null)")
    if e.val_ratio is not None and not 0 <= e.val_ratio < 1:
        problems.append(f"eval.val_ratio={e.val_ratio} must be in [0, 1)")

    if e.predictions is not None:
        if not Path(e.predictions).is_file():
            problems.append(f"eval.predictions={e.predictions}: no such file (give a predictions.jsonl)")
        if cfg.checkpoint is not None:
            problems.append("give either checkpoint=... (generate and score) or eval.predictions=... (score a file)")
    elif cfg.checkpoint is None:
        problems.append("nothing to evaluate: pass checkpoint=MODEL_FOLDER_OR_HUB_ID, or eval.predictions=FILE")

    if needs_data(cfg):
        if not cfg.dataset:
            problems.append("no dataset selected: pass dataset=[name,...] (see conf/dataset/)")
        for key, source in cfg.dataset.items():
            if not source.path:
                problems.append(f"dataset.{key}.path is not set: pass dataset.{key}.path=/path/to/data")
    raise_problems(problems)


def needs_data(cfg: EvaluateConfig) -> bool:
    """Whether a model generates answers (so samples are read), rather than only saved predictions being scored."""
    return cfg.checkpoint is not None or (cfg.compare_to is not None and not is_predictions_file(cfg.compare_to))


def training_split_settings(checkpoint: str | None, cfg: EvalConfig, trust_pickle: bool = False) -> tuple[float, int]:
    """(val_ratio, seed) for ``eval.split=val``: the eval.* values when set, else the training run's, else the
    training defaults. ``eval.split=all`` needs neither.

    The run's resolved config is looked up in ``.hydra/config.yaml`` of the checkpoint's run folder
    (``<run>/final_model``, ``<run>/checkpoints/checkpoint_step_N``), then in the checkpoint's own
    ``training_state.json``; a pickled ``training_state.pt`` of the older format is read only with
    ``trust_pickle``, else a :class:`CheckpointError` says how to go on.
    """
    defaults = TrainingConfig()
    if cfg.split != "val":
        return cfg.val_ratio or 0.0, cfg.seed if cfg.seed is not None else defaults.seed
    needed = cfg.val_ratio is None or cfg.seed is None
    found = None
    if needed and checkpoint and Path(checkpoint).is_dir():
        found = _training_config(Path(checkpoint), trust_pickle)
    training = (found or {}).get("training") or {}
    data = (found or {}).get("data") or training  # runs before the data section kept val_ratio under training
    val_ratio = cfg.val_ratio if cfg.val_ratio is not None else data.get("val_ratio", DataConfig().val_ratio)
    seed = cfg.seed if cfg.seed is not None else training.get("seed", defaults.seed)
    return float(val_ratio), int(seed)


def _training_config(checkpoint: Path, trust_pickle: bool) -> dict | None:
    for folder in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        hydra_config = folder / ".hydra" / "config.yaml"
        if hydra_config.is_file():
            log.info("validation split settings from %s", hydra_config)
            return OmegaConf.to_container(OmegaConf.load(hydra_config))
    if read_manifest(checkpoint) is not None:
        state_file = checkpoint / STATE_FILE
        config_yaml = json.loads(state_file.read_text(encoding="utf-8")).get("config")
        if config_yaml:
            log.info("validation split settings from %s", state_file)
            return OmegaConf.to_container(OmegaConf.create(config_yaml))
    elif is_pickled_checkpoint(checkpoint):
        if not trust_pickle:
            raise CheckpointError(
                f"{checkpoint} keeps its run's config (the seed and val_ratio of its validation split) only in "
                f"{PICKLED_STATE_FILE}, the older pickled format: pass eval.seed=... eval.val_ratio=..., or "
                f"trust_checkpoint=true to read it (only tensors and plain values are taken from it, never code)"
            )
        from granite_docling.checkpoint import read_pickled_state  # imports torch: not before the cheap checks

        state = read_pickled_state(checkpoint / PICKLED_STATE_FILE)
        if state.get("config"):
            log.info("validation split settings from %s (trusted pickle)", checkpoint / PICKLED_STATE_FILE)
            return OmegaConf.to_container(OmegaConf.create(state["config"]))
    return None
