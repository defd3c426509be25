"""The index: built once per dataset version, reused by every later start and every process, small per sample."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from filelock import FileLock
from fixture_data import good_dataset, to_hub_rows, write_annotation

import granite_docling.data.index as index_module
from granite_docling.data.image_tiles import ImageSpec
from granite_docling.data.index import load_or_build
from granite_docling.data.lengths import LengthCounter
from granite_docling.data.sources import ReadOptions, open_source, read_dataset


def index_of(path, processor, cache, options=None, name="d", rank=0):
    source = open_source(path, name, options or ReadOptions(), cache_dir=cache)
    return source, load_or_build(source, processor, ImageSpec.from_processor(processor), cache, rank)


def test_the_index_holds_locators_and_exact_lengths(tmp_path, tiny_processor):
    root = good_dataset(tmp_path / "data", 5)
    source, index = index_of(root, tiny_processor, tmp_path / "cache")
    samples, _ = read_dataset(root, "d", ReadOptions())
    assert [index.locator(i) for i in range(len(index))] == [f"{i:03d}.json" for i in range(5)]
    counted = LengthCounter(tiny_processor).count(samples, ImageSpec.from_processor(tiny_processor))
    assert list(zip(index.tokens.tolist(), index.tiles.tolist(), strict=True)) == counted
    assert source.read(index.locator(3)) == samples[3]


def test_a_second_start_reuses_the_entry_and_a_changed_dataset_builds_a_new_one(tmp_path, tiny_processor, caplog):
    root, cache = good_dataset(tmp_path / "data", 4), tmp_path / "cache"
    with caplog.at_level("INFO", logger="granite_docling.data.index"):
        _, first = index_of(root, tiny_processor, cache)
        _, again = index_of(root, tiny_processor, cache, rank=1)
    assert again.entry == first.entry
    assert (
        "rank 0 built 4 records" in caplog.text and "rank 1 reused" in caplog.text and "built by rank 0" in caplog.text
    )

    entries = {first.entry}
    record = {"img_pth": "images/train/000.png", "anns": {"user": "q", "assistant": "a"}}
    changes = [
        lambda: write_annotation(root, "004.json", record),
        lambda: (root / "anns" / "train" / "004.json").unlink(),  # removed again: back to the first version
        lambda: write_annotation(root, "001.json", {**record, "anns": {"user": "q", "assistant": "b"}}),
    ]
    sizes = []
    for change in changes:
        time.sleep(0.01)  # a new modification time even on coarse clocks
        change()
        _, index = index_of(root, tiny_processor, cache)
        entries.add(index.entry)
        sizes.append(len(index))
    assert sizes == [5, 4, 4]
    assert len(entries) == 3  # added: new; removed: the first again; edited in place: new
    _, other_settings = index_of(root, tiny_processor, cache, ReadOptions(max_turns=1))
    assert other_settings.entry not in entries


def test_bad_records_are_kept_out_of_the_index_and_listed_with_it(tmp_path, tiny_processor):
    root = good_dataset(tmp_path / "data", 3)
    write_annotation(root, "bad.json", "{ not json")
    _, index = index_of(root, tiny_processor, tmp_path / "cache")
    assert len(index) == 3
    assert [(p.file, p.reason) for p in index.problems] == [("anns/train/bad.json", "invalid_json")]
    _, again = index_of(root, tiny_processor, tmp_path / "cache")
    assert again.problems == index.problems


def test_max_samples_indexes_the_first_good_records_only(tmp_path, tiny_processor):
    root = good_dataset(tmp_path / "data", 6)
    write_annotation(root, "001a.json", "{ not json")
    _, index = index_of(root, tiny_processor, tmp_path / "cache", ReadOptions(max_samples=3))
    assert [index.locator(i) for i in range(3)] == ["000.json", "001.json", "002.json"]
    assert [p.file for p in index.problems] == ["anns/train/001a.json"]


def test_parallel_build_gives_the_same_index_as_one_process(tmp_path, tiny_processor, monkeypatch):
    root = good_dataset(tmp_path / "data", 40)
    write_annotation(root, "017a.json", {"img_pth": "nope.png", "anns": {"user": "q", "assistant": "a"}})
    _, serial = index_of(root, tiny_processor, tmp_path / "serial")
    monkeypatch.setattr(index_module, "MIN_PARALLEL", 1)
    monkeypatch.setattr(index_module, "CHUNK", 7)
    monkeypatch.setattr(index_module, "available_cpus", lambda: 2)
    _, parallel = index_of(root, tiny_processor, tmp_path / "parallel")
    assert json.loads((parallel.entry / "meta.json").read_text())["processes"] == 2
    assert parallel.tokens.tolist() == serial.tokens.tolist() and parallel.problems == serial.problems
    assert [parallel.locator(i) for i in range(40)] == [serial.locator(i) for i in range(40)]


def _build_in_a_process(root, cache, rank, queue):
    import socket

    from conftest import compose_config

    socket.gethostname = lambda: f"host{rank}"  # as if each process ran on a host of its own, sharing the cache
    from granite_docling.model import load_model_config, load_processor

    model_cfg = compose_config("model=tiny").model
    processor = load_processor(model_cfg, load_model_config(model_cfg))
    _, index = index_of(root, processor, cache, rank=rank)
    meta = json.loads((index.entry / "meta.json").read_text())
    queue.put((rank, meta["built_by"]["pid"] == os.getpid() and meta["built_by"]["host"] == f"host{rank}"))


def test_processes_starting_together_on_several_hosts_build_the_index_once(tmp_path):
    root = good_dataset(tmp_path / "data", 30)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_build_in_a_process, args=(root, tmp_path / "cache", r, queue))
                 for r in range(3)]  # fmt: skip
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert sorted(results) == [0, 1, 2]
    assert sum(results.values()) == 1  # one builder; the others reused its entry
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


def test_hub_parquet_is_indexed_in_place_with_the_same_lengths_as_the_folder(tmp_path, tiny_processor):
    folder = good_dataset(tmp_path / "folder", 7)
    samples, _ = read_dataset(folder, "d", ReadOptions())
    rows = to_hub_rows(samples)
    (tmp_path / "hub").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:4]), tmp_path / "hub" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), tmp_path / "hub" / "train-00001-of-00002.parquet")
    _, folder_index = index_of(folder, tiny_processor, tmp_path / "cache")
    source, hub_index = index_of(tmp_path / "hub", tiny_processor, tmp_path / "cache")
    assert hub_index.tokens.tolist() == folder_index.tokens.tolist()
    assert [hub_index.locator(i) for i in range(7)] == list(range(7))
    assert source.read(5).turns == samples[5].turns
    before = hub_index.entry
    time.sleep(0.01)
    pq.write_table(pa.Table.from_pylist(rows[4:6]), tmp_path / "hub" / "train-00001-of-00002.parquet")
    _, changed = index_of(tmp_path / "hub", tiny_processor, tmp_path / "cache")
    assert changed.entry != before and len(changed) == 6


@pytest.mark.parametrize("saved", ["dict", "dataset"])
def test_a_save_to_disk_folder_is_read_in_place(tmp_path, tiny_processor, saved):
    import datasets

    samples, _ = read_dataset(good_dataset(tmp_path / "folder", 3), "d", ReadOptions())
    dataset = datasets.Dataset.from_list(to_hub_rows(samples))
    (datasets.DatasetDict({"train": dataset}) if saved == "dict" else dataset).save_to_disk(tmp_path / "saved")
    source, index = index_of(tmp_path / "saved", tiny_processor, tmp_path / "cache")
    assert len(index) == 3 and source.read(index.locator(2)).turns == samples[2].turns


# A build in its own process, slowed down so that a SIGKILL can land while it counts or while it writes the entry.
KILLABLE_BUILD = """
import sys, time
sys.path.insert(0, {tests!r})
import numpy as np
from conftest import compose_config
import granite_docling.data.index as index_module
from granite_docling.data.image_tiles import ImageSpec
from granite_docling.data.lengths import LengthCounter
from granite_docling.data.sources import ReadOptions, open_source
from granite_docling.model import load_model_config, load_processor

phase = {phase!r}
real_count, real_save = LengthCounter.count, np.save
def slow_count(self, samples, spec):
    print("counting", flush=True)
    time.sleep(0.2 if phase == "count" else 0)
    return real_count(self, samples, spec)
def slow_save(path, array):
    real_save(path, array)
    print("writing", flush=True)
    time.sleep(0.5)
LengthCounter.count = slow_count
index_module.np.save = slow_save
index_module.CHUNK = 4
cfg = compose_config("model=tiny").model
processor = load_processor(cfg, load_model_config(cfg))
source = open_source({root!r}, "d", ReadOptions(), cache_dir={cache!r})
index_module.load_or_build(source, processor, ImageSpec.from_processor(processor), {cache!r})
print("built", flush=True)
"""


def test_a_build_killed_while_counting_or_writing_leaves_nothing_used_and_no_lock(tmp_path, tiny_processor, caplog):
    root, cache = good_dataset(tmp_path / "data", 24), tmp_path / "cache"
    for phase in ("count", "write"):
        script = KILLABLE_BUILD.format(tests=str(REPO / "tests"), phase=phase, root=str(root), cache=str(cache))
        builder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
        for line in builder.stdout:  # kill it in the middle of the phase: it holds the lock now
            if line.strip() == ("counting" if phase == "count" else "writing"):
                break
        builder.send_signal(signal.SIGKILL)
        builder.wait(timeout=30)
        (entry,) = {p.with_suffix("") for p in cache.glob("*.lock")}
        assert not index_module._complete(entry)
        assert len(list(cache.glob(f".{entry.name}.tmp-*"))) == (phase == "write")

    lock = FileLock(str(entry) + ".lock")
    lock.acquire(timeout=5)  # the dead builder's lock does not block
    lock.release()
    with caplog.at_level("INFO", logger="granite_docling.data.index"):
        _, index = index_of(root, tiny_processor, cache)
    assert "removed 1 unfinished build(s)" in caplog.text and "rank 0 built 24 records" in caplog.text
    assert index.entry == entry and index_module._complete(entry)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []
    _, fresh = index_of(root, tiny_processor, tmp_path / "fresh")
    assert index.tokens.tolist() == fresh.tokens.tolist() and index.tiles.tolist() == fresh.tiles.tolist()


def test_an_entry_whose_files_do_not_match_its_meta_is_built_again(tmp_path, tiny_processor, caplog):
    root, cache = good_dataset(tmp_path / "data", 6), tmp_path / "cache"
    _, first = index_of(root, tiny_processor, cache)
    tokens = first.entry / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-8])  # what a power cut can leave where nothing was flushed
    with caplog.at_level("INFO", logger="granite_docling.data.index"):
        _, again = index_of(root, tiny_processor, cache)
    assert "rank 0 built 6 records" in caplog.text
    assert again.entry == first.entry and len(again.tokens) == 6


def test_an_annotation_whose_name_is_not_utf8_is_indexed_and_read(tmp_path, tiny_processor):
    root = good_dataset(tmp_path / "data", 2)
    folder = os.fsencode(root / "anns" / "train")
    with open(folder + b"/\xff\xfe.json", "wb") as f:  # any bytes but / and NUL make a Linux file name
        f.write((root / "anns" / "train" / "000.json").read_bytes())
    source, index = index_of(root, tiny_processor, tmp_path / "cache")
    assert [index.locator(i) for i in range(len(index))] == ["000.json", "001.json", "\udcff\udcfe.json"]
    assert source.read(index.locator(2)).turns == source.read("000.json").turns
