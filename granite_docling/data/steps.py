"""One interface for the loop, whatever the data: an epoch is a sequence of optimizer steps, each a list of this
process's micro-batches and the position after it.

* :class:`IndexedSteps` (indexed data): the sampler says how many micro-batches each step has (``accumulation``,
  or as many as a token budget needs); the position is global, samples of the epoch's one order, so a run may
  resume on another number of processes.
* :class:`StreamedSteps` (``dataset.<name>.streaming=true``): ``accumulation`` micro-batches a step; the streams
  of the processes differ in length, so the epoch ends, on every process, at the first step any process cannot
  fill; the position is this process's micro-batches, exact on the same processes and workers only.

Both give :meth:`planned_steps` (steps per epoch, for the schedule), :meth:`epoch` (the steps from a position)
and :meth:`heaviest` (the micro-batch a memory probe trains before the first step: indexed data only, a stream's
lengths are unknown until read); the loop never asks which kind it has.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import NamedTuple

from granite_docling.data.loading import make_loader
from granite_docling.data.policy import Data

Step = tuple[list[dict], int]  # this process's micro-batches of one step, and the position after it


class Heaviest(NamedTuple):
    batch: dict  # this process's heaviest micro-batch ahead, collated (no ``ids`` where it has none)
    next_step: bool  # whether the next step holds it


class IndexedSteps:
    position_unit = "samples"
    exact_on_any_shape = True  # the position is global: any number of processes continues the same order

    def __init__(self, data: Data, loader):
        self.sampler = data.train_sampler
        self.loader = loader

    def planned_steps(self, num_epochs: int) -> list[int]:
        return [self.sampler.steps_per_epoch] * num_epochs

    def epoch(self, epoch: int, position: int) -> Iterator[Step]:
        self.sampler.set_epoch(epoch, position)
        batches = iter(self.loader)
        while group := list(itertools.islice(batches, self.sampler.micro_steps(position))):
            position = self.sampler.advance(position)
            yield group, position

    def heaviest(self, epoch: int, position: int) -> Heaviest:
        """This process's micro-batch with the most padded tokens from ``position`` to the end of the epoch (the
        next epoch's, at the end of this one), read and collated, and whether the next step holds it."""
        if position >= self.sampler.epoch_size:
            epoch += 1
            position = 0
        self.sampler.set_epoch(epoch, position)
        indices, step_position = self.sampler.heaviest_batch(position)
        batch = self.loader.collate_fn([self.loader.dataset[i] for i in indices])
        return Heaviest(batch, step_position == position)


class StreamedSteps:
    position_unit = "micro-batches"
    exact_on_any_shape = False  # a stream's position is exact on the same processes and workers only

    def __init__(self, data: Data, loader, accumulation: int, any_process: Callable[[bool], bool]):
        self.dataset = data.train
        self.loader = loader
        self.accumulation = accumulation
        self.any_process = any_process  # True on every process when it is True on any (an all-reduce)

    def planned_steps(self, num_epochs: int) -> list[int]:
        """From the parquet footers: the steps until the first process runs short, per epoch."""
        return [self.dataset.steps_in_epoch(epoch, self.accumulation) for epoch in range(num_epochs)]

    def epoch(self, epoch: int, position: int) -> Iterator[Step]:
        self.dataset.set_epoch(epoch, position)
        batches = iter(self.loader)
        while True:
            group = list(itertools.islice(batches, self.accumulation))
            if self.any_process(len(group) < self.accumulation):
                return
            position += len(group)
            yield group, position

    def heaviest(self, epoch: int, position: int) -> None:
        """None: a stream's lengths are unknown until it is read, so there is nothing to probe ahead."""
        return None


def validation_loader(data: Data, pad_id: int, rank: int, world_size: int):
    """A DataLoader over this process's share of the validation split (no shuffling, no padding); None without
    one."""
    if data.val is None:
        return None
    shard = range(rank, len(data.val), world_size)
    return make_loader(data.val, shard, data.batch_size, data.num_workers, pad_id)


def training_steps(data: Data, pad_id: int, any_process: Callable[[bool], bool]) -> IndexedSteps | StreamedSteps:
    """The training split's steps, over a DataLoader of ``data.num_workers`` workers."""
    loader = make_loader(data.train, data.train_sampler, data.batch_size, data.num_workers, pad_id)
    if data.train_sampler is None:
        return StreamedSteps(data, loader, data.accumulation, any_process)
    return IndexedSteps(data, loader)
