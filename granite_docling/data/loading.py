"""From config to DataLoaders, in one straight line::

    sources (sources.py) -> index (index.py) -> split (split.py) -> sampler (sampler.py) -> loader (this module)

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
   (``training.image_path=fast`` ships uint8 pages and tiles them on the device, ``stock`` runs the processor).

``dataset.<name>.streaming=true`` replaces steps 2-4 for data bigger than the disk
(:mod:`granite_docling.data.streaming`).

Bad samples never kill a run with ``on_bad_sample=skip``: records found bad while indexing are reported at the
start; images that fail to decode come out of the workers as :class:`Problem` entries in the batch, for the loop
to list once in ``bad_samples.jsonl``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from granite_docling.config import Config
from granite_docling.data.encoding import collate, encode_conversation, encode_conversation_fast
from granite_docling.data.image_tiles import ImageSpec
from granite_docling.data.images import ImageError, decode_image
from granite_docling.data.index import SourceIndex, cache_root, load_or_build
from granite_docling.data.sample import REASONS, BadSampleError, Problem, Sample
from granite_docling.data.sampler import GlobalBatchSampler
from granite_docling.data.sources import DatasetNotFoundError, ReadOptions, RecordError, Source, open_source
from granite_docling.data.split import scored_validation, split_positions

log = logging.getLogger(__name__)

IMAGE_PATHS = ("fast", "stock")


# ---------------------------------------------------------------------------------------------------------------
# The dataset: read, decode and encode in workers


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
    """Samples already in memory (tests, benchmarks, evaluation of a few samples)."""

    def __init__(self, name: str, samples: Sequence[Sample]):
        self.name, self.samples, self.options = name, list(samples), ReadOptions()

    def fingerprint(self) -> str:
        raise NotImplementedError("in-memory samples are not indexed")

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

    def __init__(
        self,
        parts: Sequence[Part],
        processor,
        image_longest_edge: dict[str, int | None],
        max_length: int | None = None,
        on_bad_sample: str = "skip",
        image_path: str = "stock",
    ):
        if image_path not in IMAGE_PATHS:
            raise ValueError(f"training.image_path={image_path!r} is not one of {', '.join(IMAGE_PATHS)}")
        self.parts = list(parts)
        self.source_names = [part.source.name for part in self.parts]
        self.sizes = [len(part.positions) for part in self.parts]
        self._offsets = np.cumsum([0, *self.sizes])
        self.processor = processor
        self.image_longest_edge = image_longest_edge
        self.max_length = max_length
        self.on_bad_sample = on_bad_sample
        self.image_path = image_path
        self._image_specs: dict[str, ImageSpec] = {}

    @classmethod
    def from_samples(cls, sources: dict[str, Sequence[Sample]], processor, image_longest_edge=None, **kwargs):
        parts = [Part(MemorySource(name, samples), np.arange(len(samples))) for name, samples in sources.items()]
        return cls(parts, processor, image_longest_edge or {}, **kwargs)

    def image_spec(self, dataset: str) -> ImageSpec:
        """The fast path's image settings for one source (its ``image_longest_edge`` applied)."""
        if dataset not in self._image_specs:
            edge = self.image_longest_edge.get(dataset)
            self._image_specs[dataset] = ImageSpec.from_processor(self.processor, edge)
        return self._image_specs[dataset]

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
            return self._bad(Problem(part.source.name, part.source.record_id(locator), error.reason, error.detail))
        return self.example(sample)

    def example(self, sample: Sample) -> dict | Problem:
        """Decode and encode one sample (a Problem when an image fails or it is too long)."""
        try:
            images = [decode_image(ref) for ref in sample.images]
        except ImageError as error:
            return self._bad(Problem(sample.dataset, sample.id, error.reason, error.detail))
        if self.image_path == "fast":
            example = encode_conversation_fast(self.processor, sample.turns, images, self.image_spec(sample.dataset))
        else:
            edge = self.image_longest_edge.get(sample.dataset)
            example = encode_conversation(self.processor, sample.turns, images, edge)
        length = len(example["input_ids"])
        if self.max_length is not None and length > self.max_length:
            return self._bad(Problem(sample.dataset, sample.id, "too_long", f"{length} > {self.max_length} tokens"))
        example["id"], example["dataset"] = sample.id, sample.dataset
        return example

    def _bad(self, problem: Problem) -> Problem:
        if self.on_bad_sample == "error":
            raise BadSampleError(problem)
        return problem


def collate_skipping_problems(items: Sequence[dict | Problem], pad_id: int) -> dict:
    """:func:`collate` over the good examples; the bad ones travel along as ``batch['problems']``."""
    examples = [item for item in items if not isinstance(item, Problem)]
    batch = collate(examples, pad_id) if examples else {}
    batch["problems"] = [item for item in items if isinstance(item, Problem)]
    batch["ids"] = [e["id"] for e in examples]
    batch["datasets"] = [e["dataset"] for e in examples]
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Putting it together


@dataclass
class Data:
    """Everything the loop needs from the data side."""

    train: Dataset  # a ConversationDataset, or a StreamingDataset
    val: ConversationDataset | None
    train_sampler: GlobalBatchSampler | None  # None when streaming
    problems: list[Problem] = field(default_factory=list)  # found before training
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # source -> (train, val)

    @property
    def streaming(self) -> bool:
        return self.train_sampler is None


def source_options(cfg: Config, key: str) -> ReadOptions:
    source = cfg.dataset[key]
    limits = [n for n in (source.max_samples, cfg.training.max_samples_per_dataset) if n is not None]
    max_samples = min(limits) if limits else None
    return ReadOptions(source.split, source.max_turns, max_samples, source.max_images_per_sample, source.unit)


def image_edges(cfg: Config) -> dict[str, int | None]:
    return {source.name or key: source.image_longest_edge for key, source in cfg.dataset.items()}


def indexed_sources(cfg: Config, processor, rank: int = 0) -> list[tuple[Source, SourceIndex]]:
    """Steps 1 and 2: every configured source and its index (built or reused)."""
    root = cache_root(cfg.training.index_cache_dir or cfg.training.length_cache_dir)
    edges, found = image_edges(cfg), []
    for key, config in cfg.dataset.items():
        name = config.name or key
        log.info("dataset %s: %s", name, config.path)
        source = open_source(config.path, name, source_options(cfg, key), config.format, root)
        index = load_or_build(source, processor, ImageSpec.from_processor(processor, edges[name]), root, rank)
        if index.problems and cfg.training.on_bad_sample == "error":
            raise BadSampleError(index.problems[0])
        if not len(index):
            summary = summarise(index.problems) or "it is empty"
            raise DatasetNotFoundError(f"dataset {name} ({config.path}) has no usable samples: {summary}")
        found.append((source, index))
    return found


def too_long(index: SourceIndex, positions: np.ndarray, max_length: int | None) -> np.ndarray:
    """The positions whose known length is over ``max_length`` (none without a limit)."""
    if max_length is None or not len(positions):
        return positions[:0]
    return positions[np.asarray(index.tokens)[positions] > max_length]


def build_data(cfg: Config, processor, rank: int = 0, world_size: int = 1) -> Data:
    t = cfg.training
    if any(source.streaming for source in cfg.dataset.values()):
        from granite_docling.data.streaming import build_streaming_data

        return build_streaming_data(cfg, processor, rank, world_size)
    train_parts, val_parts, problems, sizes = [], [], [], {}
    for source, index in indexed_sources(cfg, processor, rank):
        problems += index.problems
        train, val = split_positions(len(index), t.val_ratio, t.seed, source.name)
        for positions in (train, val):
            dropped = too_long(index, positions, t.max_length)
            problems += [
                Problem(
                    source.name,
                    source.record_id(index.locator(int(i))),
                    "too_long",
                    f"{int(index.tokens[i])} > {t.max_length} tokens",
                )
                for i in dropped
            ]
        if t.max_length is not None:
            train, val = (p[np.asarray(index.tokens)[p] <= t.max_length] for p in (train, val))
        scored = scored_validation(val, t.val_max_samples, t.seed, source.name)
        train_parts.append(Part(source, train, index))
        val_parts.append(Part(source, scored, index))
        sizes[source.name] = (len(train), len(scored))
        capped = f" (a validation scores {len(scored)} of the {len(val)} held out)" if len(scored) < len(val) else ""
        log.info("  %s: %d train, %d validation samples%s", source.name, len(train), len(val), capped)
    if not any(len(part.positions) for part in train_parts):
        raise DatasetNotFoundError(f"no training samples left: {summarise(problems) or 'every source is empty'}")
    edges = image_edges(cfg)
    warn_about_image_sizes(edges, processor)
    make = partial(
        ConversationDataset,
        processor=processor,
        image_longest_edge=edges,
        max_length=t.max_length,
        on_bad_sample=t.on_bad_sample,
        image_path=t.image_path,
    )
    val_parts = [part for part in val_parts if len(part.positions)]
    lengths = None
    if t.length_grouping or t.batch_tokens:
        lengths = tuple(
            np.concatenate([np.asarray(getattr(part.index, key))[part.positions] for part in train_parts])
            for key in ("tokens", "tiles")
        )
    if t.batch_tokens and (longer := int((lengths[0] > t.batch_tokens).sum())):
        longest = int(lengths[0].max())
        message = "%d training sample(s) are longer than training.batch_tokens=%d (the longest: %d tokens)"
        log.warning(message + ": each runs alone in its micro-batch", longer, t.batch_tokens, longest)
    weights = [source.weight for source in cfg.dataset.values()]
    sampler = GlobalBatchSampler(
        sizes=[len(part.positions) for part in train_parts],
        weights=weights,
        seed=t.seed,
        batch_size=t.batch_size,
        accumulation=t.gradient_accumulation_steps,
        rank=rank,
        world_size=world_size,
        lengths=lengths,
        group_by_length=t.length_grouping,
        batch_tokens=t.batch_tokens,
    )
    return Data(
        train=make(train_parts),
        val=make(val_parts) if val_parts else None,
        train_sampler=sampler,
        problems=problems,
        sizes=sizes,
    )


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


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def summarise(problems: Iterable[Problem]) -> str:
    """'3 bad samples skipped: 2 missing_image, 1 invalid_json' (empty when there are none)."""
    counts = Counter(p.reason for p in problems)
    if not counts:
        return ""
    parts = ", ".join(f"{n} {reason}" for reason, n in counts.most_common())
    return f"{sum(counts.values())} bad sample(s) skipped: {parts}"


def append_problems(path: Path, problems: Iterable[Problem], seen: set[tuple[str, str]] | None = None) -> int:
    """Append one JSON line per problem to ``path`` (the run's bad_samples.jsonl), skipping those in ``seen``
    (which it updates): each bad sample is listed once. Returns how many were new."""
    new = []
    for problem in problems:
        key = (problem.dataset, problem.file)
        if seen is None or key not in seen:
            new.append(problem)
            if seen is not None:
                seen.add(key)
    if new:
        with path.open("a", encoding="utf-8") as f:
            for problem in new:
                f.write(json.dumps({**problem.to_dict(), "meaning": REASONS.get(problem.reason, "")}) + "\n")
    return len(new)


def listed_problems(path: Path) -> set[tuple[str, str]]:
    """(dataset, file) of every problem already in ``path`` (a resumed run lists none twice)."""
    if not path.is_file():
        return set()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {(row["dataset"], row["file"]) for row in rows}
