"""SLURM: the tasks of one ``srun`` step become one process group, as under torchrun.

``apply_slurm_environment`` sets the variables torchrun would (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) from SLURM's, so Accelerate initialises
``torch.distributed`` as under torchrun. A batch script, an ``salloc`` shell or a one-task step stays a plain
one-process run::

    srun --ntasks-per-node=4 python train.py ...     # see the README's SLURM section for a whole sbatch script
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)


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


def step_id(environ: Mapping[str, str]) -> int:
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
    port = 15000 + (7 * job + step_id(environ)) % 17000
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
