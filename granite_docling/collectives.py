"""What every process of a run computes together: sums over the processes, a flag any of them raised, and the
gather of every process's list (bad samples, RNG states). Each is a collective: every process calls it, in the
same order.

    stop_votes, bad_count = sum_over_processes(accelerator, float(stop.requested), float(len(problems)))
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object


def sum_over_processes(accelerator: Accelerator, *values: float) -> list[float]:
    """Each of ``values`` summed over every process (an all-reduce in float64); themselves on one process."""
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist() if accelerator.num_processes > 1 else tensor.tolist()


def any_process_true(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (an all-reduce)."""
    return sum_over_processes(accelerator, float(flag))[0] > 0


def gather_lists(accelerator: Accelerator, items: list) -> list:
    """Every process's ``items`` in one list, by rank (the bad samples a step met, for the main process to list;
    every process's RNG state, for a checkpoint); ``items`` themselves on one process."""
    return gather_object(items) if accelerator.num_processes > 1 else items
