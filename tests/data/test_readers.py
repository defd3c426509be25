"""Readers: the Docling folder format, the hub layout from parquet / Arrow, bad input, per-dataset limits."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_script
from fixture_data import BAD_FILES, dataset_with_bad_samples, good_dataset, to_hub_rows, write_annotation, write_image
from PIL import Image

from granite_docling.data.images import ImageError, decode_image
from granite_docling.data.sample import Turn
from granite_docling.data.sources import DatasetNotFoundError, ReadOptions, detect_format, read_dataset


def test_docling_folder_reads_both_annotation_options(tmp_path):
    samples, problems = read_dataset(good_dataset(tmp_path, 4), "mine", ReadOptions())
    assert problems == []
    assert [s.id for s in samples] == [f"anns/train/{i:03d}.json" for i in range(4)]
    assert samples[0].turns == (Turn("Convert formula to latex.", "x^0", "synth"),)
    assert samples[1].images == ((tmp_path / "images/train/001.png").resolve(),)
    assert samples[1].source == "docs" and samples[0].dataset == "mine"


def test_bad_records_are_reported_at_read_time_and_images_at_decode_time(tmp_path):
    root = dataset_with_bad_samples(tmp_path / "data")
    samples, problems = read_dataset(root, "mine", ReadOptions())
    found = {p.file.split("/")[-1]: p.reason for p in problems}
    read_time = {"invalid_json", "bad_schema", "empty_answer", "missing_image", "path_outside_root", "bad_image_path"}
    assert found == {f: r for f, r in BAD_FILES.items() if r in read_time}
    decode_failures = {}
    for sample in samples:
        try:
            [decode_image(ref) for ref in sample.images]
        except ImageError as error:
            decode_failures[sample.id.split("/")[-1]] = error.reason
    assert decode_failures == {f: r for f, r in BAD_FILES.items() if r not in read_time}
    assert len(samples) - len(decode_failures) == 4  # the good ones; README.txt is ignored


def test_limits_keep_the_first_turns_images_and_samples(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"images/train/{i}a.png")
        write_image(tmp_path / f"images/train/{i}b.png")
        turns = [{"user": f"q{k}", "assistant": f"a{k}"} for k in range(4)]
        write_annotation(
            tmp_path, f"{i}.json", {"img_pth": [f"images/train/{i}a.png", f"images/train/{i}b.png"], "anns": turns}
        )
    samples, _ = read_dataset(tmp_path, "x", ReadOptions(max_turns=2, max_samples=2, max_images_per_sample=1))
    assert len(samples) == 2
    assert [t.user for t in samples[0].turns] == ["q0", "q1"]  # the first turns, not the last
    assert len(samples[0].images) == 1 and samples[0].images[0].name == "0a.png"


def test_parquet_in_the_hub_layout_yields_the_same_samples_as_the_folder(tmp_path):
    folder_samples, _ = read_dataset(good_dataset(tmp_path / "folder", 5), "x", ReadOptions())
    pq.write_table(pa.Table.from_pylist(to_hub_rows(folder_samples)), tmp_path / "train-00000-of-00001.parquet")
    assert detect_format(tmp_path / "train-00000-of-00001.parquet") == "hub"
    hub_samples, problems = read_dataset(tmp_path / "train-00000-of-00001.parquet", "x", ReadOptions())
    assert problems == []
    assert [s.turns for s in hub_samples] == [s.turns for s in folder_samples]
    for hub, folder in zip(hub_samples, folder_samples, strict=True):
        assert [decode_image(ref).tobytes() for ref in hub.images] == [
            decode_image(ref).tobytes() for ref in folder.images
        ]


def test_arrow_folder_like_save_to_disk_is_read(tmp_path):
    folder_samples, _ = read_dataset(good_dataset(tmp_path / "folder", 3), "x", ReadOptions())
    table = pa.Table.from_pylist(to_hub_rows(folder_samples))
    (tmp_path / "saved").mkdir()
    with pa.OSFile(str(tmp_path / "saved" / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    samples, _ = read_dataset(tmp_path / "saved", "x", ReadOptions(max_samples=2))
    assert [s.turns for s in samples] == [s.turns for s in folder_samples[:2]]


def test_hub_rows_with_bad_texts_are_problems(tmp_path):
    buffer = io.BytesIO()
    write_image(tmp_path / "a.png")
    rows = [{"images": [{"bytes": (tmp_path / "a.png").read_bytes(), "path": "a"}],
             "texts": [{"user": "q", "assistant": "", "source": "s"}]}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    (tmp_path / "d.parquet").write_bytes(buffer.getvalue())
    samples, problems = read_dataset(tmp_path / "d.parquet", "x", ReadOptions())
    assert samples == [] and [(p.file, p.reason) for p in problems] == [("d.parquet#0", "empty_answer")]


def test_not_a_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetNotFoundError, match="not a dataset"):
        detect_format(tmp_path)
    good_dataset(tmp_path / "d", 1)
    with pytest.raises(DatasetNotFoundError, match="splits found .*train"):
        read_dataset(tmp_path / "d", "x", ReadOptions(split="validation"))


def test_annotation_json_is_not_mutated(tmp_path):
    root = good_dataset(tmp_path, 2)
    before = {p: p.read_bytes() for p in (root / "anns/train").glob("*.json")}
    read_dataset(root, "x", ReadOptions())
    assert before == {p: p.read_bytes() for p in (root / "anns/train").glob("*.json")}
    assert json.loads(next(iter(before.values())))["img_pth"]


def hub_table(images) -> pa.Table:
    """One hub-layout row whose ``images`` cell is ``images`` (a wrong type, here)."""
    return pa.Table.from_pylist([{"images": images, "texts": [{"user": "q", "assistant": "a", "source": "s"}]}])


def test_hub_rows_whose_images_are_no_encoded_images_are_named(tmp_path):
    cut_qoi = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(cut_qoi, "QOI")
    cells = {
        "ints": 5,
        "list_of_ints": [5],
        "text": "abc",
        "cut_qoi": [{"bytes": cut_qoi.getvalue()[: len(cut_qoi.getvalue()) // 2], "path": "a"}],
    }
    found = {}
    for name, cell in cells.items():
        pq.write_table(hub_table(cell), tmp_path / f"{name}.parquet")
        samples, problems = read_dataset(tmp_path / f"{name}.parquet", "x", ReadOptions(), cache_dir=tmp_path / "c")
        for sample in samples:
            with pytest.raises(ImageError) as error:
                decode_image(sample.images[0])
            problems.append(error.value)
        found[name] = [p.reason for p in problems]
    assert found == {
        "ints": ["bad_schema"],
        "list_of_ints": ["bad_schema"],
        "text": ["bad_schema"],
        "cut_qoi": ["unreadable_image"],  # PIL opens it, then fails with IndexError
    }


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "d.parquet cannot be read: ArrowInvalid: Parquet file size is 0 bytes"),
        (b"id,text\n1,hello\n", "d.parquet cannot be read: ArrowInvalid: .*magic bytes not found"),
        (None, "d.parquet: its parquet files hold no rows"),
    ],
)
def test_a_parquet_file_that_holds_no_dataset_is_one_line(tmp_path, content, message):
    if content is None:  # the right schema, no rows: HF datasets fails on it with DatasetGenerationError
        pq.write_table(hub_table([]).schema.empty_table(), tmp_path / "d.parquet")
    else:
        (tmp_path / "d.parquet").write_bytes(content)
    with pytest.raises(DatasetNotFoundError, match=message) as error:
        read_dataset(tmp_path / "d.parquet", "x", ReadOptions(), cache_dir=tmp_path / "c")
    assert "\n" not in str(error.value)


def test_validate_of_a_file_that_is_no_parquet_exits_2_with_one_line(tmp_path):
    (tmp_path / "d.parquet").write_text("not parquet at all\n")
    result = run_script("-m", "granite_docling.cli", "validate", str(tmp_path / "d.parquet"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'd.parquet'} cannot be read: ArrowInvalid: Parquet magic bytes not found in footer. "
        "Either the file is corrupted or this is not a parquet file."
    ]


def test_annotations_are_confined_to_the_dataset_like_images(tmp_path):
    root = good_dataset(tmp_path / "data", 2)
    record = {"img_pth": "images/train/000.png", "anns": {"user": "q", "assistant": "a"}}
    (tmp_path / "elsewhere.json").write_text(json.dumps(record))
    (root / "anns/train/inside.json").symlink_to(root / "anns/train/000.json")  # a link within the dataset: fine
    (root / "anns/train/outside.json").symlink_to(tmp_path / "elsewhere.json")
    (root / "anns/train/dangling.json").symlink_to(root / "anns/train/gone.json")
    (root / "anns/train/loop.json").symlink_to("loop.json")
    samples, problems = read_dataset(root, "x", ReadOptions())
    assert [s.id for s in samples] == ["anns/train/000.json", "anns/train/001.json", "anns/train/inside.json"]
    assert {p.file: p.reason for p in problems} == {
        "anns/train/outside.json": "path_outside_root",
        "anns/train/dangling.json": "invalid_json",
        "anns/train/loop.json": "invalid_json",
    }


def test_annotation_text_the_tokenizer_would_refuse_is_named(tmp_path):
    root = good_dataset(tmp_path, 1)
    write_annotation(root, "surrogate.json", '{"img_pth": "images/train/000.png", "anns": {"user": "q", "assistant": '
                                             '"x \\ud800 y"}}')  # fmt: skip
    write_annotation(root, "deep.json", "[" * 100_000 + "]" * 100_000)
    _, problems = read_dataset(root, "x", ReadOptions())
    assert {p.file: p.reason for p in problems} == {
        "anns/train/surrogate.json": "bad_schema",
        "anns/train/deep.json": "invalid_json",
    }
