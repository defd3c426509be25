"""What the entry points do before Hydra takes over: one process group and one run folder per launch, legacy configs.

* ``apply_slurm_environment`` makes the tasks of one ``srun`` step one process group: it sets the variables
  torchrun would (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``) from SLURM's, so Accelerate initialises ``torch.distributed`` as under torchrun. A
  batch script, an ``salloc`` shell or a one-task step stays a plain one-process run.
* ``run_stamp`` names the run folder (``outputs/<date>/<time>``). Under ``torchrun`` or ``accelerate launch``
  every process composes its own config, and their clocks may straddle a second; the first process to ask
  stores its stamp in the launcher's key-value store and all others read that one, so all ranks of a job
  write into ONE folder. The tasks of a multi-task ``srun`` step name it after the step instead
  (``outputs/slurm-<job id>.<step id>``). Hydra's sweep launchers (submitit) hand the submitting process's
  stamp to every job. Other launchers (mpirun) should pass ``hydra.run.dir=...`` explicitly.
* ``translate_legacy_argv`` turns ``--config FILE.py [--resume CKPT]`` into a generated primary config that
  lists our schema and groups, then the legacy values, so Hydra's run folder, ``--cfg job`` and overrides all
  behave as for a native config.
* ``user_errors`` (around ``main()``) and ``@exit_on_user_error`` (on the task function) turn a user's mistake
  (a ``ConfigError``, a path that is no dataset, a bad override, an unknown group option, a checkpoint that
  cannot be read or saved) into one line,
  ``error: ...``, and exit code 2; other errors, and all of them under ``HYDRA_FULL_ERROR=1``, keep their traceback.
"""

from __future__ import annotations

import atexit
import difflib
import functools
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import OmegaConf

from granite_docling.config import ConfigError, load_legacy_config

log = logging.getLogger(__name__)

_STAMP_KEY = "granite_docling/run_stamp"
_stamp: str | None = None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``"gpu[001-004,007],cpu1"`` -> ``"gpu001"``, ``"a,b"`` -> ``"a"``."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if first is None:
        raise ValueError(f"not a SLURM host list: {nodelist!r}")
    # Each bracket holds ranges and single numbers, zero-padded as written; the first host takes the first of each.
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first.group(0))


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks-per-node list, one count per node: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts = []
    for item in filter(None, spec.split(",")):
        found = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if found is None:
            raise ValueError(f"not a SLURM tasks-per-node list: {spec!r}")
        counts += [int(found.group(1))] * int(found.group(2) or 1)
    return counts


def _step_id(environ: Mapping[str, str]) -> int:
    return int(environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", "0")))


def slurm_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables for a task of a multi-task ``srun`` step, from SLURM's; ``{}`` elsewhere.

    Only ``srun`` sets ``SLURM_STEP_NUM_TASKS``. A batch script also has ``SLURM_PROCID=0``, but its
    ``SLURM_NTASKS`` counts the allocation's tasks, not the processes running: read as a world size, rank 0 would
    wait for peers nobody starts. Under torchrun / accelerate launch (``RANK`` or ``WORLD_SIZE`` set) and in a
    one-task step this returns ``{}`` too, so those runs stay as they are, the latter without a process group.
    ``MASTER_ADDR`` / ``MASTER_PORT`` from ``environ`` win; else the step's first host, and a port derived from
    the job and step id, so every task agrees without talking to the others.
    """
    if "RANK" in environ or "WORLD_SIZE" in environ or "SLURM_PROCID" not in environ:
        return {}
    world = int(environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if world <= 1:
        return {}
    node = int(environ.get("SLURM_NODEID", "0"))
    counts = tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or "")
    if node < len(counts):
        local_world = counts[node]
    elif "SLURM_NTASKS_PER_NODE" in environ:
        local_world = int(environ["SLURM_NTASKS_PER_NODE"])
    else:
        local_world = world // int(environ.get("SLURM_STEP_NUM_NODES", environ.get("SLURM_NNODES", "1")))
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    job = int(environ.get("SLURM_JOB_ID", environ.get("SLURM_JOBID", "0")))
    # 15000-31999: below Linux's ephemeral ports; x7 (coprime to 17000) keeps the steps of nearby jobs apart.
    port = 15000 + (7 * job + _step_id(environ)) % 17000
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(max(1, local_world)),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1"),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(port),
    }


def apply_slurm_environment(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set ``slurm_environment`` into ``environ`` (variables already set are kept); returns what it derived.

    Call before Hydra composes the config (``rank_suffix`` and ``run_stamp`` read these) and before Accelerate
    starts; calling it again changes nothing.
    """
    derived = slurm_environment(environ)
    for key, value in derived.items():
        environ.setdefault(key, value)
    ntasks = int(environ.get("SLURM_NTASKS", "1"))
    if not derived and ntasks > 1 and "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" not in environ:
        log.warning(
            "this SLURM job has %d tasks, but this process was not started by srun, so it runs as one "
            "process; start it with `srun python ...` to use them all",
            ntasks,
        )
    return derived


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


def run_stamp() -> str:
    """'YYYY-MM-DD/HH-MM-SS' for this run, the same on every process of a torchrun / accelerate launch;
    'slurm-<job id>.<step id>' on the tasks of a multi-task srun step."""
    global _stamp
    if _stamp is None:
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
        if world_size() > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            stamp = _agreed_stamp(stamp)
        elif world_size() > 1 and "SLURM_JOB_ID" in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ:
            stamp = f"slurm-{os.environ['SLURM_JOB_ID']}.{_step_id(os.environ)}"
        _stamp = stamp
    return _stamp


def register_resolvers() -> None:
    # run_stamp is cached: Hydra's load_sweep_config copies the resolver cache, so each job of a sweep launched
    # elsewhere (submitit) writes under the sweep folder the submitting process made and named. rank_suffix must
    # be evaluated by each process.
    for name, fn, use_cache in (("run_stamp", run_stamp, True), ("rank_suffix", rank_suffix, False)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=use_cache)


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


# ---------------------------------------------------------------------------------------------------------------
# A user's mistake: one line and exit code 2, not a stack trace

EXIT_USER_ERROR = 2  # a mistake in the command, the config or the data (as argparse's usage errors)
_user_full_error: bool | None = None  # HYDRA_FULL_ERROR=1 as the user set it; None outside user_errors()


def user_error_message(error: BaseException) -> str | None:
    """The one line that says what is wrong with the command, config or data; None for anything else (a bug,
    whose traceback is wanted)."""
    from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from granite_docling.checkpoint_files import CheckpointError, CheckpointSaveError
    from granite_docling.data.sample import BadSampleError
    from granite_docling.data.sources import DatasetNotFoundError
    from granite_docling.evaluation.server import ServerError

    user_errors = (ConfigError, DatasetNotFoundError, BadSampleError, CheckpointError, CheckpointSaveError, ServerError)
    if isinstance(error, user_errors):
        return str(error)
    if isinstance(error, OmegaConfBaseException):  # e.g. a bad ${interpolation}, met when the config is resolved
        return _omegaconf_line(error)
    if not isinstance(error, CompactHydraException):  # Hydra's own user errors: composition, override syntax
        return None
    lines = [line.strip() for line in str(error).split("\n\n")[0].splitlines()]  # not the config search path
    paragraph = "; ".join(line for line in lines if line)
    if isinstance(error, MissingConfigException):
        group = (error.missing_cfg_file or "").rpartition("/")[0]
        if error.options:
            return f"{paragraph.rstrip('.')}; choose from {', '.join(error.options)}"
        return f"{paragraph.rstrip('.')}; see conf/{group}/ for the choices" if group else paragraph
    if isinstance(error, OverrideParseException):
        return f"cannot parse the override {error.override!r}: {paragraph}"
    if isinstance(error.__cause__, OmegaConfBaseException):
        # 'Error merging override x=abc' / 'Could not override x' + the reason; not Hydra's '+x to append' hint,
        # which fails on our typed schema anyway
        return f"{str(error).splitlines()[0].rstrip('.')}: {_omegaconf_line(error.__cause__, with_key=False)}"
    return paragraph


def _omegaconf_line(error: BaseException, with_key: bool = True) -> str:
    """First line of an OmegaConf error (after its full key), with a "did you mean" for a misspelt key."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    line = str(error).splitlines()[0]
    key, schema = getattr(error, "key", None), getattr(error, "object_type", None)
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)) and key is not None and is_dataclass(schema):
        close = difflib.get_close_matches(str(key), [f.name for f in fields(schema)], n=1)
        line += f" (did you mean {close[0]!r}?)" if close else ""
    full_key = getattr(error, "full_key", None)
    return f"{full_key}: {line}" if with_key and full_key else line


def _traces_wanted() -> bool:
    return _user_full_error if _user_full_error is not None else os.environ.get("HYDRA_FULL_ERROR") == "1"


def _exit_with(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


@contextmanager
def user_errors() -> Iterator[None]:
    """Around an entry point's ``main()``: a user's mistake ends the process with one ``error: ...`` line on
    stderr and exit code 2; anything else keeps its full traceback, and so does everything under HYDRA_FULL_ERROR=1.

    Hydra prints an exception with a stack trace, and a composition error over several lines, unless
    HYDRA_FULL_ERROR=1, in which case it raises them on; so this sets HYDRA_FULL_ERROR=1 and words them here.
    """
    global _user_full_error
    before = os.environ.get("HYDRA_FULL_ERROR")
    _user_full_error, os.environ["HYDRA_FULL_ERROR"] = before == "1", "1"
    try:
        yield
    except Exception as error:
        message = None if _traces_wanted() else user_error_message(error)
        if message is None:
            raise
        _exit_with(message)
    finally:
        _user_full_error = None
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


def exit_on_user_error(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Decorate a Hydra task function (under ``@hydra.main``): a user's mistake ends a single run with one
    ``error: ...`` line (without Hydra's "Error executing job" line before it). In a sweep (``-m``) it is
    raised as Hydra expects: that job fails, the others run, and :func:`user_errors` words it at the end."""

    @functools.wraps(task)
    def run(cfg: Any) -> Any:
        try:
            return task(cfg)
        except Exception as error:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            message = None if _traces_wanted() else user_error_message(error)
            if message is None or HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            _exit_with(message)

    return run
