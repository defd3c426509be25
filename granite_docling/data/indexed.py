"""Indexed data: every source's records known before training, so the split, length grouping and token budgets
are planned from an index and a process holds a few numbers per sample, never the samples::

    sources (sources.py) -> index (index.py) -> split (split.py) -> sampler (sampler.py)

1. **Sources**: every ``dataset.<name>`` is opened where it lies (a Docling folder, parquet / Arrow files, a
   ``save_to_disk`` folder, a hub id), nothing read yet.
2. **Index**: per source, the good records' locators and (tokens, tiles), memory-mapped from a cache entry that
   one process builds (in parallel, with a progress bar) and every other process and later run reuses.
3. **Split**: the validation share, a pure function of (seed, source name); samples over ``max_length`` are
   dropped here, before training, from their known lengths.
4. **Sampler**: one global order per epoch, independent of the number of processes, cut into optimizer steps
   (length-grouped by default). The position is global: resuming on another number of processes continues it.

Workers then read each record by its locator and encode it (:class:`ConversationDataset`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from granite_docling.config import DataConfig, DatasetConfig
from granite_docling.data.encoding import ExampleEncoder
from granite_docling.data.image_tiles import ImageSpec
from granite_docling.data.index import SourceIndex, cache_root, load_or_build
from granite_docling.data.sample import BadSampleError, Problem, Sample
from granite_docling.data.sampler import BatchPlan, GlobalBatchSampler
from granite_docling.data.sources import DatasetNotFoundError, ReadOptions, RecordError, Source, open_source
from granite_docling.data.split import scored_validation, split_positions
from granite_docling.data.training_data import Data, image_edges, read_options, source_name, summarise

log = logging.getLogger(__name__)


@dataclass
class Part:
    """The records of one source that a dataset serves: positions into its index (or into the source itself)."""

    source: Source
    positions: np.ndarray  # int64 record positions
    index: SourceIndex | None = None  # None: positions are the source's own record numbers

    def locator(self, k: int) -> str | int:
        position = int(self.positions[k])
        return self.index.locator(position) if self.index is not None else self.source.locator(position)


class MemorySource(Source):
    """Samples already in memory (tests, benchmarks, evaluation of a few samples); never indexed, so it has no
    fingerprint."""

    def __init__(self, name: str, samples: Sequence[Sample]):
        self.name = name
        self.samples = list(samples)
        self.options = ReadOptions()

    def __len__(self) -> int:
        return len(self.samples)

    def locator(self, i: int) -> int:
        return i

    def record_id(self, locator: str | int) -> str:
        return self.samples[int(locator)].id

    def read(self, locator: str | int) -> Sample:
        return self.samples[int(locator)]


class ConversationDataset(Dataset):
    """Samples from several sources; ``[i]`` is an encoded example dict, or a :class:`Problem` when it is bad."""

    def __init__(self, parts: Sequence[Part], encoder: ExampleEncoder):
        self.parts = list(parts)
        self.encoder = encoder
        self.source_names = [part.source.name for part in self.parts]
        self.sizes = [len(part.positions) for part in self.parts]
        self._offsets = np.cumsum([0, *self.sizes])

    @classmethod
    def from_samples(cls, sources: Mapping[str, Sequence[Sample]], processor, image_longest_edge=None, **kwargs):
        """In-memory samples per source name; ``kwargs`` as :class:`ExampleEncoder` takes them."""
        parts = [Part(MemorySource(name, samples), np.arange(len(samples))) for name, samples in sources.items()]
        return cls(parts, ExampleEncoder(processor, image_longest_edge or {}, **kwargs))

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _where(self, index: int) -> tuple[Part, str | int]:
        p = int(np.searchsorted(self._offsets, index, side="right")) - 1
        part = self.parts[p]
        return part, part.locator(index - int(self._offsets[p]))

    def sample(self, index: int) -> Sample:
        """The ``index``-th sample, parsed (raises RecordError when it is bad)."""
        part, locator = self._where(index)
        return part.source.read(locator)

    def samples(self, limit: int) -> list[Sample]:
        """The first ``limit`` good samples (generation during training)."""
        found = []
        for index in range(len(self)):
            if len(found) == limit:
                break
            try:
                found.append(self.sample(index))
            except RecordError:
                continue
        return found

    def __getitem__(self, index: int) -> dict | Problem:
        part, locator = self._where(index)
        try:
            sample = part.source.read(locator)
        except RecordError as error:  # changed since it was indexed
            problem = Problem(part.source.name, part.source.record_id(locator), error.reason, error.detail)
            return self.encoder.bad(problem)
        return self.encoder(sample)


def indexed_sources(
    datasets: Mapping[str, DatasetConfig],
    processor,
    cache: Path,
    on_bad_sample: str = "skip",
    max_samples_per_dataset: int | None = None,
    rank: int = 0,
) -> list[tuple[Source, SourceIndex]]:
    """Steps 1 and 2: every source of ``datasets`` and its index (built, or reused from ``cache``)."""
    edges = image_edges(datasets)
    found = []
    for key, config in datasets.items():
        name = source_name(key, config)
        log.info("dataset %s: %s", name, config.path)
        source = open_source(config.path, name, read_options(config, max_samples_per_dataset), config.format, cache)
        index = load_or_build(source, processor, ImageSpec.from_processor(processor, edges[name]), cache, rank)
        if index.problems and on_bad_sample == "error":
            raise BadSampleError(index.problems[0])
        if not len(index):
            summary = summarise(index.problems) or "it is empty"
            raise DatasetNotFoundError(f"dataset {name} ({config.path}) has no usable samples: {summary}")
        found.append((source, index))
    return found


def too_long(source: Source, index: SourceIndex, positions: np.ndarray, max_length: int | None) -> list[Problem]:
    """A problem for each of ``positions`` whose known length is over ``max_length`` (none without a limit)."""
    if max_length is None or not len(positions):
        return []
    tokens = np.asarray(index.tokens)
    return [
        Problem(
            source.name, source.record_id(index.locator(int(i))), "too_long", f"{int(tokens[i])} > {max_length} tokens"
        )
        for i in positions[tokens[positions] > max_length]
    ]


def fitting(index: SourceIndex, positions: np.ndarray, max_length: int | None) -> np.ndarray:
    """The positions whose known length is at most ``max_length`` (all without a limit)."""
    if max_length is None:
        return positions
    return positions[np.asarray(index.tokens)[positions] <= max_length]


def build_indexed_data(
    datasets: Mapping[str, DatasetConfig],
    encoder: ExampleEncoder,
    data: DataConfig,
    plan: BatchPlan,
) -> Data:
    """Steps 1-4 for every source of ``datasets``; the training and validation datasets read through ``encoder``,
    the training split cut into steps by ``plan``."""
    cache = cache_root(data.index_cache_dir)
    train_parts = []
    val_parts = []
    problems = []
    sizes = {}
    for source, index in indexed_sources(
        datasets, encoder.processor, cache, data.on_bad_sample, data.max_samples_per_dataset, plan.rank
    ):
        problems += index.problems
        train, val = split_positions(len(index), data.val_ratio, plan.seed, source.name)
        problems += too_long(source, index, train, data.max_length) + too_long(source, index, val, data.max_length)
        train = fitting(index, train, data.max_length)
        val = fitting(index, val, data.max_length)
        scored = scored_validation(val, data.val_max_samples, plan.seed, source.name)
        train_parts.append(Part(source, train, index))
        val_parts.append(Part(source, scored, index))
        sizes[source.name] = (len(train), len(scored))
        capped = f" (a validation scores {len(scored)} of the {len(val)} held out)" if len(scored) < len(val) else ""
        log.info("  %s: %d train, %d validation samples%s", source.name, len(train), len(val), capped)
    if not any(len(part.positions) for part in train_parts):
        raise DatasetNotFoundError(f"no training samples left: {summarise(problems) or 'every source is empty'}")
    val_parts = [part for part in val_parts if len(part.positions)]
    return Data(
        train=ConversationDataset(train_parts, encoder),
        val=ConversationDataset(val_parts, encoder) if val_parts else None,
        train_sampler=training_sampler(train_parts, [source.weight for source in datasets.values()], data, plan),
        image_edges=encoder.image_longest_edge,
        batch_size=plan.batch_size,
        accumulation=plan.accumulation,
        num_workers=data.num_workers,
        problems=problems,
        sizes=sizes,
    )


def training_sampler(
    parts: Sequence[Part],
    weights: Sequence[float | None],
    data: DataConfig,
    plan: BatchPlan,
) -> GlobalBatchSampler:
    """The sampler of the training parts, which knows every sample's (tokens, tiles) from the index: to group and
    budget them, and to start each epoch with its longest sample."""
    lengths = tuple(
        np.concatenate([np.asarray(getattr(part.index, key))[part.positions] for part in parts])
        for key in ("tokens", "tiles")
    )
    if data.batch_tokens and (longer := int((lengths[0] > data.batch_tokens).sum())):
        longest = int(lengths[0].max())
        message = "%d training sample(s) are longer than data.batch_tokens=%d (the longest: %d tokens)"
        log.warning(message + ": each runs alone in its micro-batch", longer, data.batch_tokens, longest)
    return GlobalBatchSampler(
        sizes=[len(part.positions) for part in parts],
        weights=weights,
        plan=plan,
        lengths=lengths,
        group_by_length=data.length_grouping,
        batch_tokens=data.batch_tokens,
    )
