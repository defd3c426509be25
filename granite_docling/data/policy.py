"""What the data side gives back to the loop (:class:`Data`), and the small helpers both kinds of data share.

The data code never sees the whole experiment config: ``build_data`` takes the ``dataset.<name>`` entries, the
processor, the ``data`` section as it is, and the three run values that cut the samples into steps::

    data = build_data(cfg.dataset, processor, cfg.data, seed=t.seed, batch_size=t.batch_size,
                      accumulation=t.gradient_accumulation_steps, rank=rank, world_size=world)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch.utils.data import Dataset

from granite_docling.config import DatasetConfig
from granite_docling.data.sample import Problem
from granite_docling.data.sampler import GlobalBatchSampler
from granite_docling.data.sources import ReadOptions


@dataclass
class Data:
    """Everything the loop needs from the data side."""

    train: Dataset  # a ConversationDataset, or a StreamingDataset
    val: Dataset | None  # a ConversationDataset
    train_sampler: GlobalBatchSampler | None  # None when streaming
    image_edges: dict[str, int | None]  # source -> its resize target (generation during training uses them too)
    batch_size: int  # samples per micro-batch (under data.batch_tokens: the validation's; training packs by tokens)
    accumulation: int  # micro-batches per optimizer step (a streamed step's count; the sampler knows its own)
    num_workers: int  # DataLoader workers per process (a stream is cut for exactly this many)
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
