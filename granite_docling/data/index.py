"""The index: per source, where each good record is and its (tokens, tiles), built once and memory-mapped.

A process never holds a list of samples. It holds, per source, three memory-mapped arrays in a cache entry:
the records' locators (annotation file names, or row numbers of the Arrow table), their token counts and their
tile counts: 8-40 bytes per record on disk, shared by every process that maps them, and no Python object per
record. Records are read and parsed in loader workers, by locator.

* **Built once per dataset version.** The entry's key is the source's fingerprint (every annotation file's name,
  size and modification time, or the parquet / Arrow files' and the hub revision's) plus everything the lengths
  depend on (tokenizer, image settings, ``max_turns``, ``max_images_per_sample``, ``max_samples``). A changed,
  added or removed file gives another key, and so a new build.
* **In parallel, with progress.** Records are parsed and counted in chunks by a pool of processes (all CPUs of
  this machine, at most :data:`MAX_PROCESSES`); small sources are counted in the calling process.
* **Shared.** A file lock beside the entry lets one process build while every other process that needs the same
  entry waits, then maps what the first wrote: one build per node, or per shared filesystem when
  ``data.index_cache_dir`` is on one (``flock``, which NFS carries between hosts; Lustre needs its ``flock``
  mount option). The kernel drops the lock of a process that dies, so a killed builder never blocks a start.
* **Whole or absent.** Entries are written to a temporary folder, flushed to the disk and renamed into place
  (:mod:`granite_docling.atomic_folders`); ``meta.json``, written last, lists every file's size, and an entry whose
  files do not match it is built again. What a killed build left behind is removed by the next builder.
* **Bad records** met while building (unreadable JSON, schema, empty answers, missing images) are left out and
  kept in the entry's ``problems.jsonl``, to be reported once per run. What only shows when a record is decoded
  (a truncated image) is found lazily, in the workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from granite_docling.atomic_folders import file_sizes, publish, size_mismatches
from granite_docling.data.formats.arrow import available_cpus
from granite_docling.data.formats.base import Source
from granite_docling.data.formats.folder import FolderSource
from granite_docling.data.image_tiles import ImageSpec
from granite_docling.data.lengths import LengthCounter
from granite_docling.data.sample import Problem, Sample

log = logging.getLogger(__name__)

INDEX_VERSION = 2  # bump when the entry layout or the length counting changes
CHUNK = 256  # records per task of the parallel build
MIN_PARALLEL = 2000  # smaller sources are counted in the calling process (a pool costs ~1 s to start)
MAX_PROCESSES = 32


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "granite_docling" / "index"


@dataclass
class SourceIndex:
    """One source's good records in its own order: ``locator(i)``, ``tokens[i]``, ``tiles[i]``."""

    name: str
    entry: Path  # the cache entry folder
    size: int
    problems: list[Problem] = field(default_factory=list)  # bad records found while building
    _arrays: dict | None = field(default=None, repr=False)

    def _open(self) -> dict:
        if self._arrays is None:
            arrays = {
                key: np.load(self.entry / f"{key}.npy", mmap_mode="r")
                for key in ("tokens", "tiles", "rows")
                if (self.entry / f"{key}.npy").is_file()
            }
            if (self.entry / "names.bin").is_file():
                arrays["names"] = np.memmap(self.entry / "names.bin", dtype=np.uint8, mode="r") if self.size else b""
                arrays["offsets"] = np.load(self.entry / "offsets.npy", mmap_mode="r")
            self._arrays = arrays
        return self._arrays

    @property
    def tokens(self) -> np.ndarray:
        return self._open()["tokens"]

    @property
    def tiles(self) -> np.ndarray:
        return self._open()["tiles"]

    def locator(self, i: int) -> str | int:
        arrays = self._open()
        if "rows" in arrays:
            return int(arrays["rows"][i])
        start = arrays["offsets"][i]
        stop = arrays["offsets"][i + 1]
        return bytes(arrays["names"][start:stop]).decode("utf-8", "surrogateescape")  # any file name, as listed

    def __len__(self) -> int:
        return self.size

    def __getstate__(self) -> dict:  # spawned workers map the files again instead of pickling the arrays
        return {**self.__dict__, "_arrays": None}


def index_key(source: Source, processor, spec: ImageSpec) -> str:
    """The cache entry's name: the dataset version plus everything the lengths depend on."""
    tokenizer = processor.tokenizer
    parts = (
        INDEX_VERSION,
        source.fingerprint(),
        source.options,
        tokenizer.name_or_path,
        len(tokenizer),
        processor.image_seq_len,
        spec,
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def load_or_build(source: Source, processor, spec: ImageSpec, cache_root: Path, rank: int = 0) -> SourceIndex:
    """The source's index from ``cache_root``, built first if no process has built this version yet."""
    cache_root = Path(cache_root).expanduser()
    cache_root.mkdir(parents=True, exist_ok=True)
    entry = cache_root / index_key(source, processor, spec)
    lock = FileLock(str(entry) + ".lock")
    if not _complete(entry):
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info(
                "data index %s: rank %d waits while another process builds it (%s)", source.name, rank, lock.lock_file
            )
            lock.acquire()
        try:
            if not _complete(entry):
                _remove_unfinished_builds(entry)
                _build(source, processor, spec, entry, rank)
                return _open(entry, source.name)
        finally:
            lock.release()
    index = _open(entry, source.name)
    meta = json.loads((entry / "meta.json").read_text())
    by = meta["built_by"]
    log.info(
        "data index %s: rank %d reused %s (%d records, built by rank %d on %s)",
        source.name,
        rank,
        entry,
        index.size,
        by["rank"],
        by["host"],
    )
    return index


def _complete(entry: Path) -> bool:
    """Whether ``entry`` was written whole: its ``meta.json`` parses and every file has the size it lists."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta.get("files"), dict) and not size_mismatches(entry, meta["files"])


def _remove_unfinished_builds(entry: Path) -> None:
    """Remove the temporary folders of builds that were killed (only the lock holder builds: none is running),
    and an entry that is not whole."""
    leftovers = [*entry.parent.glob(f".{entry.name}.tmp-*"), *([entry] if entry.exists() else [])]
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    if leftovers:
        log.info("data index: removed %d unfinished build(s) of %s", len(leftovers), entry.name)


def _open(entry: Path, name: str) -> SourceIndex:
    meta = json.loads((entry / "meta.json").read_text())
    problems = [Problem(**json.loads(line)) for line in (entry / "problems.jsonl").read_text().splitlines() if line]
    return SourceIndex(name=name, entry=entry, size=meta["records"], problems=problems)


# ---------------------------------------------------------------------------------------------------------------
# Building


_WORKER: tuple | None = None  # (source, counter, spec) of a build process, set once by its initializer


def _init_worker(source: Source, processor, spec: ImageSpec) -> None:
    global _WORKER
    _WORKER = (source, LengthCounter(processor), spec)


def _count_chunk(bounds: tuple[int, int]) -> tuple[int, np.ndarray, list[tuple[int, Problem]]]:
    """(start, (tokens, tiles) per record or -1 for a bad one, [(i, problem)]) for records start..stop."""
    source, counter, spec = _WORKER
    start, stop = bounds
    lengths = np.full((stop - start, 2), -1, dtype=np.int64)
    samples: list[tuple[int, Sample]] = []
    problems = []
    for i, item in source.records(start, stop):
        if isinstance(item, Problem):
            problems.append((i, item))
        else:
            samples.append((i, item))
    counted = counter.count([sample for _, sample in samples], spec)
    for (i, _), length in zip(samples, counted, strict=True):
        lengths[i - start] = length
    return start, lengths, problems


def _build(source: Source, processor, spec: ImageSpec, entry: Path, rank: int) -> None:
    started = time.time()
    total = len(source)
    chunks = [(start, min(start + CHUNK, total)) for start in range(0, total, CHUNK)]
    processes = processes_for(total)
    wanted = source.options.max_samples
    lengths = np.full((total, 2), -1, dtype=np.int64)
    problems: list[tuple[int, Problem]] = []
    good = 0
    progress = tqdm(
        total=total,
        desc=f"indexing {source.name}",
        unit=" records",
        mininterval=2,
        leave=False,
        disable=total < MIN_PARALLEL,
    )
    if processes == 1:
        _init_worker(source, processor, spec)
        pool = None
        results = map(_count_chunk, chunks)
    else:  # fork: the workers inherit the source and processor instead of unpickling them
        pool = multiprocessing.get_context("fork").Pool(processes, _init_worker, (source, processor, spec))
        results = pool.imap(_count_chunk, chunks)
    try:
        for start, chunk_lengths, chunk_problems in results:
            lengths[start : start + len(chunk_lengths)] = chunk_lengths
            problems += chunk_problems
            good += int((chunk_lengths[:, 0] >= 0).sum())
            progress.update(len(chunk_lengths))
            if wanted is not None and good >= wanted:
                break  # max_samples: the first N good records are all that is needed
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    positions = np.flatnonzero(lengths[:, 0] >= 0)
    if wanted is not None:
        positions = positions[:wanted]
    last = int(positions[-1]) if len(positions) and wanted is not None and len(positions) == wanted else total
    problems = [problem for i, problem in sorted(problems, key=lambda pair: pair[0]) if i <= last]
    _write(entry, source, positions, lengths[positions], problems, rank, time.time() - started, processes)
    if isinstance(source, FolderSource):
        source.forget_names()  # the index has them now; the training process keeps no list of names
    log.info(
        "data index %s: rank %d built %d records (%d bad) in %.1f s with %d processes -> %s",
        source.name,
        rank,
        len(positions),
        len(problems),
        time.time() - started,
        processes,
        entry,
    )


def _write(
    entry: Path,
    source: Source,
    positions: np.ndarray,
    lengths: np.ndarray,
    problems: list[Problem],
    rank: int,
    seconds: float,
    processes: int,
) -> None:
    """Write the entry into a temporary folder, then flush and rename it into place (no reader sees half an entry,
    not even after a power cut). 8 parameters: the entry's folder, what it holds (the source's good positions,
    their lengths, the problems) and how it was built (rank, seconds, processes), each written into it."""
    tmp = entry.parent / f".{entry.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "tokens.npy", lengths[:, 0].astype(np.int32))
    np.save(tmp / "tiles.npy", lengths[:, 1].astype(np.int32))
    named = len(positions) > 0 and isinstance(source.locator(int(positions[0])), str)  # file names, not rows
    if isinstance(source, FolderSource) or named:
        names = [source.locator(int(i)).encode("utf-8", "surrogateescape") for i in positions]
        offsets = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum([len(n) for n in names], out=offsets[1:])
        (tmp / "names.bin").write_bytes(b"".join(names))
        np.save(tmp / "offsets.npy", offsets)
    else:
        np.save(tmp / "rows.npy", np.array([source.locator(int(i)) for i in positions], dtype=np.int64))
    (tmp / "problems.jsonl").write_text("".join(json.dumps(p.to_dict()) + "\n" for p in problems))
    meta = {
        "version": INDEX_VERSION,
        "name": source.name,
        "records": len(positions),
        "bad": len(problems),
        "seconds": round(seconds, 2),
        "processes": processes,
        "built_by": {"rank": rank, "host": socket.gethostname(), "pid": os.getpid()},
        "files": file_sizes(tmp),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # last: an entry without it is not whole
    publish(tmp, entry)


def cache_root(configured: str | None) -> Path:
    """``data.index_cache_dir``, or the default under ~/.cache."""
    return Path(configured).expanduser() if configured else default_cache_dir()


def processes_for(total: int) -> int:
    """How many processes a build of ``total`` records uses."""
    return 1 if total < MIN_PARALLEL else max(1, min(available_cpus(), MAX_PROCESSES, math.ceil(total / CHUNK)))
