"""Load granite-docling (or a smaller random preset of it) with its processor, freeze parts, build param groups.

Sources, by ``model.checkpoint``:

* a hub id (``ibm-granite/granite-docling-258M``) or a local folder: ``from_pretrained``, weights included;
* ``null``, or the granite-docling hub id with ``model.random_init=true``: the vendored processor and config
  files in ``granite_docling/assets/granite-docling-258M`` (IBM's own, Apache-2.0), so the real tokenizer and
  processor work offline; ``model.architecture`` shrinks the architecture for presets such as ``tiny``.

A folder is checked before anything loads from it (:func:`check_model_source`): a missing folder, a
``config.json`` of another architecture or none, or one that asks to run the folder's own code (never run here;
every ``from_pretrained`` passes ``trust_remote_code=False``) is a :class:`CheckpointError` in one line, and so is
a model folder of ours whose files differ from its manifest (:func:`check_weights`) or weights that cannot be read.

The processor always matches the model: tokens per image tile are derived from the vision tile size, patch size
and pixel-shuffle factor, never configured separately::

    model, processor = load_model_and_processor(ModelConfig(...))
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, Idefics3Config

from granite_docling.checkpoint_manifest import (
    MODEL_HINT,
    MODEL_TYPE,
    CheckpointError,
    DamagedCheckpointError,
    check_whole,
    model_folder_problem,
)
from granite_docling.config import HUB_ID, ArchitectureConfig, LoraConfig, ModelConfig

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).parent / "assets" / "granite-docling-258M"
LOAD_ADVICE = "use another checkpoint, or copy this one again from where it was saved"


def model_source(cfg: ModelConfig) -> str:
    """Folder or hub id that the config and processor files come from."""
    if cfg.checkpoint is None:
        return str(ASSETS_DIR)
    if cfg.random_init and cfg.checkpoint == HUB_ID and not Path(cfg.checkpoint).is_dir():
        return str(ASSETS_DIR)  # IBM's files, vendored: no download needed for a random-weight build
    return cfg.checkpoint


def apply_architecture(config: Idefics3Config, arch: ArchitectureConfig) -> Idefics3Config:
    """Overwrite the sizes that ``arch`` sets (non-null) on an Idefics3 config, in place; return it."""
    text = config.text_config
    vision = config.vision_config
    text_sizes = {
        "hidden_size": arch.text_hidden_size,
        "num_hidden_layers": arch.text_layers,
        "num_attention_heads": arch.text_heads,
        "num_key_value_heads": arch.text_kv_heads,
        "intermediate_size": arch.text_intermediate_size,
    }
    vision_sizes = {
        "hidden_size": arch.vision_hidden_size,
        "num_hidden_layers": arch.vision_layers,
        "num_attention_heads": arch.vision_heads,
        "intermediate_size": arch.vision_intermediate_size,
        "image_size": arch.tile_size,
        "patch_size": arch.patch_size,
    }
    for sub_config, sizes in ((text, text_sizes), (vision, vision_sizes)):
        for key, value in sizes.items():
            if value is not None:
                setattr(sub_config, key, value)
    # The checkpoint pins head_dim (64); keep it consistent with a changed width or head count.
    text.head_dim = text.hidden_size // text.num_attention_heads
    if arch.tile_size is not None:
        vision.max_image_size = {"longest_edge": arch.tile_size}
        vision.size = {"longest_edge": arch.tile_size}
    if arch.scale_factor is not None:
        config.scale_factor = arch.scale_factor
    return config


def tokens_per_tile(config: Idefics3Config) -> int:
    """Image tokens the connector emits per tile: (tile / patch)^2 patches, pixel-shuffled by scale_factor^2."""
    patches_per_side = config.vision_config.image_size // config.vision_config.patch_size
    return patches_per_side**2 // config.scale_factor**2


def check_model_source(source: str) -> None:
    """Raise :class:`CheckpointError` when the local folder ``source`` is no granite-docling model folder (see
    :func:`granite_docling.checkpoint_manifest.model_folder_problem`); a hub id is checked when it is loaded."""
    problem = model_folder_problem(None, source)
    if problem is not None:
        raise CheckpointError(problem)


def check_weights(cfg: ModelConfig) -> None:
    """Raise :class:`DamagedCheckpointError` when ``cfg.checkpoint`` is a model folder saved by this project whose
    model files differ from its manifest (truncated, overwritten, missing); a folder without one passes."""
    if not cfg.random_init and cfg.checkpoint is not None and Path(cfg.checkpoint).is_dir():
        check_whole(Path(cfg.checkpoint), LOAD_ADVICE, model_only=True)


def _pretrained(loader, source: str, **kwargs):
    """``loader.from_pretrained(source)`` without running a folder's code; what a user can fix (no such hub id
    offline, a file that is no JSON, a processor of custom code) is a :class:`CheckpointError` in one line."""
    try:
        return loader.from_pretrained(source, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as error:
        where = "" if Path(source).exists() else " (no such folder here; as a hub id)"
        raise CheckpointError(f"cannot load {source}{where}: {_first_line(error)}; {MODEL_HINT}") from error


def load_model_config(cfg: ModelConfig) -> Idefics3Config:
    source = model_source(cfg)
    check_model_source(source)
    config = _pretrained(AutoConfig, source, revision=cfg.revision)
    if config.model_type != MODEL_TYPE:  # a hub id of another architecture (a folder was checked above)
        raise CheckpointError(
            f"{source} is a {config.model_type!r} model, not granite-docling's architecture ({MODEL_TYPE!r})"
        )
    return apply_architecture(config, cfg.architecture)


def load_processor(cfg: ModelConfig, model_config: Idefics3Config, image_longest_edge: int | None = None):
    """The checkpoint's processor, made to agree with ``model_config`` (tile size, tokens per tile).

    ``image_longest_edge`` (or ``cfg.image_longest_edge``) overrides the resize target of the long edge.
    """
    tile = model_config.vision_config.image_size
    kwargs = {"image_seq_len": tokens_per_tile(model_config), "max_image_size": {"longest_edge": tile}}
    longest_edge = image_longest_edge or cfg.image_longest_edge
    if longest_edge is not None:
        kwargs["size"] = {"longest_edge": longest_edge}
    return _pretrained(AutoProcessor, model_source(cfg), revision=cfg.revision, **kwargs)


def stock_processor(source: str):
    """The processor of a model folder or hub id as it was saved (``validate --checkpoint`` counts tokens with it),
    checked as :func:`load_model_config` checks a source."""
    check_model_source(source)
    return _pretrained(AutoProcessor, source)


def resolve_attn_implementation(name: str) -> str:
    """'auto' picks flash-attention when it is installed and a GPU is present, else PyTorch's sdpa."""
    if name != "auto":
        return name
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(cfg: ModelConfig, model_config: Idefics3Config) -> torch.nn.Module:
    """Random weights (``random_init``) or the checkpoint's weights, in ``cfg.dtype``; weights that cannot be read
    are a :class:`DamagedCheckpointError` (:func:`load_model_and_processor` checks them against a manifest first)."""
    dtype = getattr(torch, cfg.dtype)
    attn_implementation = resolve_attn_implementation(cfg.attn_implementation)
    if cfg.random_init:
        return AutoModelForImageTextToText.from_config(
            model_config, dtype=dtype, attn_implementation=attn_implementation
        )
    try:
        return AutoModelForImageTextToText.from_pretrained(
            cfg.checkpoint,
            revision=cfg.revision,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=False,
        )
    except SafetensorError as error:  # a truncated file in a folder without a manifest (someone else's model)
        files = sorted(path.name for path in Path(cfg.checkpoint).glob("*.safetensors")) or ["its weights"]
        what = f"{', '.join(files)} cannot be read ({_first_line(error)})"
        raise DamagedCheckpointError(cfg.checkpoint, what, LOAD_ADVICE) from error
    except OSError as error:  # no weights file in the folder, or a hub id offline
        raise CheckpointError(f"cannot load the weights of {cfg.checkpoint}: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_model_and_processor(cfg: ModelConfig):
    """The model and its matching processor, as ``cfg`` describes; logs where they came from and their size. A
    model folder of ours is checked against its manifest before anything loads from it."""
    model_config = load_model_config(cfg)
    check_weights(cfg)
    processor = load_processor(cfg, model_config)
    model = load_model(cfg, model_config)
    freeze(model, vision=cfg.freeze_vision, connector=cfg.freeze_connector, text=cfg.freeze_text)
    counts = parameter_counts(model)
    log.info(
        "model %s from %s (%s weights): %.1fM parameters, %.1fM trainable",
        cfg.name,
        model_source(cfg),
        "random" if cfg.random_init else "pretrained",
        counts["total"] / 1e6,
        counts["trainable"] / 1e6,
    )
    return model, processor


# Modules that get adapters, per component: attention and MLP projections, and the connector's projection.
LORA_TARGETS = {
    "text": r".*text_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    "vision": r".*vision_model\..*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
    "connector": r".*connector\.modality_projection\.proj",
}


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA adapters on the chosen components; everything else is frozen by peft."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    pattern = "|".join(f"({LORA_TARGETS[c]})" for c in cfg.components)
    peft_config = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern)
    model = get_peft_model(model, peft_config)
    counts = parameter_counts(model)
    log.info(
        "LoRA r=%d on %s: %.2fM trainable parameters", cfg.rank, ", ".join(cfg.components), counts["trainable"] / 1e6
    )
    return model


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The Idefics3 model inside a peft wrapper (adapters stay injected), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---------------------------------------------------------------------------------------------------------------
# Components, freezing and optimizer parameter groups.


def component_of(parameter_name: str) -> str:
    """'vision', 'connector' or 'text' for an Idefics3 parameter name (plain or peft-wrapped).

    Raises on a name that belongs to none, so no parameter can silently miss its optimizer group.
    """
    if ".vision_model." in f".{parameter_name}":
        return "vision"
    if ".connector." in f".{parameter_name}":
        return "connector"
    if ".text_model." in f".{parameter_name}" or parameter_name.split(".")[-2:-1] == ["lm_head"]:
        return "text"
    raise ValueError(f"parameter {parameter_name!r} belongs to no known component (vision, connector, text)")


def freeze(model: torch.nn.Module, *, vision: bool = False, connector: bool = False, text: bool = False) -> None:
    frozen = {"vision": vision, "connector": connector, "text": text}
    for name, parameter in model.named_parameters():
        if frozen[component_of(name)]:
            parameter.requires_grad_(False)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: total, trainable, and per component (tied weights counted once)."""
    counts = {"total": 0, "trainable": 0, "vision": 0, "connector": 0, "text": 0}
    for name, parameter in model.named_parameters():
        counts["total"] += parameter.numel()
        counts[component_of(name)] += parameter.numel()
        if parameter.requires_grad:
            counts["trainable"] += parameter.numel()
    return counts


def parameter_groups(
    model: torch.nn.Module, learning_rates: dict[str, float], weight_decay: float
) -> list[dict[str, object]]:
    """AdamW groups: one per (component, decayed or not); norms and biases (1-D tensors) get no weight decay.

    ``learning_rates`` maps 'vision' / 'connector' / 'text' to their peak rates. Every trainable parameter
    lands in exactly one group; anything else is a bug and raises.
    """
    grouped: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            grouped.setdefault((component_of(name), parameter.ndim >= 2), []).append(parameter)
    groups = [
        {
            "name": component if decay else f"{component}_no_decay",
            "params": params,
            "lr": learning_rates[component],
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (component, decay), params in sorted(grouped.items())
    ]
    in_groups = sum(p.numel() for group in groups for p in group["params"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if in_groups != trainable:
        raise RuntimeError(f"optimizer groups hold {in_groups} parameters but {trainable} are trainable")
    return groups
