"""From config to DataLoaders: read every source, split off validation, mix, order, shard, skip bad samples.

* The validation split is a pure function of (seed, source name): the same samples are held out on every run
  and every process, from every source.
* The epoch order is a pure function of (seed, epoch): :class:`EpochSampler` yields this process's shard of
  it from any position, which is how a resumed run continues at the exact next batch.
  :class:`LengthGroupedSampler` (``training.length_grouping``, the default) serves the same samples in batches
  of similar length, known up front (``granite_docling.data.grouping``).
* ``training.image_path=fast`` (the default) ships uint8 pages out of the workers and tiles them on the device
  (``granite_docling.data.image_tiles``); ``stock`` runs the processor in the workers.
* Bad samples never kill a run with ``on_bad_sample=skip``: unreadable records are dropped when read, and
  images that fail to decode (or samples over ``max_length``) come out of the workers as :class:`Problem`
  entries in the batch, for the loop to count and log in ``bad_samples.jsonl``.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from granite_docling.config import Config
from granite_docling.data.encoding import collate, encode_conversation, encode_conversation_fast
from granite_docling.data.grouping import grouped_batches, sample_lengths
from granite_docling.data.image_tiles import ImageSpec
from granite_docling.data.images import ImageError, decode_image
from granite_docling.data.readers import ReadOptions, read_dataset
from granite_docling.data.sample import REASONS, BadSampleError, Problem, Sample

log = logging.getLogger(__name__)

IMAGE_PATHS = ("fast", "stock")


# ---------------------------------------------------------------------------------------------------------------
# Splits and order: pure functions of the seed


def split_validation(samples: Sequence[Sample], val_ratio: float, seed: int, name: str) -> tuple[list, list]:
    """(train, val): a seeded random ``val_ratio`` share of one source; at least one sample when the ratio > 0."""
    if val_ratio <= 0 or len(samples) < 2:
        return list(samples), []
    indices = list(range(len(samples)))
    random.Random(f"{seed}/{name}").shuffle(indices)
    n_val = min(len(samples) - 1, max(1, round(len(samples) * val_ratio)))
    held_out = set(indices[:n_val])
    train = [s for i, s in enumerate(samples) if i not in held_out]
    val = [s for i, s in enumerate(samples) if i in held_out]
    return train, val


def mixture_counts(sizes: Sequence[int], weights: Sequence[float | None]) -> list[int]:
    """Samples per epoch from each source. No weights: every sample once. With weights: an epoch keeps the total
    size and gives source i the share ``w_i / sum(w)``; sources without a weight count at their natural share."""
    total = sum(sizes)
    if all(w is None for w in weights) or total == 0:
        return list(sizes)
    shares = [w if w is not None else size / total for w, size in zip(weights, sizes, strict=True)]
    return [round(total * share / sum(shares)) if size else 0 for share, size in zip(shares, sizes, strict=True)]


def epoch_order(sizes: Sequence[int], weights: Sequence[float | None], seed: int, epoch: int) -> list[int]:
    """Indices into the concatenated sources for one epoch, shuffled; a pure function of (seed, epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order, offset = [], 0
    for size, count in zip(sizes, mixture_counts(sizes, weights), strict=True):
        drawn: list[int] = []
        while len(drawn) < count:  # a source drawn more often than its size goes round again, reshuffled
            cycle = list(range(offset, offset + size))
            rng.shuffle(cycle)
            drawn += cycle
        order += drawn[:count]
        offset += size
    rng.shuffle(order)
    return order


class EpochSampler(Sampler[int]):
    """This process's shard of :func:`epoch_order`, from a start position within the shard.

    Every process gets the same number of samples (the last ``< world_size`` are dropped), so no process waits
    for a gradient sync that never comes. ``set_epoch(epoch, start)`` skips the first ``start`` samples of the
    shard: resuming after ``k`` micro-batches of size ``b`` is ``start = k * b``.
    """

    def __init__(
        self, sizes: Sequence[int], weights: Sequence[float | None], seed: int, rank: int = 0, world_size: int = 1
    ):
        self.sizes, self.weights, self.seed = list(sizes), list(weights), seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def shard(self) -> list[int]:
        order = epoch_order(self.sizes, self.weights, self.seed, self.epoch)
        usable = len(order) - len(order) % self.world_size
        return order[:usable][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start :])

    def __len__(self) -> int:
        total = sum(mixture_counts(self.sizes, self.weights))
        return total // self.world_size - self.start


class LengthGroupedSampler(EpochSampler):
    """:class:`EpochSampler` whose shard is ordered in batches of similar (tokens, tiles): a drop-in replacement.

    The same samples per epoch (:func:`epoch_order`, mixture included) and the same shard sizes; every run of
    ``batch_size`` indices is one batch of :func:`~granite_docling.data.grouping.grouped_batches` (all full but
    possibly the epoch's last), so the DataLoader's batches are the grouped ones, and every process gets the same
    number of batches of the same sizes. ``set_epoch(epoch, start)`` resumes at batch ``start // batch_size``.
    """

    def __init__(self, lengths: Sequence[tuple[int, int]], sizes: Sequence[int], weights: Sequence[float | None],
                 seed: int, batch_size: int, rank: int = 0, world_size: int = 1):  # fmt: skip
        super().__init__(sizes, weights, seed, rank, world_size)
        assert len(lengths) == sum(sizes), "one (tokens, tiles) per sample of the concatenated sources"
        self.lengths, self.batch_size = list(lengths), batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        shard_size = sum(mixture_counts(self.sizes, self.weights)) // self.world_size
        if start % self.batch_size and start < shard_size:
            raise ValueError(f"start={start} is not at a batch boundary (batch_size {self.batch_size})")
        super().set_epoch(epoch, start)

    def batches(self) -> list[list[int]]:
        """This process's batches of the current epoch, in order."""
        order = epoch_order(self.sizes, self.weights, self.seed, self.epoch)
        order = order[: len(order) - len(order) % self.world_size]
        grouped = grouped_batches(order, self.lengths, self.batch_size, self.world_size, self.seed, self.epoch)
        return [batch[self.rank] for batch in grouped]

    def shard(self) -> list[int]:
        return [i for batch in self.batches() for i in batch]


# ---------------------------------------------------------------------------------------------------------------
# The dataset: decode and encode in workers


class ConversationDataset(Dataset):
    """Samples from several sources; ``[i]`` is an encoded example dict, or a :class:`Problem` when it is bad."""

    def __init__(self, sources: dict[str, list[Sample]], processor, image_longest_edge: dict[str, int | None],
                 max_length: int | None = None, on_bad_sample: str = "skip", image_path: str = "stock"):  # fmt: skip
        if image_path not in IMAGE_PATHS:
            raise ValueError(f"training.image_path={image_path!r} is not one of {', '.join(IMAGE_PATHS)}")
        self.source_names = list(sources)
        self.samples = [s for samples in sources.values() for s in samples]
        self.sizes = [len(samples) for samples in sources.values()]
        self.processor = processor
        self.image_longest_edge = image_longest_edge
        self.max_length = max_length
        self.on_bad_sample = on_bad_sample
        self.image_path = image_path
        self._image_specs: dict[str, ImageSpec] = {}

    def image_spec(self, dataset: str) -> ImageSpec:
        """The fast path's image settings for one source (its ``image_longest_edge`` applied)."""
        if dataset not in self._image_specs:
            edge = self.image_longest_edge.get(dataset)
            self._image_specs[dataset] = ImageSpec.from_processor(self.processor, edge)
        return self._image_specs[dataset]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | Problem:
        sample = self.samples[index]
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

    train: ConversationDataset
    val: ConversationDataset | None
    train_sampler: EpochSampler  # a LengthGroupedSampler with training.length_grouping
    problems: list[Problem] = field(default_factory=list)  # found while reading, before training
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # source -> (train, val)


def read_sources(cfg: Config) -> tuple[dict[str, list[Sample]], list[Problem]]:
    """Every configured source's samples (keyed by display name) and the problems met while reading them."""
    sources, problems = {}, []
    cap = cfg.training.max_samples_per_dataset
    for key, source in cfg.dataset.items():
        name = source.name or key
        limits = [n for n in (source.max_samples, cap) if n is not None]
        options = ReadOptions(
            source.split, source.max_turns, min(limits) if limits else None, source.max_images_per_sample
        )
        log.info("reading dataset %s from %s", name, source.path)
        samples, found = read_dataset(source.path, name, options, source.format)
        if found and cfg.training.on_bad_sample == "error":
            raise BadSampleError(found[0])
        if not samples:
            raise ValueError(
                f"dataset {name} ({source.path}) has no usable samples: {summarise(found) or 'it is empty'}"
            )
        sources[name], problems = samples, problems + found
    return sources, problems


def build_data(cfg: Config, processor, rank: int = 0, world_size: int = 1) -> Data:
    sources, problems = read_sources(cfg)
    train_sources, val_sources, sizes = {}, {}, {}
    for name, samples in sources.items():
        train_sources[name], val_sources[name] = split_validation(
            samples, cfg.training.val_ratio, cfg.training.seed, name
        )
        sizes[name] = (len(train_sources[name]), len(val_sources[name]))
        log.info("  %s: %d train, %d validation samples", name, *sizes[name])
    edges = {source.name or key: source.image_longest_edge for key, source in cfg.dataset.items()}
    warn_about_image_sizes(edges, processor)
    make = partial(ConversationDataset, processor=processor, image_longest_edge=edges,
                   max_length=cfg.training.max_length, on_bad_sample=cfg.training.on_bad_sample,
                   image_path=cfg.training.image_path)  # fmt: skip
    train = make(train_sources)
    val = make({k: v for k, v in val_sources.items() if v}) if any(val_sources.values()) else None
    weights = [source.weight for source in cfg.dataset.values()]
    t = cfg.training
    if t.length_grouping:
        lengths = source_lengths(processor, sources, train_sources, edges, t.length_cache_dir)
        sampler = LengthGroupedSampler(lengths, train.sizes, weights, t.seed, t.batch_size, rank, world_size)
    else:
        sampler = EpochSampler(train.sizes, weights, t.seed, rank, world_size)
    return Data(train=train, val=val, train_sampler=sampler, problems=problems, sizes=sizes)


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
                name, edge, saved, saved, edge,
            )  # fmt: skip


def source_lengths(processor, sources: dict[str, list[Sample]], train_sources: dict[str, list[Sample]],
                   edges: dict[str, int | None], cache_dir: str | None) -> list[tuple[int, int]]:  # fmt: skip
    """(tokens, tiles) of every training sample, in the order of the concatenated ``train_sources``. Counted (and
    cached) per whole source, so that another ``val_ratio`` or seed reuses the cache."""
    lengths = []
    for name, samples in sources.items():
        counted = sample_lengths(processor, samples, ImageSpec.from_processor(processor, edges.get(name)), cache_dir)
        by_id = {sample.id: length for sample, length in zip(samples, counted, strict=True)}
        lengths += [by_id[sample.id] for sample in train_sources[name]]
    return lengths


def make_loader(dataset: ConversationDataset, sampler: Sampler | Iterable[int], batch_size: int, num_workers: int,
                pad_id: int) -> DataLoader:  # fmt: skip
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
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


def append_problems(path: Path, problems: Iterable[Problem]) -> None:
    """Append one JSON line per problem to ``path`` (the run's bad_samples.jsonl)."""
    problems = list(problems)
    if problems:
        with path.open("a", encoding="utf-8") as f:
            for problem in problems:
                f.write(json.dumps({**problem.to_dict(), "meaning": REASONS.get(problem.reason, "")}) + "\n")
