"""Streaming: hub-layout parquet shards read as a stream, for hub ids and data bigger than the local disk. The
formats that stream say so (``streams = True`` in :mod:`granite_docling.data.formats`); today that is the hub layout
(:mod:`~granite_docling.data.formats.hub`: its ``COLUMNS`` read from each row, parsed by its ``hub_sample``).

``dataset.<name>.streaming=true`` (every source, or none). Files are a local parquet file or folder, a URL
(``hf://``, ``s3://``, any fsspec filesystem) or a hub id, listed as ``hf://datasets/<id>/**/*.parquet``; all are
opened the same way, with ``pyarrow.parquet.ParquetFile``. Only the footers are read at the start (in threads):
they give every row group's row count, and nothing else is needed to plan an epoch::

    python train.py dataset=[docling_matix] dataset.docling_matix.streaming=true

* **Units and slots.** Every (file, row group) is a unit. Per epoch the units are put in a seeded order and dealt
  round-robin to ``S = world_size x K`` slots (``K = max(1, num_workers)``); slot ``rank x K + L`` is read by
  logical worker ``L`` of process ``rank``. A slot reads its units in order and shuffles rows within consecutive
  blocks of ``shuffle_buffer`` rows. Several sources are mixed per slot by seeded draws, each with probability
  proportional to its weight (null: to its rows) among those not yet exhausted. An epoch is every row once;
  weights set the mixing order, not the amounts.
* **Exact resume.** A slot's stream is a pure function of (seed, epoch, world_size, K) and the footers. Resuming
  after ``c`` micro-batches of a process replays the DataLoader's round-robin over its workers (known batch counts,
  exhausted workers dropping out) to find each worker's position, replays the mixing draws (vectorised, no
  reading), skips whole units by their row counts and whole blocks, and reads only the one partial block. Every
  row gives exactly one item (an encoded example or a :class:`Problem`), so the batch count stays exact.
* **Shuffle quality.** Coarse: the unit order is a full permutation, but rows stay within ``shuffle_buffer`` of
  their slot's stream, so a row group's rows (often a shard's neighbours) come out close together. Processes get
  different numbers of rows (up to a few units); the loop ends the epoch when any one runs short. No validation
  split, no length grouping.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from granite_docling.config import ConfigError, DataConfig, DatasetConfig
from granite_docling.data.encoding import ExampleEncoder
from granite_docling.data.formats import FORMATS
from granite_docling.data.formats.arrow import available_cpus, hub_files, reading
from granite_docling.data.formats.base import DatasetNotFoundError, ReadOptions, RecordError
from granite_docling.data.formats.docling_eval import GROUND_TRUTH, DoclingEvalSource
from granite_docling.data.formats.hub import COLUMNS, hub_sample, is_hub_id
from granite_docling.data.sample import Problem, Sample
from granite_docling.data.sampler import BatchPlan
from granite_docling.data.split import seeded_rng
from granite_docling.data.training_data import Data, read_options, source_name

log = logging.getLogger(__name__)

DRAW_CHUNK = 4096  # uniforms drawn at a time by the mixer; part of the stream's definition, keep it fixed


# ---------------------------------------------------------------------------------------------------------------
# Files and footers


def list_files(path: str, split: str) -> list[str]:
    """The parquet files of ``split``: a local file or folder, an fsspec URL, or a hub id (``org/name``)."""
    if "://" not in path and Path(path).exists():
        return [str(f) for f in hub_files(Path(path), split)]
    if "://" not in path and not is_hub_id(path):
        raise DatasetNotFoundError(
            f"{path} does not exist (streaming reads a parquet file or folder, a URL or a hub id)"
        )
    url = path if "://" in path else f"hf://datasets/{path}"
    fs, root = fsspec.core.url_to_fs(url)
    if fs.isfile(root):
        return [url]
    files = sorted(fs.glob(f"{root.rstrip('/')}/**/*.parquet"))
    of_split = [f for f in files if split in f[len(root) :]]
    return [fs.unstrip_protocol(f) for f in of_split or files]


def open_file(file: str):
    return fsspec.open(file, "rb").open() if "://" in file else open(file, "rb")


def footer(file: str) -> tuple[list[int], list[str]]:
    """(rows per row group, column names) from a parquet footer; a file that is no parquet is named in one line."""
    with reading(file), open_file(file) as f:
        metadata = pq.ParquetFile(f).metadata
    groups = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    return groups, metadata.schema.to_arrow_schema().names


@dataclass(frozen=True)
class Unit:
    """One row group: the ``rows`` first rows of group ``group`` of file ``file``, whose first row is ``first``."""

    file: int
    group: int
    first: int
    rows: int


@dataclass
class StreamSource:
    """One streaming source: its files and units (file order), its mixing share and its read options."""

    name: str
    files: list[str]
    units: list[Unit]
    options: ReadOptions
    weight: float | None = None
    shuffle_buffer: int = 1000

    @cached_property
    def unit_rows(self) -> np.ndarray:
        return np.array([unit.rows for unit in self.units], dtype=np.int64)

    @property
    def rows(self) -> int:
        return int(self.unit_rows.sum())


def open_stream_source(
    name: str, path: str, options: ReadOptions, weight: float | None = None, shuffle_buffer: int = 1000
) -> StreamSource:
    """List the files, read their footers, cut them into units (``max_samples`` rows at most)."""
    files = list_files(path, options.split)
    if not files or not all(f.endswith(".parquet") for f in files):
        raise DatasetNotFoundError(f"streaming dataset {name}: {path} has no parquet files (streaming reads parquet)")
    with ThreadPoolExecutor(min(32, len(files), 4 * available_cpus())) as pool:
        footers = list(pool.map(footer, files))
    units = []
    left = options.max_samples if options.max_samples is not None else math.inf
    for i, (groups, columns) in enumerate(footers):
        if GROUND_TRUTH in columns:
            raise DatasetNotFoundError(f"{files[i]}: {DoclingEvalSource.not_streamed}; drop streaming=true")
        if missing := set(COLUMNS) - set(columns):
            raise DatasetNotFoundError(f"{files[i]} lacks columns {sorted(missing)}; the hub layout has images, texts")
        for group, first in zip(range(len(groups)), np.cumsum([0, *groups[:-1]]), strict=True):
            if left > 0 and groups[group]:
                units.append(Unit(i, group, int(first), int(min(groups[group], left))))
                left -= units[-1].rows
    if not units:
        raise DatasetNotFoundError(f"streaming dataset {name}: the parquet files of {path} hold no rows")
    return StreamSource(name, files, units, options, weight, max(1, shuffle_buffer))


# ---------------------------------------------------------------------------------------------------------------
# One slot's stream of one source


def slot_units(source: StreamSource, seed: int, epoch: int, slots: int) -> list[np.ndarray]:
    """Unit indices read by each slot in the epoch, in reading order."""
    order = seeded_rng(seed, epoch, source.name, "units").permutation(len(source.units))
    return [order[slot::slots] for slot in range(slots)]


def unit_rows(source: StreamSource, unit: Unit, skip: int) -> Iterator[Sample | Problem]:
    """The unit's rows from row ``skip`` on, parsed (a :class:`Problem` for a bad one). Rows that cannot be read
    (damaged data pages) are each an ``unreadable_rows`` problem: every row still gives one item."""
    file = source.files[unit.file]
    given = skip  # the unit's rows given so far
    try:
        with open_file(file) as f:
            start = 0  # the batch's first row in the row group
            for batch in pq.ParquetFile(f).iter_batches(batch_size=64, row_groups=[unit.group], columns=COLUMNS):
                low = max(skip, start)
                high = min(start + batch.num_rows, unit.rows)
                for row, values in enumerate(batch.slice(low - start, max(0, high - low)).to_pylist(), low):
                    record_id = f"{Path(file).name}#{unit.first + row}"
                    try:
                        yield hub_sample(values, record_id, source.name, source.options)
                    except RecordError as error:
                        yield Problem(source.name, record_id, error.reason, error.detail)
                    given = row + 1
                start += batch.num_rows
                if start >= unit.rows:
                    return
    except (pa.ArrowException, OSError, ValueError) as error:  # pyarrow's errors on damaged pages; not RecordError
        detail = f"row group {unit.group}: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        for row in range(given, unit.rows):
            yield Problem(source.name, f"{Path(file).name}#{unit.first + row}", "unreadable_rows", detail)


def slot_stream(
    source: StreamSource, units: np.ndarray, seed: int, epoch: int, slot: int, skip: int = 0
) -> Iterator[Sample | Problem]:
    """The slot's rows of ``source`` from row ``skip`` on: units in order, rows shuffled in blocks."""
    rows = source.unit_rows[units]
    block = skip // source.shuffle_buffer
    position = block * source.shuffle_buffer  # first row of the first block to read
    first = int(np.searchsorted(np.cumsum(rows), position, side="right"))  # whole units before it are skipped
    offset = position - int(rows[:first].sum())
    reading = itertools.chain.from_iterable(
        unit_rows(source, source.units[u], offset if k == 0 else 0) for k, u in enumerate(units[first:])
    )
    while items := list(itertools.islice(reading, source.shuffle_buffer)):
        order = seeded_rng(seed, epoch, source.name, slot, block).permutation(len(items))
        yield from (items[i] for i in order[max(0, skip - position) :])
        position = position + len(items)
        block = block + 1


# ---------------------------------------------------------------------------------------------------------------
# Mixing sources, and the DataLoader's round-robin over workers


class Draws:
    """Which source gives each row of one slot: seeded draws by ``shares`` among sources with rows ``left``."""

    def __init__(self, rng: np.random.Generator, shares: Sequence[float], left: Sequence[int]):
        self.rng = rng
        self.shares = np.asarray(shares, dtype=np.float64)
        self.left = np.array(left, dtype=np.int64)
        self.uniforms = np.empty(0)
        self.used = 0

    def _choose(self, uniforms: np.ndarray) -> np.ndarray:
        cumulative = np.cumsum(np.where(self.left > 0, self.shares, 0.0))
        last = int(np.flatnonzero(self.left > 0)[-1])
        return np.minimum(np.searchsorted(cumulative, uniforms * cumulative[-1], side="right"), last)

    def _peek(self, n: int) -> np.ndarray:
        if self.used == len(self.uniforms):
            self.uniforms = self.rng.random(DRAW_CHUNK)
            self.used = 0
        return self.uniforms[self.used : self.used + n]

    def skip(self, n: int) -> np.ndarray:
        """Make the next ``n`` draws at once; rows drawn from each source."""
        drawn = np.zeros(len(self.left), dtype=np.int64)
        while n > 0 and self.left.sum() > 0:
            choices = self._choose(self._peek(n))
            counts = np.cumsum(np.eye(len(self.left), dtype=np.int64)[choices], axis=0)  # (draws, sources)
            # the first draw that exhausts a source: the active set (and so the odds) change after it
            run_out = np.flatnonzero(((counts >= self.left) & (self.left > 0)).any(axis=1))
            taken = int(run_out[0]) + 1 if len(run_out) else len(choices)
            used = np.bincount(choices[:taken], minlength=len(self.left))
            self.left = self.left - used
            drawn = drawn + used
            self.used = self.used + taken
            n = n - taken
        return drawn

    def next(self) -> int | None:
        """The source of the next row; None when every source is exhausted."""
        if self.left.sum() == 0:
            return None
        source = int(self._choose(self._peek(1))[0])
        self.left[source] -= 1
        self.used += 1
        return source


def worker_progress(consumed: int, batches: Sequence[int]) -> tuple[list[int], int]:
    """After ``consumed`` batches of a round-robin over workers giving ``batches[w]`` each (exhausted ones drop
    out, as in torch's DataLoader): (batches given by each worker, the worker giving the next)."""
    n = np.asarray(batches, dtype=np.int64)
    low = 0
    high = int(n.max(initial=0))  # the round j (batch j of every worker with more than j) holding it
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if np.minimum(n, middle).sum() <= consumed else (low, middle - 1)
    done = np.minimum(n, low)
    active = np.flatnonzero(n > low)
    extra = min(consumed - int(done.sum()), len(active))
    done[active[:extra]] += 1
    return done.tolist(), int(active[extra]) if extra < len(active) else 0


# ---------------------------------------------------------------------------------------------------------------
# The dataset


class StreamingDataset(IterableDataset):
    """This process's rows of every source, one encoded example (or Problem) per row. ``set_epoch(epoch,
    start_batches)`` before iterating: ``start_batches`` micro-batches of this process are already consumed."""

    def __init__(
        self,
        sources: Sequence[StreamSource],
        encoder: ExampleEncoder,
        plan: BatchPlan,
        num_workers: int,
    ):
        self.sources = list(sources)
        self.encoder = encoder
        self.seed = plan.seed
        self.batch_size = plan.batch_size
        self.workers = max(1, num_workers)
        self.rank = plan.rank
        self.world_size = plan.world_size
        total = sum(source.rows for source in self.sources) or 1
        self.shares = [s.weight if s.weight is not None else s.rows / total for s in self.sources]
        self.epoch = 0
        self.start_batches = 0

    def set_epoch(self, epoch: int, start_batches: int = 0) -> None:
        self.epoch = epoch
        self.start_batches = start_batches

    def _units(self, epoch: int) -> list[list[np.ndarray]]:  # [source][slot] -> unit indices
        return [slot_units(s, self.seed, epoch, self.world_size * self.workers) for s in self.sources]

    def slot_rows(self, epoch: int) -> np.ndarray:
        """(sources, slots): rows of each source that each slot reads in ``epoch``."""
        units = self._units(epoch)
        return np.array(
            [[s.unit_rows[u].sum() for u in slots] for s, slots in zip(self.sources, units, strict=True)],
            dtype=np.int64,
        )

    def worker_batches(self, epoch: int, rank: int | None = None) -> list[int]:
        """Micro-batches each logical worker of process ``rank`` (this one by default) gives in ``epoch``."""
        rank = self.rank if rank is None else rank
        rows = self.slot_rows(epoch).sum(axis=0)[rank * self.workers : (rank + 1) * self.workers]
        return [math.ceil(int(r) / self.batch_size) for r in rows]

    def steps_in_epoch(self, epoch: int, accumulation: int) -> int:
        """Optimizer steps of ``epoch``: every process needs ``accumulation`` micro-batches per step."""
        return min(sum(self.worker_batches(epoch, r)) for r in range(self.world_size)) // accumulation

    def rows(self, epoch: int, slot: int, skip: int = 0) -> Iterator[Sample | Problem]:
        """The slot's mixed stream from row ``skip`` on."""
        units = self._units(epoch)
        left = self.slot_rows(epoch)[:, slot]
        draws = Draws(seeded_rng(self.seed, epoch, "mix", slot), self.shares, left)
        skipped = draws.skip(skip)
        streams = [
            slot_stream(s, units[i][slot], self.seed, epoch, slot, int(skipped[i])) for i, s in enumerate(self.sources)
        ]
        while (source := draws.next()) is not None:
            yield next(streams[source])

    def __iter__(self) -> Iterator[dict | Problem]:
        info = get_worker_info()
        if (info.num_workers if info else 1) != self.workers:
            given = info.num_workers if info else 0
            raise ValueError(
                f"this StreamingDataset was built for {self.workers} DataLoader worker(s), not {given}: "
                "give it the loader's num_workers"
            )
        done, first = worker_progress(self.start_batches, self.worker_batches(self.epoch))
        worker = ((info.id if info else 0) + first) % self.workers  # the loader starts its round-robin at worker 0
        for item in self.rows(self.epoch, self.rank * self.workers + worker, done[worker] * self.batch_size):
            yield self.encoder.bad(item) if isinstance(item, Problem) else self.encoder(item)


def build_streaming_data(
    datasets: Mapping[str, DatasetConfig],
    encoder: ExampleEncoder,
    data: DataConfig,
    plan: BatchPlan,
) -> Data:
    """:class:`Data` whose ``train`` is a :class:`StreamingDataset` over every (streaming) source, cut by ``plan``."""
    if not all(source.streaming for source in datasets.values()):
        listed = ", ".join(f"{key}={source.streaming}" for key, source in datasets.items())
        raise ConfigError(f"dataset.<name>.streaming must be true for every source or for none ({listed})")
    sources = []
    for key, config in datasets.items():
        layout = FORMATS.get(config.format)  # None for auto: the footers tell (below)
        if layout is not None and not layout.streams:
            raise ConfigError(f"dataset {key}: {layout.not_streamed}")
        options = read_options(config, data.max_samples_per_dataset)
        source = open_stream_source(
            source_name(key, config), config.path, options, config.weight, config.shuffle_buffer
        )
        log.info(
            "streaming %s (%s): %d files, %d row groups, %d rows",
            source.name,
            config.path,
            len(source.files),
            len(source.units),
            source.rows,
        )
        sources.append(source)
    log.info("streaming: no validation split (data.val_ratio is ignored) and no length grouping")
    train = StreamingDataset(sources, encoder, plan, data.num_workers)
    return Data(
        train=train,
        val=None,
        train_sampler=None,
        image_edges=encoder.image_longest_edge,
        batch_size=plan.batch_size,
        accumulation=plan.accumulation,
        num_workers=data.num_workers,
        sizes={source.name: (source.rows, 0) for source in sources},
    )
