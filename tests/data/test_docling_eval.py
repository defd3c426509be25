"""docling-eval datasets as a source: one sample per page (or per document) from ``GroundTruthDocument`` and
``GroundTruthPageImages``, detected from the columns, bad rows named once. The rows here follow the schema of
docling-eval's ``DatasetRecord``; ``make test-docling`` reads a dataset written by docling-eval's own code."""

from __future__ import annotations

import json

import pytest
from fixture_data import docling_eval_rows, write_docling_eval

from granite_docling.data.answers import PAGE_PROMPT, document_doctags, page_doctags
from granite_docling.data.formats.docling_eval import DoclingEvalSource
from granite_docling.data.images import decode_image
from granite_docling.data.sources import DatasetNotFoundError, ReadOptions, open_source, read_dataset


def ground_truth(row: dict):
    from docling_core.types.doc import DoclingDocument

    return DoclingDocument.model_validate_json(row["GroundTruthDocument"])


def test_one_sample_per_page_with_the_pages_doctags_detected_from_the_columns(tmp_path):
    rows = docling_eval_rows(["multi_page", "code_and_formula"])
    root = write_docling_eval(tmp_path / "eval", rows)
    source = open_source(root, "mine", ReadOptions(split="test"))
    assert isinstance(source, DoclingEvalSource) and len(source) == 5 + 2
    samples, problems = read_dataset(root, "mine", ReadOptions(split="test"))
    assert problems == []
    doc = ground_truth(rows[0])
    assert [s.id for s in samples[:5]] == [f"multi_page#page={n}" for n in range(1, 6)]
    for page_no, sample in zip(range(1, 6), samples, strict=False):
        assert sample.turns[0].user == PAGE_PROMPT
        assert sample.turns[0].assistant == page_doctags(doc, page_no)
        assert sample.images == (rows[0]["GroundTruthPageImages"][page_no - 1]["bytes"],)
    assert "formula" in samples[-1].turns[0].assistant or "code" in samples[-1].turns[0].assistant
    assert decode_image(samples[6].images[0]).size == (59, 84)  # page 2 of code_and_formula at scale 0.1


def test_one_sample_per_document_when_asked(tmp_path):
    rows = docling_eval_rows(["multi_page"])
    root = write_docling_eval(tmp_path / "eval", rows)
    samples, problems = read_dataset(root, "mine", ReadOptions(split="test", unit="document"))
    assert problems == [] and len(samples) == 1
    (sample,) = samples
    assert len(sample.images) == 5 and sample.turns[0].assistant == document_doctags(ground_truth(rows[0]))
    assert sample.turns[0].assistant.count("<page_break>") == 4


def test_a_bad_row_is_named_once_and_the_good_pages_stay(tmp_path):
    good, broken, short, imageless = docling_eval_rows(
        ["multi_page", "2305.03393v1-pg9", "code_and_formula", "amt_handbook_sample"]
    )
    broken["GroundTruthDocument"] = broken["GroundTruthDocument"][:200]  # cut off: not JSON
    short["GroundTruthPageImages"] = short["GroundTruthPageImages"][:1]  # 2 pages, 1 image, no page says which
    document = json.loads(short["GroundTruthDocument"])
    for page in document["pages"].values():
        page["image"] = None
    short["GroundTruthDocument"] = json.dumps(document)
    imageless["GroundTruthPageImages"] = []
    root = write_docling_eval(tmp_path / "eval", [good, broken, short, imageless])
    samples, problems = read_dataset(root, "mine", ReadOptions(split="test"))
    assert [s.id for s in samples] == [f"multi_page#page={n}" for n in range(1, 6)]
    assert [(p.file, p.reason) for p in problems] == [
        ("2305.03393v1-pg9", "bad_document"),
        ("code_and_formula", "missing_page_image"),
        ("amt_handbook_sample", "missing_page_image"),
    ]
    assert "1 page images for the 2 pages" in problems[1].detail


def test_pages_without_an_image_are_named_and_the_others_kept(tmp_path):
    (row,) = docling_eval_rows(["code_and_formula"])
    document = json.loads(row["GroundTruthDocument"])
    document["pages"]["1"]["image"] = None  # docling-eval writes images only for pages that have one
    row["GroundTruthDocument"] = json.dumps(document)
    row["GroundTruthPageImages"] = row["GroundTruthPageImages"][1:]
    root = write_docling_eval(tmp_path / "eval", [row])
    samples, problems = read_dataset(root, "mine", ReadOptions(split="test"))
    assert [s.id for s in samples] == ["code_and_formula#page=2"]
    assert samples[0].turns[0].assistant == page_doctags(ground_truth(row), 2)
    assert [(p.file, p.reason, p.detail) for p in problems] == [
        ("code_and_formula", "missing_page_image", "pages [1] have no image")
    ]


def test_a_missing_split_lists_the_splits_there(tmp_path):
    root = write_docling_eval(tmp_path / "eval", docling_eval_rows(["amt_handbook_sample"]), split="test")
    with pytest.raises(DatasetNotFoundError, match=r"no 'train' split \(its splits: test\)"):
        open_source(root, "mine", ReadOptions(split="train"))


def test_records_in_chunks_that_cut_a_document_give_each_page_once(tmp_path):
    rows = docling_eval_rows(["multi_page", "code_and_formula"])
    rows[1]["GroundTruthDocument"] = "{"  # named at its first page only, whichever chunk holds it
    source = open_source(write_docling_eval(tmp_path / "eval", rows), "mine", ReadOptions(split="test"))
    whole = [(i, getattr(item, "id", None) or item.file) for i, item in source.records()]
    chunked = [(i, getattr(item, "id", None) or item.file) for s in (0, 3, 6) for i, item in source.records(s, s + 3)]
    assert chunked == whole == [*[(i, f"multi_page#page={i + 1}") for i in range(5)], (5, "code_and_formula")]
    assert source.read(source.locator(4)).id == "multi_page#page=5"


def test_the_index_holds_each_page_once_in_parallel_chunks_and_is_reused(tmp_path, tiny_processor, monkeypatch, caplog):
    import granite_docling.data.index as index_module
    from granite_docling.data.image_tiles import ImageSpec
    from granite_docling.data.index import load_or_build
    from granite_docling.data.lengths import LengthCounter

    rows = docling_eval_rows(["multi_page", "code_and_formula", "2305.03393v1-pg9"])
    rows[2]["GroundTruthDocument"] = "{"  # bad: named once in the index's problems
    root = write_docling_eval(tmp_path / "eval", rows)
    spec, options = ImageSpec.from_processor(tiny_processor), ReadOptions(split="test")

    def index(cache):
        source = open_source(root, "mine", options, cache_dir=cache)
        return source, load_or_build(source, tiny_processor, spec, cache)

    source, serial = index(tmp_path / "serial")
    samples, problems = read_dataset(root, "mine", options)
    assert len(serial) == 7 and [(p.file, p.reason) for p in serial.problems] == [("2305.03393v1-pg9", "bad_document")]
    counted = LengthCounter(tiny_processor).count(samples, spec)
    assert list(zip(serial.tokens.tolist(), serial.tiles.tolist(), strict=True)) == counted
    assert [source.read(serial.locator(i)) for i in range(7)] == samples
    monkeypatch.setattr(index_module, "MIN_PARALLEL", 1)
    monkeypatch.setattr(index_module, "CHUNK", 3)  # chunks cut multi_page's five pages
    monkeypatch.setattr(index_module, "available_cpus", lambda: 2)
    _, parallel = index(tmp_path / "parallel")
    assert [parallel.locator(i) for i in range(7)] == [serial.locator(i) for i in range(7)]
    assert parallel.tokens.tolist() == serial.tokens.tolist() and parallel.problems == serial.problems
    with caplog.at_level("INFO", logger="granite_docling.data.index"):
        index(tmp_path / "serial")
    assert "reused" in caplog.text


@pytest.mark.slow  # make test-slow (and make test-docling, on a dataset docling-eval wrote): keeps make test short
def test_train_py_trains_on_a_docling_eval_dataset(tmp_path):
    from conftest import run_script

    root = write_docling_eval(tmp_path / "eval", docling_eval_rows(["multi_page", "code_and_formula"]))
    done = run_script(
        "train.py",
        "experiment=quick",
        "dataset=[folder]",
        f"dataset.folder.path={root}",
        "dataset.folder.split=test",
        "training.max_steps=1",
        "data.val_ratio=0",
        "data.num_workers=0",
        f"data.index_cache_dir={tmp_path / 'index'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data index folder: rank 0 built 7 records (0 bad)" in (tmp_path / "run" / "train.log").read_text()
    assert (tmp_path / "run" / "final_model" / "model.safetensors").is_file()


@pytest.mark.filterwarnings("ignore::UserWarning")  # docling-core clamps every box to the 0-wide page
def test_a_document_docling_core_fails_on_is_a_bad_document_not_a_traceback(tmp_path):
    rows = docling_eval_rows(["code_and_formula", "multi_page"])
    document = json.loads(rows[0]["GroundTruthDocument"])
    document["pages"]["1"]["size"]["width"] = 0  # parses, then its DocTags export divides by the width
    rows[0]["GroundTruthDocument"] = json.dumps(document)
    samples, problems = read_dataset(write_docling_eval(tmp_path / "eval", rows), "x", ReadOptions(split="test"))
    failed = "DocTags export failed: ZeroDivisionError: float division by zero"
    assert [(p.file, p.reason, p.detail) for p in problems] == [
        ("code_and_formula page image 0", "bad_document", failed)
    ]
    assert [s.id for s in samples] == ["code_and_formula#page=2"] + [f"multi_page#page={n}" for n in range(1, 6)]
