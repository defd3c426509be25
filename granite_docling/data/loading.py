"""From the ``dataset.<name>`` entries to DataLoaders and the optimizer steps the loop iterates: the one place
both kinds of data are built from::

    build_data -> indexed.py (sources -> index -> split -> sampler) or streaming.py -> make_loader
               -> training_steps (IndexedSteps or StreamedSteps), validation_loader   (this module)

1. **Sources**: every ``dataset.<name>`` is opened where it lies (a Docling folder, parquet / Arrow files, a
   ``save_to_disk`` folder, a hub id), nothing read yet.
2. **Index**: per source, the good records' locators and (tokens, tiles), memory-mapped from a cache entry that
   one process builds (in parallel, with a progress bar) and every other process and later run reuses. A process
   holds a few numbers per sample, never the samples.
3. **Split**: the validation share, a pure function of (seed, source name); samples over ``max_length`` are
   dropped here, before training, from their known lengths.
4. **Sampler**: one global order per epoch, independent of the number of processes, cut into optimizer steps
   (length-grouped by default). The position is global: resuming on another number of processes continues it.
5. **Loader**: workers read each record by its locator, decode its images and encode it
   (``data.image_path=fast`` ships uint8 pages and tiles them on the device, ``stock`` runs the processor).

``dataset.<name>.streaming=true`` replaces steps 2-4 for data bigger than the disk
(:mod:`granite_docling.data.streaming`). Both encode a record with the same
:class:`~granite_docling.data.encoding.ExampleEncoder`.

Bad samples never kill a run with ``data.on_bad_sample=skip``: records found bad while indexing are reported at the
start; images that fail to decode come out of the workers as :class:`Problem` entries in the batch, for the loop
to list once in ``bad_samples.jsonl`` (:mod:`granite_docling.data.training_data`).

**Steps**: one interface for the loop, whatever the data: an epoch is a sequence of optimizer steps, each a list
of this process's micro-batches and the position after it.

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
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from granite_docling.config import DataConfig, DatasetConfig
from granite_docling.data.encoding import ExampleEncoder, collate_skipping_problems
from granite_docling.data.indexed import build_indexed_data
from granite_docling.data.sampler import BatchPlan, GlobalBatchSampler
from granite_docling.data.streaming import build_streaming_data
from granite_docling.data.training_data import Data, image_edges

log = logging.getLogger(__name__)

Step = tuple[list[dict], int]  # this process's micro-batches of one step, and the position after it


def build_data(
    datasets: Mapping[str, DatasetConfig],
    processor,
    data: DataConfig,
    plan: BatchPlan,
) -> Data:
    """The training and validation data of ``datasets`` for process ``plan.rank`` of ``plan.world_size``:
    streamed when the sources ask for it, else indexed. ``plan.seed`` (``training.seed``) draws the validation
    split and the order; ``plan.batch_size`` and ``plan.accumulation`` (``training.*``) cut it into micro-batches
    and optimizer steps."""
    edges = image_edges(datasets)
    warn_about_image_sizes(edges, processor)
    encoder = ExampleEncoder(processor, edges, data.max_length, data.on_bad_sample, data.image_path)
    if any(source.streaming for source in datasets.values()):
        return build_streaming_data(datasets, encoder, data, plan)
    return build_indexed_data(datasets, encoder, data, plan)


def warn_about_image_sizes(edges: dict[str, int | None], processor) -> None:
    """A source resized to another long edge than the processor's trains at a size the saved model is not told
    about: the saved processor (what AutoProcessor and docling load) keeps ``model.image_longest_edge``."""
    size = processor.image_processor.size
    saved = size["longest_edge"] if isinstance(size, dict) else size.longest_edge
    for name, edge in edges.items():
        if edge and edge != saved:
            log.warning(
                "dataset %s trains at a %d px long edge, but the saved processor resizes images to %d px "
                "(model.image_longest_edge): inference with the saved model uses %d px unless it is told otherwise. "
                "If your inference images are all like this source's, set model.image_longest_edge=%d instead.",
                name,
                edge,
                saved,
                saved,
                edge,
            )


def make_loader(
    dataset: Dataset, sampler: Sampler | Iterable[int] | None, batch_size: int, num_workers: int, pad_id: int
) -> DataLoader:
    """A DataLoader over ``dataset``: a :class:`GlobalBatchSampler` gives whole micro-batches, any other sampler
    (or index list) single indices batched by ``batch_size``; an iterable dataset batches itself."""
    batching = (
        {"batch_sampler": sampler}
        if isinstance(sampler, GlobalBatchSampler)
        else {"batch_size": batch_size, "sampler": sampler}
    )
    return DataLoader(
        dataset,
        **batching,
        num_workers=num_workers,
        collate_fn=partial(collate_skipping_problems, pad_id=pad_id),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )


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
