"""What the entry points do before Hydra takes over: one run folder for all processes, and legacy configs.

* ``run_stamp`` names the run folder (``outputs/<date>/<time>``). Under ``torchrun`` or ``accelerate launch``
  every process composes its own config, and their clocks may straddle a second; the first process to ask
  stores its stamp in the launcher's key-value store and all others read that one, so all ranks of a job
  write into ONE folder. Other launchers (srun, mpirun) should pass ``hydra.run.dir=...`` explicitly.
* ``translate_legacy_argv`` turns ``--config FILE.py [--resume CKPT]`` into a generated primary config that
  lists our schema and groups, then the legacy values, so Hydra's run folder, ``--cfg job`` and overrides all
  behave as for a native config.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from omegaconf import OmegaConf

from granite_docling.config import load_legacy_config

_STAMP_KEY = "granite_docling/run_stamp"
_stamp: str | None = None


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_suffix() -> str:
    """'' on the main process, '_rank3' elsewhere: keeps per-process log files apart in the shared folder."""
    rank = int(os.environ.get("RANK", "0"))
    return "" if rank == 0 else f"_rank{rank}"


def _agreed_stamp(local_stamp: str) -> str:
    """The stamp of whichever process of this launch asked first, via the elastic agent's TCPStore."""
    from torch.distributed import TCPStore

    store = TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=300),
        use_libuv=True,
    )
    # compare_set with an empty expected value sets the key only if it is absent, and returns what is stored.
    agreed = store.compare_set(_STAMP_KEY, "", local_stamp)
    return agreed.decode() if isinstance(agreed, bytes) else str(agreed)


def run_stamp() -> str:
    """'YYYY-MM-DD/HH-MM-SS' for this run, the same on every process of a torchrun / accelerate launch."""
    global _stamp
    if _stamp is None:
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
        if world_size() > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            stamp = _agreed_stamp(stamp)
        _stamp = stamp
    return _stamp


def register_resolvers() -> None:
    for name, fn in (("run_stamp", run_stamp), ("rank_suffix", rank_suffix)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def compose_config(config_dir: str | Path, *overrides: str, config_name: str = "config"):
    """``conf/config.yaml`` composed with command-line style ``overrides`` into the typed, validated Config,
    as train.py would; for scripts and tests that need a config without running train.py."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from granite_docling.config import register_configs, validate

    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name=config_name, overrides=list(overrides)))
    validate(cfg)
    return cfg


def translate_legacy_argv(argv: list[str]) -> list[str]:
    """``[--config FILE.py] [--resume CKPT] [overrides...]`` -> Hydra arguments; unchanged without --config.

    The legacy dict becomes a primary config in a temporary folder: our schema and groups first (without the
    default datasets, which the legacy file lists itself), then its values, then any command-line overrides.
    """
    found = _pop_flag(argv, "--config")
    if found is None:
        if _pop_flag(argv, "--resume") is not None:
            raise SystemExit("--resume goes with --config FILE.py; with Hydra configs use training.resume=PATH")
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
                raise SystemExit(f"{flag} needs a value")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None
