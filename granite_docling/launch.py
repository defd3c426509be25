"""One run folder per launch, however it was launched, and the config as train.py composes it.

* ``run_stamp`` names the run folder (``outputs/<date>/<time>``). Under ``torchrun`` or ``accelerate launch``
  every process composes its own config, and their clocks may straddle a second; the first process to ask
  stores its stamp in the launcher's key-value store and all others read that one, so all ranks of a job
  write into ONE folder. The tasks of a multi-task ``srun`` step name it after the step instead
  (``outputs/slurm-<job id>.<step id>``). Hydra's sweep launchers (submitit) hand the submitting process's
  stamp to every job. Other launchers (mpirun) should pass ``hydra.run.dir=...`` explicitly.
* ``rank_suffix`` keeps the per-process log files apart in that one folder.
* ``compose_config`` gives scripts and tests the typed config train.py would compose.

The SLURM environment is :mod:`granite_docling.slurm`, the legacy ``--config FILE.py`` is
:mod:`granite_docling.legacy_config`, and a user's mistake in one line is :mod:`granite_docling.errors`.
"""

from __future__ import annotations

import functools
import os
import time
from datetime import timedelta
from pathlib import Path

from omegaconf import OmegaConf

from granite_docling.config import Config, register_configs
from granite_docling.preflight import check_config
from granite_docling.slurm import slurm_environment, step_id

_STAMP_KEY = "granite_docling/run_stamp"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or slurm_environment(os.environ).get("WORLD_SIZE", "1"))


def rank_suffix() -> str:
    """'' on the main process, '_rank3' elsewhere: keeps per-process log files apart in the shared folder."""
    # SLURM's rank too: a submitit job's tasks configure their log files before the task function runs.
    rank = int(os.environ.get("RANK") or slurm_environment(os.environ).get("RANK", "0"))
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


@functools.cache
def run_stamp() -> str:
    """'YYYY-MM-DD/HH-MM-SS' for this run, the same on every process of a torchrun / accelerate launch;
    'slurm-<job id>.<step id>' on the tasks of a multi-task srun step. Asked once per process."""
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    if world_size() > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return _agreed_stamp(stamp)
    if world_size() > 1 and "SLURM_JOB_ID" in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}.{step_id(os.environ)}"
    return stamp


def register_resolvers() -> None:
    # run_stamp is cached: Hydra's load_sweep_config copies the resolver cache, so each job of a sweep launched
    # elsewhere (submitit) writes under the sweep folder the submitting process made and named. rank_suffix must
    # be evaluated by each process.
    for name, fn, use_cache in (("run_stamp", run_stamp, True), ("rank_suffix", rank_suffix, False)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=use_cache)


def compose_config(config_dir: str | Path, *overrides: str, config_name: str = "config") -> Config:
    """``conf/config.yaml`` composed with command-line style ``overrides`` into the typed, validated Config,
    as train.py would; for scripts and tests that need a config without running train.py."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name=config_name, overrides=list(overrides)))
    check_config(cfg)
    return cfg
