"""Streaming parquet: every row once per epoch across workers and processes, exact resume, seeded order, mixing."""

from __future__ import annotations

import io

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import compose_config, data_of
from PIL import Image

from granite_docling.data.encoding import ExampleEncoder
from granite_docling.data.loading import make_loader
from granite_docling.data.sample import Problem
from granite_docling.data.sampler import BatchPlan
from granite_docling.data.sources import DatasetNotFoundError, ReadOptions
from granite_docling.data.split import seeded_rng
from granite_docling.data.streaming import Draws, StreamingDataset, list_files, open_stream_source, worker_progress

COLOURS = ["red", "green", "blue", "orange", "purple", "black", "teal", "olive"]


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder, rows_per_file=(7, 5, 9), row_group_size=3, bad_rows=(), prefix="train"):
    """Hub-layout parquet files whose answers name the row ('f1 r4'); rows in ``bad_rows`` get an empty answer."""
    folder.mkdir(parents=True, exist_ok=True)
    for f, count in enumerate(rows_per_file):
        rows = [{"images": [{"bytes": png(COLOURS[(f + r) % len(COLOURS)]), "path": f"{f}-{r}.png"}],
                 "texts": [{"user": "Convert this page.", "assistant": "" if (f, r) in bad_rows else f"f{f} r{r}",
                            "source": "test"}]} for r in range(count)]  # fmt: skip
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{prefix}-{f:05d}.parquet", row_group_size=row_group_size)
    return folder


def all_ids(rows_per_file=(7, 5, 9), prefix="train"):
    return {f"{prefix}-{f:05d}.parquet#{r}" for f, count in enumerate(rows_per_file) for r in range(count)}


def streaming(folders, processor, *, num_workers=0, batch_size=2, rank=0, world_size=1, seed=3, buffer=4,
              weights=None) -> StreamingDataset:  # fmt: skip
    sources = [open_stream_source(f"s{i}", str(folder), ReadOptions(), (weights or {}).get(i), buffer)
               for i, folder in enumerate(folders)]  # fmt: skip
    encoder = ExampleEncoder(processor, {})
    plan = BatchPlan(seed, batch_size, rank=rank, world_size=world_size)
    return StreamingDataset(sources, encoder, plan, num_workers)


def batch_ids(dataset, num_workers, pad_id):
    loader = make_loader(dataset, None, dataset.batch_size, num_workers, pad_id)
    return [batch["ids"] + [p.file for p in batch["problems"]] for batch in loader]


def test_one_epoch_gives_every_row_once_across_workers_and_processes(tmp_path, tiny_processor):
    folder = write_shards(tmp_path / "d")
    pad_id = tiny_processor.tokenizer.pad_token_id
    seen = []
    for rank in range(2):
        dataset = streaming([folder], tiny_processor, num_workers=2, rank=rank, world_size=2)
        batches = batch_ids(dataset, 2, pad_id)
        assert len(batches) == sum(dataset.worker_batches(0))
        seen.append([i for batch in batches for i in batch])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(all_ids())


def test_resume_continues_the_uninterrupted_batches_exactly(tmp_path, tiny_processor):
    # unequal files and row groups: the two workers give different numbers of batches, one runs out first
    folder = write_shards(tmp_path / "d", rows_per_file=(7, 2, 10, 4), row_group_size=5)
    pad_id = tiny_processor.tokenizer.pad_token_id
    full = batch_ids(streaming([folder], tiny_processor, num_workers=2), 2, pad_id)
    batches = streaming([folder], tiny_processor, num_workers=2).worker_batches(0)
    assert max(batches) - min(batches) >= 2 and len(full) == sum(batches)
    for m in (3, 2 * min(batches) + 1):  # the second after a worker ran out: (m + i) % K no longer holds
        resumed = streaming([folder], tiny_processor, num_workers=2)
        resumed.set_epoch(0, m)
        assert batch_ids(resumed, 2, pad_id) == full[m:], m


def test_order_is_a_function_of_the_seed_and_changes_every_epoch(tmp_path, tiny_processor):
    folder = write_shards(tmp_path / "d")

    def order(seed, epoch):
        dataset = streaming([folder], tiny_processor, seed=seed)
        dataset.set_epoch(epoch)
        return [sample.id for sample in dataset.rows(epoch, 0)]

    assert order(3, 0) == order(3, 0)
    assert sorted(order(3, 0)) == sorted(order(3, 1)) == sorted(all_ids())
    assert order(3, 0) != order(3, 1)
    assert order(3, 0) != order(4, 0)


def test_two_sources_are_mixed_a_bad_row_is_one_problem_and_resume_is_exact(tmp_path, tiny_processor):
    a = write_shards(tmp_path / "a", bad_rows={(1, 2)})
    b = write_shards(tmp_path / "b", rows_per_file=(6, 6), row_group_size=5, prefix="other")
    dataset = streaming([a, b], tiny_processor, weights={1: 3.0})
    batches = list(make_loader(dataset, None, 2, 0, tiny_processor.tokenizer.pad_token_id))
    problems = [p for batch in batches for p in batch["problems"]]
    assert [(p.dataset, p.file, p.reason) for p in problems] == [("s0", "train-00001.parquet#2", "empty_answer")]
    ids = [i for batch in batches for i in batch["ids"]]
    assert sorted(ids) == sorted(all_ids() - {"train-00001.parquet#2"} | all_ids((6, 6), "other"))
    assert {i.split("-")[0] for i in ids[: len(ids) // 2]} == {"train", "other"}  # drawn in turn, not in sequence
    stream = [item.id if not isinstance(item, Problem) else item.file for item in dataset.rows(0, 0)]
    for skip in range(len(stream) + 1):
        resumed = [item.id if not isinstance(item, Problem) else item.file for item in dataset.rows(0, 0, skip)]
        assert resumed == stream[skip:], skip


def test_replayed_draws_match_the_draws_made_one_at_a_time():
    live = Draws(seeded_rng(0, "draws"), [0.7, 0.2, 0.1], [50, 3000, 9000])
    sources = [live.next() for _ in range(12_050)]
    for n in (0, 1, 49, 4096, 5000, 12_050):
        replay = Draws(seeded_rng(0, "draws"), [0.7, 0.2, 0.1], [50, 3000, 9000])
        assert replay.skip(n).tolist() == [sources[:n].count(s) for s in range(3)], n
        assert [replay.next() for _ in range(12_050 - n)] == sources[n:], n
    assert live.next() is None


def test_worker_progress_follows_a_round_robin_with_dropouts():
    batches = [3, 1, 5, 0]
    order = [w for j in range(5) for w in range(4) if batches[w] > j]  # the DataLoader's sequence of workers
    for consumed in range(len(order) + 1):
        done, following = worker_progress(consumed, batches)
        assert done == [order[:consumed].count(w) for w in range(4)]
        if consumed < len(order):
            assert following == order[consumed]


def test_files_on_any_fsspec_filesystem_read_like_local_ones(tmp_path, tiny_processor):
    folder = write_shards(tmp_path / "d", rows_per_file=(4, 3))
    memory = fsspec.filesystem("memory")
    for file in sorted(folder.iterdir()):
        memory.pipe(f"/datasets/org/name/data/{file.name}", file.read_bytes())
    memory.pipe("/datasets/org/name/data/README.parquet.txt", b"not listed")
    files = list_files("memory://datasets/org/name", "train")
    assert [f.rsplit("/", 1)[1] for f in files] == ["train-00000.parquet", "train-00001.parquet"]
    remote = open_stream_source("r", "memory://datasets/org/name", ReadOptions(), None, 4)
    local = open_stream_source("r", str(folder), ReadOptions(), None, 4)
    assert remote.units == local.units
    encoder = ExampleEncoder(tiny_processor, {})
    assert [s.id for s in StreamingDataset([remote], encoder, BatchPlan(3, 2), 0).rows(0, 0)] == [
        s.id for s in StreamingDataset([local], encoder, BatchPlan(3, 2), 0).rows(0, 0)
    ]


def test_max_samples_keeps_the_first_rows_in_file_order(tmp_path):
    folder = write_shards(tmp_path / "d")
    source = open_stream_source("s", str(folder), ReadOptions(max_samples=8), None, 4)
    assert source.rows == 8 and [(u.file, u.group, u.rows) for u in source.units] == [
        (0, 0, 3),
        (0, 1, 3),
        (0, 2, 1),
        (1, 0, 1),
    ]


def test_build_data_streams_when_asked_and_refuses_a_mixture(tmp_path, tiny_processor):
    folder = write_shards(tmp_path / "d")
    overrides = ["model=tiny", f"dataset.folder.path={folder}", "dataset.folder.streaming=true",
                 "data.num_workers=0", "training.batch_size=2"]  # fmt: skip
    data = data_of(compose_config("dataset=[folder]", *overrides), tiny_processor)
    assert data.streaming and data.val is None and data.sizes == {"folder": (21, 0)}
    assert isinstance(data.train, StreamingDataset)
    assert sorted(item["id"] for item in data.train) == sorted(all_ids())
    with pytest.raises(ValueError, match="every source or for none"):
        data_of(compose_config("dataset=[folder,sample]", *overrides), tiny_processor)


@pytest.mark.parametrize("content", [b"", b"plain text, not parquet\n", None])
def test_a_file_that_holds_no_rows_to_stream_is_one_line(tmp_path, content):
    if content is None:  # the hub schema, no rows
        schema = pa.Table.from_pylist([{"images": [{"bytes": png("red"), "path": "a"}], "texts": []}]).schema
        pq.write_table(schema.empty_table(), tmp_path / "train.parquet")
    else:
        (tmp_path / "train.parquet").write_bytes(content)
    with pytest.raises(DatasetNotFoundError, match=r"train.parquet cannot be read: ArrowInvalid|hold no rows") as error:
        open_stream_source("s", str(tmp_path / "train.parquet"), ReadOptions())
    assert "\n" not in str(error.value)


def test_a_damaged_row_group_is_one_problem_per_row_and_the_others_are_read(tmp_path, tiny_processor):
    folder = write_shards(tmp_path / "d", rows_per_file=(7,), row_group_size=3)
    file = folder / "train-00000.parquet"
    data = bytearray(file.read_bytes())
    data[4:64] = b"\xff" * 60  # the first page header of row group 0 (the file opens with 'PAR1'); footer intact
    file.write_bytes(bytes(data))
    dataset = streaming([folder], tiny_processor)
    items = list(dataset)
    problems = {item.file: item.reason for item in items if isinstance(item, Problem)}
    assert problems == {f"train-00000.parquet#{r}": "unreadable_rows" for r in range(3)}
    assert sorted(item["id"] for item in items if not isinstance(item, Problem)) == [
        f"train-00000.parquet#{r}" for r in range(3, 7)
    ]
