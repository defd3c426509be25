"""From the ``dataset.<name>`` entries to DataLoaders: the one place both kinds of data are built from::

    build_data -> indexed.py (sources -> index -> split -> sampler) or streaming.py -> make_loader (this module)

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
:class:`~granite_docling.data.examples.ExampleEncoder`.

Bad samples never kill a run with ``data.on_bad_sample=skip``: records found bad while indexing are reported at the
start; images that fail to decode come out of the workers as :class:`Problem` entries in the batch, for the loop
to list once in ``bad_samples.jsonl`` (:mod:`granite_docling.data.problems`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from granite_docling.config import DataConfig, DatasetConfig
from granite_docling.data.examples import ExampleEncoder, collate_skipping_problems
from granite_docling.data.indexed import build_indexed_data
from granite_docling.data.policy import Data, image_edges
from granite_docling.data.sampler import GlobalBatchSampler
from granite_docling.data.streaming import build_streaming_data

log = logging.getLogger(__name__)


def build_data(
    datasets: Mapping[str, DatasetConfig],
    processor,
    data: DataConfig,
    *,
    seed: int,
    batch_size: int,
    accumulation: int,
    rank: int = 0,
    world_size: int = 1,
) -> Data:
    """The training and validation data of ``datasets`` for process ``rank`` of ``world_size``: streamed when
    the sources ask for it, else indexed. ``seed`` (``training.seed``) draws the validation split and the order;
    ``batch_size`` and ``accumulation`` (``training.*``) cut it into micro-batches and optimizer steps."""
    edges = image_edges(datasets)
    warn_about_image_sizes(edges, processor)
    encoder = ExampleEncoder(processor, edges, data.max_length, data.on_bad_sample, data.image_path)
    if any(source.streaming for source in datasets.values()):
        return build_streaming_data(datasets, encoder, data, seed, batch_size, accumulation, rank, world_size)
    return build_indexed_data(datasets, encoder, data, seed, batch_size, accumulation, rank, world_size)


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
