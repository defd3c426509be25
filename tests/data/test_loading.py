"""Validation split, epoch order, resumable sharded sampling, bad samples in workers."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config
from fixture_data import BAD_FILES, dataset_with_bad_samples, good_dataset

from granite_docling.data.loading import (
    EpochSampler,
    append_problems,
    build_data,
    epoch_order,
    make_loader,
    mixture_counts,
    split_validation,
    summarise,
)
from granite_docling.data.sample import BadSampleError, Problem


def test_validation_split_is_deterministic_per_seed_and_source():
    samples = list(range(100))
    train, val = split_validation(samples, 0.1, seed=1, name="a")
    assert len(val) == 10 and sorted(train + val) == samples
    assert split_validation(samples, 0.1, seed=1, name="a") == (train, val)
    assert split_validation(samples, 0.1, seed=2, name="a")[1] != val
    assert split_validation(samples, 0.1, seed=1, name="b")[1] != val
    assert split_validation(samples, 0.0, seed=1, name="a") == (samples, [])
    assert len(split_validation(list(range(5)), 0.01, seed=1, name="a")[1]) == 1  # every source gives at least one


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    first = epoch_order([5, 7], [None, None], seed=3, epoch=0)
    assert sorted(first) == list(range(12))
    assert epoch_order([5, 7], [None, None], seed=3, epoch=0) == first
    assert epoch_order([5, 7], [None, None], seed=3, epoch=1) != first
    assert epoch_order([5, 7], [None, None], seed=4, epoch=0) != first


def test_weights_set_the_mixture_and_keep_the_epoch_size():
    assert mixture_counts([90, 10], [None, None]) == [90, 10]
    assert mixture_counts([90, 10], [1.0, 1.0]) == [50, 50]
    order = epoch_order([90, 10], [1.0, 1.0], seed=0, epoch=0)
    assert len(order) == 100
    assert sum(i >= 90 for i in order) == 50  # the small source is drawn five times over
    assert len(set(i for i in order if i >= 90)) == 10


def test_sampler_shards_are_disjoint_equal_and_resume_at_a_position():
    shards = [EpochSampler([10, 5], [None, None], seed=0, rank=r, world_size=2) for r in range(2)]
    for s in shards:
        s.set_epoch(1)
    a, b = list(shards[0]), list(shards[1])
    assert len(a) == len(b) == 7 and not set(a) & set(b)
    shards[0].set_epoch(1, start=3)
    assert list(shards[0]) == a[3:] and len(shards[0]) == 4


def test_dataset_reports_bad_images_as_problems_and_sizes_per_source(tmp_path, tiny_processor):
    root = dataset_with_bad_samples(tmp_path / "bad")
    good_dataset(tmp_path / "other", 6)
    cfg = compose_config("model=tiny", "dataset=[sample,folder]", f"dataset.folder.path={root}",
                         f"dataset.sample.path={tmp_path / 'other'}", "training.val_ratio=0.2")  # fmt: skip
    data = build_data(cfg, tiny_processor)
    assert data.sizes == {"sample": (5, 1), "folder": (6, 1)}  # 4 good + 3 undecodable images
    assert {p.reason for p in data.problems} == {"invalid_json", "bad_schema", "empty_answer", "missing_image",
                                                 "path_outside_root"}  # fmt: skip
    every = [data.train[i] for i in range(len(data.train))] + [data.val[i] for i in range(len(data.val))]
    decode_problems = sorted(p.file.split("/")[-1] for p in every if isinstance(p, Problem))
    assert decode_problems == sorted(f for f, r in BAD_FILES.items() if r in ("unreadable_image", "image_too_large"))

    loader = make_loader(data.train, data.train_sampler, batch_size=4, num_workers=0, pad_id=100257)
    batches = list(loader)
    assert sum(len(b["ids"]) for b in batches) + sum(len(b["problems"]) for b in batches) == len(data.train)


def test_on_bad_sample_error_stops_at_the_first_naming_it(tmp_path, tiny_processor):
    root = dataset_with_bad_samples(tmp_path / "bad")
    cfg = compose_config(
        "model=tiny", "dataset=[folder]", f"dataset.folder.path={root}", "training.on_bad_sample=error"
    )
    with pytest.raises(BadSampleError, match=r"anns/train/b_\w+\.json: \w+"):
        build_data(cfg, tiny_processor)


def test_max_length_drops_and_counts_long_samples(tmp_path, tiny_processor):
    cfg = compose_config("model=tiny", "dataset=[folder]", f"dataset.folder.path={good_dataset(tmp_path, 2)}",
                         "training.max_length=10", "training.val_ratio=0")  # fmt: skip
    data = build_data(cfg, tiny_processor)
    assert all(isinstance(data.train[i], Problem) and data.train[i].reason == "too_long" for i in range(2))


def test_problem_log_and_summary(tmp_path):
    problems = [Problem("d", "a.json", "missing_image"), Problem("d", "b.json", "missing_image"),
                Problem("d", "c.json", "invalid_json", "line 1")]  # fmt: skip
    assert summarise(problems) == "3 bad sample(s) skipped: 2 missing_image, 1 invalid_json"
    append_problems(tmp_path / "bad.jsonl", problems)
    lines = [json.loads(line) for line in (tmp_path / "bad.jsonl").read_text().splitlines()]
    assert [line["file"] for line in lines] == ["a.json", "b.json", "c.json"]
    assert lines[2]["detail"] == "line 1" and lines[0]["meaning"]


def test_a_source_resized_unlike_the_saved_processor_is_warned_about(tiny_processor, caplog):
    from granite_docling.data.loading import warn_about_image_sizes

    saved = tiny_processor.image_processor.size.longest_edge
    with caplog.at_level("WARNING", logger="granite_docling.data.loading"):
        warn_about_image_sizes({"pages": None, "same": saved, "formulas": saved // 2}, tiny_processor)
    assert len(caplog.records) == 1
    assert "dataset formulas trains at" in caplog.text and f"model.image_longest_edge={saved // 2}" in caplog.text
