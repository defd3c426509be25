"""The experiment schema: typed dataclasses registered in Hydra's ConfigStore, and their cross-field validation
(the older ``get_config()`` files are mapped onto it by :mod:`granite_docling.legacy_config`; the paths a config
names are checked by :mod:`granite_docling.preflight`).

Hydra composes ``conf/config.yaml`` on top of :class:`Config`, so a misspelt key or a wrong type fails at
composition, naming the key, before any data or model is touched::

    python train.py training.lr_conector=1e-3      # -> Key 'lr_conector' not in 'TrainingConfig'

Field names under ``training`` and ``wandb`` are the seed's (the original ``get_config()`` dicts), so users'
muscle memory and old configs carry over; the seed's data settings (``training.val_ratio``, ``training.num_workers``
...) live under ``data`` (:data:`MOVED_TO_DATA`): legacy files are mapped, an override with the old name fails
naming the new one. Derived values (effective batch size, steps per epoch) are computed
where they are needed, never stored here.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from hydra.core.config_store import ConfigStore

from granite_docling.user_error import UserError

HUB_ID = "ibm-granite/granite-docling-258M"

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3")
DATASET_UNITS = ("page", "document")
BAD_SAMPLE_POLICIES = ("skip", "error")
COMPONENTS = ("vision", "connector", "text")


class ConfigError(UserError, ValueError):
    """A configuration the user must fix; the message says what to change."""


@dataclass
class ArchitectureConfig:
    """Size overrides applied to the model config when building with random weights (presets, benchmarks).

    ``null`` keeps the checkpoint's value. Tokens per image tile follow from these:
    ``(tile_size / patch_size) ** 2 / scale_factor ** 2``.
    """

    text_hidden_size: Optional[int] = None  # width of the Granite/Llama text model
    text_layers: Optional[int] = None  # number of decoder layers
    text_heads: Optional[int] = None  # attention heads; head_dim = hidden / heads
    text_kv_heads: Optional[int] = None  # key/value heads (grouped-query attention)
    text_intermediate_size: Optional[int] = None  # MLP width of the text model
    vision_hidden_size: Optional[int] = None  # width of the SigLIP2 vision encoder
    vision_layers: Optional[int] = None  # number of vision encoder layers
    vision_heads: Optional[int] = None  # vision attention heads
    vision_intermediate_size: Optional[int] = None  # MLP width of the vision encoder
    tile_size: Optional[int] = None  # pixels per square image tile seen by the encoder (512 for the real model)
    patch_size: Optional[int] = None  # pixels per vision patch (16 for the real model)
    scale_factor: Optional[int] = None  # pixel-shuffle factor of the connector (4 for the real model)


@dataclass
class LoraConfig:
    """Low-rank adapters through peft; the saved final model is always merged and loads without peft."""

    enabled: bool = False  # train adapters instead of the full weights
    rank: int = 16  # adapter rank r
    alpha: int = 32  # scaling numerator; effective scale is alpha / rank
    dropout: float = 0.05  # dropout on the adapter input
    components: List[str] = field(default_factory=lambda: ["text", "connector"])  # of: text, connector, vision


@dataclass
class ModelConfig:
    """Which model to load and which parts of it to train."""

    name: str = "granite_docling_258m"  # preset name, used in logs and run names
    checkpoint: Optional[str] = HUB_ID  # hub id or local folder; null = the vendored files (needs random_init)
    revision: Optional[str] = None  # hub revision (branch, tag or commit) to load
    random_init: bool = False  # build the architecture with random weights instead of loading them
    dtype: str = "float32"  # weight dtype: float32 (with mixed_precision for speed), bfloat16, float16
    attn_implementation: str = "sdpa"  # sdpa, eager, flash_attention_2/3, or auto (flash when installed)
    image_longest_edge: Optional[int] = None  # processor resize target in px; null keeps the checkpoint's (2048)
    freeze_vision: bool = False  # keep the SigLIP2 vision encoder fixed
    freeze_connector: bool = False  # keep the pixel-shuffle connector fixed
    freeze_text: bool = False  # keep the text model (and its tied LM head) fixed
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DatasetConfig:
    """One training source. Selected as ``dataset=[a,b]``; each lands under ``dataset.<name>``."""

    path: str = ""  # Docling folder (anns/ + images/), parquet file or folder, datasets folder, or hub id
    name: Optional[str] = None  # display name in logs and metrics; defaults to the key under ``dataset``
    format: str = "auto"  # auto, docling (JSON + images), hub (images + texts columns), docling_eval (its parquet)
    unit: str = "page"  # docling_eval: one sample per page, or one multi-page sample per document
    split: str = "train"  # split folder / hub split to read
    max_turns: Optional[int] = None  # keep the first N question/answer turns of each sample
    max_samples: Optional[int] = None  # keep the first N samples of this source
    max_images_per_sample: Optional[int] = None  # keep the first N images of each sample
    weight: Optional[float] = None  # sampling ratio when mixing sources; null = in proportion to size
    image_longest_edge: Optional[int] = None  # per-source resize target in px (formula crops need no 2048 px)
    streaming: bool = False  # read parquet shards as a stream (hub ids, data bigger than the disk); no index
    shuffle_buffer: int = 1000  # streaming: rows shuffled together (plus a shuffled shard and row-group order)


def optimizer_default() -> Dict[str, Any]:
    """``conf/optimizer/adamw.yaml``'s target: what a config without the group builds."""
    return {"_target_": "torch.optim.AdamW", "_partial_": True}


def scheduler_default() -> Dict[str, Any]:
    """``conf/scheduler/cosine.yaml``'s target: warmup, then cosine down to ``training.min_lr``."""
    return {"_target_": "granite_docling.optimizers.cosine", "_partial_": True}


@dataclass
class TrainingConfig:
    """How long, how fast and how safely to train. Names follow the seed's ``training`` dict."""

    num_epochs: int = 3  # passes over the training split (ignored when max_steps is set)
    max_steps: Optional[int] = None  # optimizer steps to run; overrides num_epochs
    batch_size: int = 1  # samples per device per micro-step
    gradient_accumulation_steps: int = 8  # micro-steps per optimizer step
    lr_vision: float = 5e-5  # peak learning rate of the vision encoder
    lr_text: float = 5e-5  # peak learning rate of the text model
    lr_connector: float = 5e-4  # peak learning rate of the connector (new task, higher)
    weight_decay: float = 0.01  # AdamW decay; never applied to norms, biases or embeddings' norms
    max_grad_norm: float = 1.0  # gradient clipping threshold; 0 = no clipping
    min_lr: float = 1e-6  # floor of the cosine schedule
    warmup_steps: int = 0  # linear warmup, in optimizer steps
    gradient_checkpointing: bool = True  # recompute activations in backward to save memory
    mixed_precision: str = "auto"  # auto (what the device computes fast: granite_docling/precision.py), no, bf16, fp16
    compile: bool = False  # torch.compile the model
    log_interval: int = 10  # console / metrics line every N optimizer steps
    report_to: List[str] = field(default_factory=list)  # trackers besides metrics.jsonl: tensorboard, mlflow, ...
    objective: str = "auto"  # metric train.py returns to sweepers; auto = final val/loss, else last train/loss
    val_interval: int = 1  # validate every N epochs
    val_steps: Optional[int] = None  # also validate every N optimizer steps
    save_interval: int = 1  # checkpoint every N epochs
    save_steps: Optional[int] = None  # also checkpoint every N optimizer steps
    save_initial: bool = False  # also save the untrained start as initial_model/ beside final_model/ (before/after)
    gen_eval_steps: Optional[int] = None  # every N steps, generate answers for a few validation samples and score them
    gen_eval_samples: int = 8  # validation samples used by gen_eval_steps
    gen_eval_max_new_tokens: int = 512  # answer budget of gen_eval_steps, in tokens
    max_checkpoints: Optional[int] = 3  # keep only the newest N checkpoints; null keeps all
    save_dir: Optional[str] = None  # checkpoint folder; null = checkpoints/ inside the run folder
    seed: int = 42  # seeds model init, data order and the validation split (the data side is given it)
    resume: Optional[str] = None  # checkpoint folder to continue from, or 'auto' (newest in save_dir)
    trust_checkpoint: bool = False  # also resume from an older pickled training_state.pt (plain data only)
    max_nonfinite_steps: int = 5  # stop after this many optimizer steps in a row with a NaN / Inf loss
    peak_tflops: Optional[float] = None  # device peak for the MFU estimate; null = looked up by GPU name
    loss_chunk_size: int = 2048  # supervised positions per chunk of the output layer + loss (bounds logits memory)
    loss_recompute: bool = True  # recompute each chunk's logits in backward; false: store them (~1/4 less work)
    push_to_hub: bool = False  # upload final_model/ to the hub at the end
    hub_repo_id: Optional[str] = None  # hub repository to push to, e.g. my-org/granite-docling-invoices
    hub_private: bool = True  # create the hub repository as private


@dataclass
class DataConfig:
    """What decides how samples become batches: which samples are read, held out and dropped, how they are cut
    into micro-batches and by how many workers. The data side gets this section as it is (``build_data``), with
    the run's seed, batch size and accumulation beside it; ARCHITECTURE.md says why each field is here."""

    val_ratio: float = 0.05  # share of every source held out for validation; 0 = no validation split
    val_max_samples: Optional[int] = 64  # score at most N held-out samples per dataset (seeded); null = all
    max_samples_per_dataset: Optional[int] = None  # cap on every source (a dataset's own max_samples also applies)
    max_length: Optional[int] = None  # drop samples longer than this many tokens, image tokens included
    on_bad_sample: str = "skip"  # skip (count and report) or error (stop at the first, naming it)
    batch_tokens: Optional[int] = None  # micro-batches of <= N padded tokens (images included); null: batch_size each
    length_grouping: bool = True  # batch samples of similar (tokens, tiles) together; false = plain random batches
    image_path: str = "fast"  # fast (uint8 pages through the loader, tiles made on the device) or stock (processor)
    num_workers: int = 4  # DataLoader worker processes per device
    index_cache_dir: Optional[str] = None  # cache of dataset indexes; null = ~/.cache/granite_docling/index


# The seed's names under ``training`` -> their field under ``data``; length_cache_dir is index_cache_dir's older name
MOVED_TO_DATA = {f.name: f.name for f in fields(DataConfig)} | {"length_cache_dir": "index_cache_dir"}


def moved_key(key: str) -> Optional[str]:
    """The name a moved key has now (``training.val_ratio`` -> ``data.val_ratio``); None for any other key."""
    section, _, name = key.partition(".")
    return f"data.{MOVED_TO_DATA[name]}" if section == "training" and name in MOVED_TO_DATA else None


@dataclass
class WandbConfig:
    """Weights & Biases logging (optional)."""

    enabled: bool = False  # log to W&B
    project: str = "granite-docling-finetuning"  # W&B project
    run_name: Optional[str] = None  # W&B run name; null = the run folder's name
    entity: Optional[str] = None  # W&B team or user
    mode: str = "online"  # online, offline (no network needed; sync later) or disabled


@dataclass
class Config:
    """One experiment: what the Hydra groups ``model``, ``dataset``, ``optimizer``, ``trainer`` compose into
    (``trainer`` sets ``training`` and ``data``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: Dict[str, DatasetConfig] = field(default_factory=dict)
    # Hydra's ``_target_`` (a class taking parameter groups) and its keyword arguments; learning rates, weight
    # decay and warmup stay under ``training`` (the seed's names). See conf/optimizer/ and the README.
    optimizer: Dict[str, Any] = field(default_factory=optimizer_default)
    # ``_target_``: the learning-rate multiplier per step (warmup, then cosine / linear / constant / wsd).
    scheduler: Dict[str, Any] = field(default_factory=scheduler_default)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore; ``conf/config.yaml`` lists it first in its defaults."""
    ConfigStore.instance().store(name="config_schema", node=Config)


def tracker_problems(report_to: List[str]) -> list[str]:
    """What is wrong with ``training.report_to``: unknown names, trackers whose package is not installed."""
    if not report_to:
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(name) for name in get_available_trackers()}
    problems = []
    for name in report_to:
        if name not in LOGGER_TYPE_TO_CLASS:
            problems.append(f"training.report_to has {name!r}; choose from {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        elif name not in available:
            package = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny"}.get(name, name)
            problems.append(f"training.report_to has {name}, which is not installed: pip install {package}")
    return problems


def validate(cfg: Config) -> None:
    """Check everything that spans fields; raise one :class:`ConfigError` listing every problem. The dataset
    formats are the data side's to check: ``preflight.check_config`` adds their problems to these."""
    raise_problems(config_problems(cfg))


def config_problems(cfg: Config) -> list[str]:
    """Every problem :func:`validate` reports, one line each."""
    problems = model_problems(cfg.model, cfg.training.mixed_precision)
    problems += dataset_problems(cfg.dataset, cfg.data.batch_tokens)
    problems += training_problems(cfg.training)
    problems += data_problems(cfg.data, cfg.training.objective)
    problems += choice_problem("wandb.mode", cfg.wandb.mode, ("online", "offline", "disabled"))
    problems += target_problems(cfg.optimizer, "optimizer") + target_problems(cfg.scheduler, "scheduler")
    return problems


def target_problems(settings: Any, group: str) -> list[str]:
    """[the problem] when the ``group`` section names no ``_target_`` (what it builds is checked where it is)."""
    if not isinstance(settings, Mapping) or not isinstance(settings.get("_target_"), str) or not settings["_target_"]:
        return [f"{group}._target_ is not set: choose {group}=NAME (see conf/{group}/) or set {group}._target_=..."]
    return []


def choice_problem(key: str, value: str, choices: tuple[str, ...]) -> list[str]:
    """[the problem] when ``value`` is not one of ``choices``, else []."""
    return [] if value in choices else [f"{key}={value!r} is not one of {', '.join(choices)}"]


def model_problems(model: ModelConfig, mixed_precision: str) -> list[str]:
    problems = choice_problem("model.dtype", model.dtype, DTYPES)
    problems += choice_problem("model.attn_implementation", model.attn_implementation, ATTN_IMPLEMENTATIONS)
    if model.checkpoint is None and not model.random_init:
        problems.append(
            "model.checkpoint=null means the vendored files, which hold no weights: "
            "set model.random_init=true or give a hub id / local folder"
        )
    if model.attn_implementation.startswith("flash_attention") and importlib.util.find_spec("flash_attn") is None:
        problems.append(f"model.attn_implementation={model.attn_implementation} needs flash-attn installed; use sdpa")
    if model.dtype == "float16" or (model.dtype == "bfloat16" and mixed_precision == "fp16"):
        problems.append(
            f"model.dtype={model.dtype} with training.mixed_precision={mixed_precision} cannot train "
            "stably: keep model.dtype=float32 and set training.mixed_precision=bf16 or fp16"
        )
    frozen = {c for c in COMPONENTS if getattr(model, f"freeze_{c}")}
    if frozen == set(COMPONENTS) and not model.lora.enabled:
        problems.append("model.freeze_vision, freeze_connector and freeze_text are all true: nothing would train")
    unknown = sorted(set(model.lora.components) - set(COMPONENTS))
    if unknown:
        problems.append(f"model.lora.components has {unknown}; choose from {', '.join(COMPONENTS)}")
    if model.lora.enabled and model.lora.rank < 1:
        problems.append("model.lora.rank must be at least 1")
    arch = model.architecture
    overridden = [f.name for f in fields(arch) if getattr(arch, f.name) is not None]
    if overridden and not model.random_init:
        problems.append(
            f"model.architecture sets {', '.join(overridden)}, which only applies to random weights: "
            "set model.random_init=true or remove the overrides"
        )
    if arch.tile_size is not None and arch.patch_size is not None and arch.tile_size % arch.patch_size:
        problems.append("model.architecture.tile_size must be a multiple of patch_size")
    return problems


def dataset_problems(datasets: Dict[str, DatasetConfig], batch_tokens: Optional[int]) -> list[str]:
    if not datasets:
        return [
            "no dataset selected: pass dataset=[name,...] (see conf/dataset/), "
            "or dataset=[folder] dataset.folder.path=PATH"
        ]
    problems = []
    for key, source in datasets.items():
        prefix = f"dataset.{key}"
        if not source.path:
            problems.append(f"{prefix}.path is not set: pass {prefix}.path=/path/to/data")
        problems += choice_problem(f"{prefix}.unit", source.unit, DATASET_UNITS)  # format: data.formats checks it
        for name in ("max_turns", "max_samples", "max_images_per_sample", "image_longest_edge"):
            value = getattr(source, name)
            if value is not None and value < 1:
                problems.append(f"{prefix}.{name}={value} must be at least 1 (or null for no limit)")
        if source.weight is not None and source.weight <= 0:
            problems.append(f"{prefix}.weight={source.weight} must be positive")
        if source.shuffle_buffer < 1:
            problems.append(f"{prefix}.shuffle_buffer={source.shuffle_buffer} must be at least 1")
    streamed = sorted(key for key, source in datasets.items() if source.streaming)
    if streamed and len(streamed) < len(datasets):
        problems.append(
            f"dataset.{streamed[0]}.streaming=true but {', '.join(sorted(set(datasets) - set(streamed)))} "
            "is not streamed: stream all sources or none"
        )
    if streamed and batch_tokens is not None:
        problems.append(
            "data.batch_tokens needs indexed data: a stream's sample lengths are not known before it is read "
            "(set it to null, or index the data: dataset.<name>.streaming=false)"
        )
    return problems


POSITIVE_OR_NULL = ("max_steps", "save_steps", "val_steps", "gen_eval_steps", "max_checkpoints")  # training.*: >= 1


def training_problems(training: TrainingConfig) -> list[str]:
    problems = choice_problem("training.mixed_precision", training.mixed_precision, MIXED_PRECISION)
    problems += tracker_problems(training.report_to)
    for name in ("batch_size", "gradient_accumulation_steps", "num_epochs", "log_interval", "val_interval"):
        if getattr(training, name) < 1:
            problems.append(f"training.{name}={getattr(training, name)} must be at least 1")
    for name in POSITIVE_OR_NULL:
        value = getattr(training, name)
        if value is not None and value < 1:
            problems.append(f"training.{name}={value} must be at least 1 (or null)")
    if training.save_interval < 0:
        problems.append("training.save_interval must be >= 0 (0 = no epoch checkpoints)")
    learning_rates = {name: getattr(training, name) for name in ("lr_vision", "lr_text", "lr_connector")}
    for name, value in learning_rates.items():
        if value <= 0:
            problems.append(f"training.{name}={value} must be positive (freeze the component instead)")
    if training.min_lr < 0 or training.min_lr > min(learning_rates.values()):
        problems.append(f"training.min_lr={training.min_lr} must be between 0 and the smallest learning rate")
    for name in ("weight_decay", "max_grad_norm", "warmup_steps"):
        if getattr(training, name) < 0:
            problems.append(f"training.{name}={getattr(training, name)} must not be negative")
    if training.push_to_hub and not training.hub_repo_id:
        problems.append("training.push_to_hub=true needs training.hub_repo_id=ORG/NAME")
    if training.max_nonfinite_steps < 1 or training.loss_chunk_size < 1:
        problems.append("training.max_nonfinite_steps and training.loss_chunk_size must be at least 1")
    if training.resume not in (None, "auto") and not Path(training.resume).is_dir():
        problems.append(f"training.resume={training.resume!r} is not a folder: give a checkpoint folder or 'auto'")
    return problems


def data_problems(data: DataConfig, objective: str) -> list[str]:
    problems = choice_problem("data.on_bad_sample", data.on_bad_sample, BAD_SAMPLE_POLICIES)
    problems += choice_problem("data.image_path", data.image_path, ("fast", "stock"))
    if not 0 <= data.val_ratio < 1:
        problems.append(f"data.val_ratio={data.val_ratio} must be in [0, 1)")
    elif objective == "val/loss" and data.val_ratio == 0:
        problems.append("training.objective=val/loss needs a validation split: set data.val_ratio > 0")
    for name in ("max_length", "max_samples_per_dataset", "val_max_samples", "batch_tokens"):
        value = getattr(data, name)
        if value is not None and value < 1:
            problems.append(f"data.{name}={value} must be at least 1 (or null)")
    if data.num_workers < 0:
        problems.append(f"data.num_workers={data.num_workers} must not be negative")
    return problems


def raise_problems(problems: list[str]) -> None:
    """Raise one :class:`ConfigError`: the problem itself when there is one, else a list, one problem per line."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def did_you_mean(key: str, known: list[str]) -> str:
    """`` (did you mean 'lr_connector'?)`` for the known name closest to a misspelt ``key``; '' when none is close."""
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
