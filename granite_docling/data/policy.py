"""What the data side is told by a run (:class:`DataPolicy`) and what it gives back to the loop (:class:`Data`).

The data code never sees the whole experiment config: ``build_data`` takes the ``dataset.<name>`` entries, the
processor and a DataPolicy, the handful of ``training.*`` values that decide what is read and how it is batched::

    data = build_data(cfg.dataset, processor, DataPolicy.from_training(cfg.training), rank, world_size)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch.utils.data import Dataset

from granite_docling.config import DatasetConfig, TrainingConfig
from granite_docling.data.sample import Problem
from granite_docling.data.sampler import GlobalBatchSampler
from granite_docling.data.sources import ReadOptions


@dataclass(frozen=True)
class DataPolicy:
    """The ``training.*`` values the data side reads (their meaning: :class:`TrainingConfig`)."""

    seed: int
    val_ratio: float
    val_max_samples: int | None
    max_length: int | None
    max_samples_per_dataset: int | None
    on_bad_sample: str
    image_path: str
    batch_size: int
    accumulation: int
    num_workers: int
    length_grouping: bool
    batch_tokens: int | None
    index_cache: str | None  # the index cache folder; null: ~/.cache/granite_docling/index

    @classmethod
    def from_training(cls, t: TrainingConfig) -> DataPolicy:
        return cls(
            seed=t.seed,
            val_ratio=t.val_ratio,
            val_max_samples=t.val_max_samples,
            max_length=t.max_length,
            max_samples_per_dataset=t.max_samples_per_dataset,
            on_bad_sample=t.on_bad_sample,
            image_path=t.image_path,
            batch_size=t.batch_size,
            accumulation=t.gradient_accumulation_steps,
            num_workers=t.num_workers,
            length_grouping=t.length_grouping,
            batch_tokens=t.batch_tokens,
            index_cache=t.index_cache_dir or t.length_cache_dir,
        )


@dataclass
class Data:
    """Everything the loop needs from the data side."""

    train: Dataset  # a ConversationDataset, or a StreamingDataset
    val: Dataset | None  # a ConversationDataset
    train_sampler: GlobalBatchSampler | None  # None when streaming
    image_edges: dict[str, int | None]  # source -> its resize target (generation during training uses them too)
    problems: list[Problem] = field(default_factory=list)  # found before training
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # source -> (train, val)

    @property
    def streaming(self) -> bool:
        return self.train_sampler is None


def source_name(key: str, source: DatasetConfig) -> str:
    """A source's display name: ``dataset.<key>.name``, else its key."""
    return source.name or key


def read_options(source: DatasetConfig, max_samples_per_dataset: int | None) -> ReadOptions:
    """What to keep of a source's records; the smaller of its own and the run's sample cap applies."""
    limits = [n for n in (source.max_samples, max_samples_per_dataset) if n is not None]
    max_samples = min(limits) if limits else None
    return ReadOptions(source.split, source.max_turns, max_samples, source.max_images_per_sample, source.unit)


def image_edges(datasets: Mapping[str, DatasetConfig]) -> dict[str, int | None]:
    """Source display name -> its ``image_longest_edge`` (None: the processor's)."""
    return {source_name(key, source): source.image_longest_edge for key, source in datasets.items()}
