"""Validation split, epoch order, bad samples found while indexing and in the workers, max_length."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import compose_config, data_of
from fixture_data import BAD_FILES, dataset_with_bad_samples, good_dataset

from granite_docling.data.loading import make_loader
from granite_docling.data.sample import BadSampleError, Problem
from granite_docling.data.sampler import epoch_order, mixture_counts
from granite_docling.data.split import scored_validation, split_positions, split_validation
from granite_docling.data.training_data import append_problems, listed_problems, summarise


def test_validation_split_is_deterministic_per_seed_and_source():
    samples = list(range(100))
    train, val = split_validation(samples, 0.1, seed=1, name="a")
    assert len(val) == 10 and sorted(train + val) == samples
    assert split_validation(samples, 0.1, seed=1, name="a") == (train, val)
    assert split_validation(samples, 0.1, seed=2, name="a")[1] != val
    assert split_validation(samples, 0.1, seed=1, name="b")[1] != val
    assert split_validation(samples, 0.0, seed=1, name="a") == (samples, [])
    assert len(split_validation(list(range(5)), 0.01, seed=1, name="a")[1]) == 1  # every source gives at least one
    train_positions, val_positions = split_positions(100, 0.1, seed=1, name="a")
    assert train_positions.tolist() == train and val_positions.tolist() == val


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    first = epoch_order([5, 7], [None, None], seed=3, epoch=0).tolist()
    assert sorted(first) == list(range(12))
    assert epoch_order([5, 7], [None, None], seed=3, epoch=0).tolist() == first
    assert epoch_order([5, 7], [None, None], seed=3, epoch=1).tolist() != first
    assert epoch_order([5, 7], [None, None], seed=4, epoch=0).tolist() != first


def test_weights_set_the_mixture_and_keep_the_epoch_size():
    assert mixture_counts([90, 10], [None, None]) == [90, 10]
    assert mixture_counts([90, 10], [1.0, 1.0]) == [50, 50]
    order = epoch_order([90, 10], [1.0, 1.0], seed=0, epoch=0)
    assert len(order) == 100
    assert sum(i >= 90 for i in order) == 50  # the small source is drawn five times over
    assert len(set(int(i) for i in order if i >= 90)) == 10


def test_bad_records_are_found_while_indexing_or_in_the_workers(tmp_path, tiny_processor):
    root = dataset_with_bad_samples(tmp_path / "bad")
    good_dataset(tmp_path / "other", 6)
    cfg = compose_config("model=tiny", "dataset=[sample,folder]", f"dataset.folder.path={root}",
                         f"dataset.sample.path={tmp_path / 'other'}", "data.val_ratio=0.2")  # fmt: skip
    data = data_of(cfg, tiny_processor)
    assert data.sizes == {"sample": (5, 1), "folder": (6, 2)}  # 4 good + 4 undecodable images
    assert {p.reason for p in data.problems} == {"invalid_json", "bad_schema", "empty_answer", "missing_image",
                                                 "path_outside_root", "bad_image_path"}  # fmt: skip
    every = [data.train[i] for i in range(len(data.train))] + [data.val[i] for i in range(len(data.val))]
    decode_problems = sorted(p.file.split("/")[-1] for p in every if isinstance(p, Problem))
    assert decode_problems == sorted(f for f, r in BAD_FILES.items() if r in ("unreadable_image", "image_too_large"))

    loader = make_loader(data.train, data.train_sampler, batch_size=4, num_workers=0, pad_id=100257)
    batches = list(loader)
    assert sum(len(b["ids"]) for b in batches) + sum(len(b["problems"]) for b in batches) == len(data.train)


def test_a_record_broken_after_indexing_is_a_problem_in_the_worker(tmp_path, tiny_processor):
    root = good_dataset(tmp_path / "data", 4)
    cfg = compose_config("model=tiny", "dataset=[folder]", f"dataset.folder.path={root}", "data.val_ratio=0")
    data = data_of(cfg, tiny_processor)
    (root / "anns" / "train" / "001.json").write_text("{ not json")  # after the index was built
    items = [data.train[i] for i in range(len(data.train))]
    problems = [item for item in items if isinstance(item, Problem)]
    assert [(p.file, p.reason) for p in problems] == [("anns/train/001.json", "invalid_json")]


def test_on_bad_sample_error_stops_at_the_first_naming_it(tmp_path, tiny_processor):
    root = dataset_with_bad_samples(tmp_path / "bad")
    cfg = compose_config("model=tiny", "dataset=[folder]", f"dataset.folder.path={root}", "data.on_bad_sample=error")
    with pytest.raises(BadSampleError, match=r"anns/train/b_\w+\.json: \w+"):
        data_of(cfg, tiny_processor)


def test_max_length_drops_and_counts_long_samples_before_training(tmp_path, tiny_processor):
    root = good_dataset(tmp_path, 4)
    base = ["model=tiny", "dataset=[folder]", f"dataset.folder.path={root}", "data.val_ratio=0"]
    lengths = sorted(data_of(compose_config(*base), tiny_processor).train_sampler.lengths[0].tolist())
    data = data_of(compose_config(*base, f"data.max_length={lengths[1]}"), tiny_processor)
    assert len(data.train) == sum(n <= lengths[1] for n in lengths)
    assert [p.reason for p in data.problems] == ["too_long"] * (4 - len(data.train))
    with pytest.raises(ValueError, match="no training samples left: 4 bad sample"):
        data_of(compose_config(*base, "data.max_length=10"), tiny_processor)


def test_problem_log_lists_each_sample_once(tmp_path):
    problems = [Problem("d", "a.json", "missing_image"), Problem("d", "b.json", "missing_image"),
                Problem("d", "c.json", "invalid_json", "line 1")]  # fmt: skip
    assert summarise(problems) == "3 bad sample(s) skipped: 2 missing_image, 1 invalid_json"
    path = tmp_path / "bad.jsonl"
    seen = listed_problems(path)
    assert append_problems(path, problems, seen) == 3
    assert append_problems(path, problems[:2] + [Problem("e", "a.json", "missing_image")], seen) == 1
    assert append_problems(path, problems, listed_problems(path)) == 0  # a resumed run reads what is listed
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(line["dataset"], line["file"]) for line in lines] == [("d", "a.json"), ("d", "b.json"), ("d", "c.json"),
                                                                   ("e", "a.json")]  # fmt: skip
    assert lines[2]["detail"] == "line 1" and lines[0]["meaning"]


def test_a_source_resized_unlike_the_saved_processor_is_warned_about(tiny_processor, caplog):
    from granite_docling.data.loading import warn_about_image_sizes

    saved = tiny_processor.image_processor.size.longest_edge
    with caplog.at_level("WARNING", logger="granite_docling.data.loading"):
        warn_about_image_sizes({"pages": None, "same": saved, "formulas": saved // 2}, tiny_processor)
    assert len(caplog.records) == 1
    assert "dataset formulas trains at" in caplog.text and f"model.image_longest_edge={saved // 2}" in caplog.text


def test_a_validation_scores_a_seeded_cap_of_the_held_out_samples():
    held_out = np.arange(0, 1000, 7)
    scored = scored_validation(held_out, 20, seed=42, name="docling_matix")
    assert len(scored) == 20 and set(scored) <= set(held_out) and list(scored) == sorted(scored)
    assert np.array_equal(scored, scored_validation(held_out, 20, seed=42, name="docling_matix"))  # any run, any rank
    assert not np.array_equal(scored, scored_validation(held_out, 20, seed=43, name="docling_matix"))
    assert not np.array_equal(scored, scored_validation(held_out, 20, seed=42, name="synth_formula"))
    assert np.array_equal(scored_validation(held_out, None, 42, "d"), held_out)
    assert np.array_equal(scored_validation(held_out, 1000, 42, "d"), held_out)


def test_the_capped_validation_is_the_same_on_every_process_and_never_trained_on(tmp_path, tiny_processor, caplog):
    root = good_dataset(tmp_path / "data", 20)
    overrides = ["model=tiny", "dataset=[folder]", f"dataset.folder.path={root}", "data.val_ratio=0.5",
                 "data.val_max_samples=3"]  # fmt: skip
    with caplog.at_level("INFO", logger="granite_docling.data"):
        one = data_of(compose_config(*overrides), tiny_processor)
    two = [data_of(compose_config(*overrides), tiny_processor, rank, 2) for rank in range(2)]
    assert "10 train, 10 validation samples (a validation scores 3 of the 10 held out)" in caplog.text
    for data in (one, *two):
        assert len(data.val) == 3 and len(data.train) == 10
        assert [data.val.parts[0].locator(k) for k in range(3)] == [one.val.parts[0].locator(k) for k in range(3)]
    held_out = {one.val.parts[0].locator(k) for k in range(3)}
    assert not held_out & {one.train.parts[0].locator(k) for k in range(10)}
