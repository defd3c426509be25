"""What the data side gives the run: the training and validation data the loop gets (:class:`Data`), the
readings of the ``dataset.<name>`` entries both kinds of data share, and the report of bad samples.

The data code never sees the whole experiment config: ``build_data`` (:mod:`granite_docling.data.loading`) takes
the ``dataset.<name>`` entries, the processor, the ``data`` section as it is, and the run values that cut the
samples into steps and share them out (a :class:`~granite_docling.data.sampler.BatchPlan`)::

    plan = BatchPlan(training.seed, training.batch_size, training.gradient_accumulation_steps, rank, world)
    data = build_data(cfg.dataset, processor, cfg.data, plan)

Bad samples are reported once: a summary line for the log and one JSON line each in the run's bad_samples.jsonl.
Records found bad while indexing are reported at the start; images that fail to decode come out of the workers
as :class:`Problem` entries in the batch, for the loop to list here once (a resumed run lists none twice).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from granite_docling.config import DatasetConfig
from granite_docling.data.sample import REASONS, Problem
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
