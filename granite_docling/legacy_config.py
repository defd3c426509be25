"""The older Python config files, still accepted: ``get_config()`` returning {'model', 'datasets', 'training',
'wandb'}, mapped onto the same schema as the Hydra configs::

    python train.py --config conf/legacy/granite_docling_test.py [--resume CKPT] [overrides...]

``translate_legacy_argv`` turns ``--config FILE.py [--resume CKPT]`` into a generated primary config that lists
our schema and groups, then the legacy values, so Hydra's run folder, ``--cfg job`` and overrides all behave as
for a native config. Unknown keys at any level fail with a "did you mean". The seed's data settings under
``training`` (``val_ratio``, ``num_workers``, ...) land under ``data``, where the schema keeps them now;
``length_cache_dir`` becomes ``data.index_cache_dir`` unless the file also sets ``index_cache_dir``.
"""

from __future__ import annotations

import atexit
import importlib.util
import re
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from granite_docling.config import (
    MOVED_TO_DATA,
    ConfigError,
    DatasetConfig,
    ModelConfig,
    TrainingConfig,
    WandbConfig,
    did_you_mean,
)

LEGACY_SECTIONS = {"model": ModelConfig, "datasets": DatasetConfig, "training": TrainingConfig, "wandb": WandbConfig}


def _field_names(schema: type) -> list[str]:
    names = [f.name for f in fields(schema)]
    return names + list(MOVED_TO_DATA) if schema is TrainingConfig else names


def _data_section(training: dict[str, Any]) -> dict[str, Any]:
    """The ``data`` section of a legacy ``training`` dict's data keys, taken out of it (``training`` is changed)."""
    moved = {name: training.pop(name) for name in list(training) if name in MOVED_TO_DATA}
    older = moved.pop("length_cache_dir", None)
    if moved.get("index_cache_dir") is None and older is not None:
        moved["index_cache_dir"] = older  # the older name counts where the newer one is unset, as it always did
    return moved


def _unknown_key_error(where: str, key: str, known: list[str]) -> str:
    hint = did_you_mean(key, known) or f" (known keys: {', '.join(known)})"
    return f"{where}: unknown key {key!r}{hint}"


def _dataset_key(name: str, taken: set[str]) -> str:
    """A legacy dataset's display name as a config key: 'DoclingMatix test' -> 'DoclingMatix_test', unique."""
    key = re.sub(r"\W", "_", name).strip("_") or "dataset"
    base = key
    n = 2
    while key in taken:
        key = f"{base}_{n}"
        n = n + 1
    return key


def load_legacy_config(path: str | Path) -> dict[str, Any]:
    """Run a legacy config file's ``get_config()`` and map the dict onto :class:`Config`'s layout.

    Unknown keys at any level raise :class:`ConfigError` with a "did you mean"; types are checked later
    by Hydra when the result is merged onto the schema.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"legacy_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"--config {path}: the file defines no get_config() function")
    legacy = module.get_config()
    if not isinstance(legacy, dict):
        raise ConfigError(f"--config {path}: get_config() must return a dict, got {type(legacy).__name__}")

    problems = [
        _unknown_key_error(str(path), key, list(LEGACY_SECTIONS)) for key in legacy if key not in LEGACY_SECTIONS
    ]
    mapped: dict[str, Any] = {}
    for section in ("model", "training", "wandb"):
        values = legacy.get(section) or {}
        known = _field_names(LEGACY_SECTIONS[section])
        problems += [_unknown_key_error(f"{path}: '{section}'", k, known) for k in values if k not in known]
        if values:
            mapped[section] = dict(values)
    if "training" in mapped and (data := _data_section(mapped["training"])):
        mapped["data"] = data

    datasets: dict[str, Any] = {}
    known = _field_names(DatasetConfig)
    for i, entry in enumerate(legacy.get("datasets") or []):
        if not isinstance(entry, dict):
            problems.append(f"{path}: datasets[{i}] must be a dict with at least 'path'")
            continue
        problems += [_unknown_key_error(f"{path}: datasets[{i}]", k, known) for k in entry if k not in known]
        name = str(entry.get("name") or Path(str(entry.get("path", f"dataset{i}"))).name)
        datasets[_dataset_key(name, set(datasets))] = {**entry, "name": name}
    if problems:
        raise ConfigError("invalid legacy config:\n  - " + "\n  - ".join(problems))
    mapped["dataset"] = datasets
    return mapped


def translate_legacy_argv(argv: list[str]) -> list[str]:
    """``[--config FILE.py] [--resume CKPT] [overrides...]`` -> Hydra arguments; unchanged without --config.

    The legacy dict becomes a primary config in a temporary folder: our schema and groups first (without the
    default datasets, which the legacy file lists itself), then its values, then any command-line overrides.
    """
    found = _pop_flag(argv, "--config")
    if found is None:
        if _pop_flag(argv, "--resume") is not None:
            raise SystemExit("error: --resume goes with --config FILE.py; with Hydra configs use training.resume=PATH")
        return argv
    config_file, rest = found
    resume = None
    found = _pop_flag(rest, "--resume")
    if found is not None:
        resume, rest = found

    values = load_legacy_config(config_file)
    primary = {
        "defaults": [
            "config_schema",
            {"model": "granite_docling_258m"},
            {"optimizer": "adamw"},
            {"scheduler": "cosine"},
            {"trainer": "default"},
            "hydra_settings",
            "_self_",
        ],
        **values,
    }
    folder = tempfile.mkdtemp(prefix="granite_docling_legacy_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    OmegaConf.save(OmegaConf.create(primary), Path(folder) / "legacy_config.yaml")
    hydra_args = ["--config-dir", folder, "--config-name", "legacy_config"]
    if resume is not None:
        hydra_args.append(f"training.resume={resume}")
    return hydra_args + rest


def _pop_flag(argv: list[str], flag: str) -> tuple[str, list[str]] | None:
    """Find ``flag VALUE`` or ``flag=VALUE``; return (value, argv without it), or None if absent."""
    for i, arg in enumerate(argv):
        if arg == flag:
            if i + 1 >= len(argv):
                raise SystemExit(f"error: {flag} needs a value")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None
