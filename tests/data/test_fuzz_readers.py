"""Fuzzing the readers: damaged images, annotations, parquet files and documents are read or named, never raised.

Mutated images of every format PIL both writes and opens (byte flips, cuts, header bytes, inserted and deleted
runs), mutated annotation JSONs (bytes and structure), mutated parquet files (bytes and column types) and
docling-eval rows with a mutated GroundTruthDocument go through ``validate`` and the training reader (source ->
index -> ExampleEncoder, the fast image path), which must agree: each sample is read or named with a reason of
REASONS; a file that is no dataset at all is one :class:`DatasetNotFoundError` line. A quick run (fixed seed, a few
hundred cases) is part of ``make test``; the full one (thousands) prints what it met::

    .venv/bin/python -m pytest -q -s -m slow tests/data/test_fuzz_readers.py
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixture_data import docling_eval_rows, write_docling_eval
from PIL import Image

from granite_docling.data.encoding import ExampleEncoder
from granite_docling.data.image_tiles import ImageSpec
from granite_docling.data.images import ImageError, decode_image, image_size
from granite_docling.data.index import load_or_build
from granite_docling.data.indexed import ConversationDataset, Part
from granite_docling.data.sample import REASONS, Problem
from granite_docling.data.sampler import BatchPlan
from granite_docling.data.sources import DatasetNotFoundError, ReadOptions, open_source
from granite_docling.data.streaming import StreamingDataset, open_stream_source
from granite_docling.tools.validate import validate_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's "Truncated File Read", "Corrupt EXIF data"

READ = "read"
NO_DATASET = "no dataset (one error line)"


@dataclass(frozen=True)
class Budget:
    images: int
    annotations: int
    parquet_files: int
    docling_eval_rows: int


FULL = Budget(images=4000, annotations=2000, parquet_files=150, docling_eval_rows=600)
QUICK_ANNOTATIONS = 300
QUICK_PARQUET_FILES = 12
QUICK_DOCLING_EVAL_ROWS = 30
# The quick run mutates every base image once, with a seed whose cases all decode in well under a second: a GIF
# whose header is mutated can be a legal 76 MP image that decodes (0.4 s, eight times over in this test), and the
# full run meets those.
QUICK_SEED = 1


# ---------------------------------------------------------------------------------------------------------------
# What is mutated


@cache
def base_images() -> dict[str, bytes]:
    """One small image per (format, mode) that PIL both writes and reads back, plus a few encoder variants."""
    Image.init()
    found = {}
    for fmt in sorted(set(Image.SAVE) & set(Image.OPEN)):
        for mode in ("RGB", "L", "P", "1", "RGBA", "I;16"):
            found.update(_encoded(f"{fmt}-{mode}", Image.new(mode, (23, 17), 1), fmt))
    page = Image.linear_gradient("L").resize((40, 30)).convert("RGB")
    variants = {
        "TIFF-lzw": ("TIFF", {"compression": "tiff_lzw"}),
        "TIFF-deflate": ("TIFF", {"compression": "tiff_adobe_deflate"}),
        "TIFF-jpeg": ("TIFF", {"compression": "jpeg"}),
        "JPEG-progressive": ("JPEG", {"progressive": True}),
        "PNG-interlaced": ("PNG", {"interlace": 1}),
        "WEBP-lossless": ("WEBP", {"lossless": True}),
        "GIF-frames": ("GIF", {"save_all": True, "append_images": [page.rotate(90)]}),
    }
    for name, (fmt, options) in variants.items():
        found.update(_encoded(name, page, fmt, **options))
    return found


def _encoded(name: str, image: Image.Image, fmt: str, **options) -> dict[str, bytes]:
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt, **options)
        Image.open(io.BytesIO(buffer.getvalue())).load()
    except Exception:  # a (format, mode) PIL cannot write or read back: nothing to mutate
        return {}
    return {name: buffer.getvalue()}


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One of: random bytes set, a cut, header bytes set to edge values, a run inserted, a run deleted, a bit flip."""
    data = bytearray(data)
    kind = int(rng.integers(6))
    if kind == 0:
        for _ in range(int(rng.integers(1, 9))):
            data[rng.integers(len(data))] = rng.integers(256)
    elif kind == 1:
        data = data[: rng.integers(len(data))]
    elif kind == 2:  # sizes, offsets and counts live in the header: edge values make huge or empty images
        for _ in range(int(rng.integers(1, 5))):
            data[rng.integers(min(64, len(data)))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, int(rng.integers(256))])
    elif kind == 3:
        i = int(rng.integers(len(data)))
        data[i:i] = rng.bytes(int(rng.integers(1, 64)))
    elif kind == 4:
        i = int(rng.integers(len(data)))
        del data[i : i + int(rng.integers(1, 64))]
    else:
        data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
    return bytes(data)


ODD_VALUES = [None, True, 0, -1, 2**70, 1.5, "", " ", "x\ud800y", "a\0b", "x" * 5000, "../outside.png",
              "/etc/hostname", "images", "images/loop.png", "images/missing.png", "images/good.png", [], {}, [[[]]],
              {"user": 1}, {"user": "q", "assistant": "a"}, ["images/good.png", 3]]  # fmt: skip
WHOLE_FILES = [b"", b"null", b"[]", b"{}", b"[" * 50_000, b"\xff\xfe{", "{}".encode("utf-16"), b"\xef\xbb\xbf{}",
               b'{"img_pth": "images/good.png", "anns": {"user": "q", "assistant": "a"}}' * 2]  # fmt: skip
GOOD_RECORDS = [
    {"img_pth": "images/good.png", "anns": {"user": "q", "assistant": "a", "source": "s"}},
    {"img_pth": ["images/good.png", "images/good.png"], "anns": [{"user": "q", "assistant": "a"}] * 2},
]


def mutated_annotation(rng: np.random.Generator) -> bytes:
    """A JSON file: a good record with bytes mutated, a node of it replaced or dropped, or an odd whole file."""
    record = json.loads(json.dumps(GOOD_RECORDS[int(rng.integers(len(GOOD_RECORDS)))]))
    kind = int(rng.integers(4))
    if kind == 0:
        return mutate(json.dumps(record).encode(), rng)
    if kind == 3:
        return WHOLE_FILES[int(rng.integers(len(WHOLE_FILES)))]
    parent, key = _random_node(record, rng)
    if kind == 1:
        parent[key] = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
    else:
        del parent[key]
    return json.dumps(record).encode()


def _random_node(record, rng: np.random.Generator):
    """(container, key) of a random node below the top level."""
    parent = record
    key = list(record)[int(rng.integers(len(record)))]
    while isinstance(parent[key], (dict, list)) and parent[key] and rng.random() < 0.6:
        parent = parent[key]
        key = int(rng.integers(len(parent))) if isinstance(parent, list) else list(parent)[rng.integers(len(parent))]
    return parent, key


def mutated_table(rng: np.random.Generator, images: list[bytes]) -> pa.Table:
    """Hub-layout rows whose columns are of a random type, with nulls and wrong values among the good ones."""
    texts = [{"user": "q", "assistant": "a", "source": "s"}]
    image_cells = [
        lambda: [{"bytes": images[int(rng.integers(len(images)))], "path": "p"}],
        lambda: None,
        lambda: [],
        lambda: [{"bytes": None, "path": "p"}],
        lambda: [{"bytes": b"", "path": None}],
        lambda: [{"bytes": rng.bytes(40), "path": "p"}],
    ]
    text_cells = [lambda: texts, lambda: None, lambda: [], lambda: [{"user": "q", "assistant": None, "source": None}]]
    shape = int(rng.integers(5))
    rows = []
    for _ in range(int(rng.integers(1, 6))):
        if shape == 0:  # the right schema, odd values
            row = {"images": image_cells[int(rng.integers(len(image_cells)))](), "texts": text_cells[rng.integers(4)]()}
        elif shape == 1:
            row = {"images": int(rng.integers(100)), "texts": texts}
        elif shape == 2:
            row = {"images": [int(rng.integers(100))], "texts": "not a list"}
        elif shape == 3:
            row = {"images": "abc", "texts": [{"user": 1, "assistant": 2}]}
        else:
            row = {"pictures": [{"bytes": images[0]}], "texts": texts}  # the layout's column is missing
        rows.append(row)
    return pa.Table.from_pylist(rows)


# ---------------------------------------------------------------------------------------------------------------
# The two readers, and what each says of every sample


def validate_outcomes(path: Path, processor, split: str = "train") -> tuple[dict[str, str], int] | str:
    """(reason per bad sample, good samples) as ``validate`` reports them, or NO_DATASET."""
    try:
        report = validate_dataset(path, processor, split)
    except DatasetNotFoundError as error:
        assert "\n" not in str(error), str(error)
        return NO_DATASET
    return {p["file"]: p["reason"] for p in report["problems"]}, report["good"]


def training_outcomes(path: Path, processor, cache: Path, split: str = "train") -> tuple[dict[str, str], int] | str:
    """(reason per bad sample, samples encoded) as training meets them: index, then the workers' encoder."""
    try:
        source = open_source(path, "fuzz", ReadOptions(split=split), cache_dir=cache)
        index = load_or_build(source, processor, ImageSpec.from_processor(processor), cache)
    except DatasetNotFoundError as error:
        assert "\n" not in str(error), str(error)
        return NO_DATASET
    reasons = {p.file: p.reason for p in index.problems}
    dataset = ConversationDataset(
        [Part(source, np.arange(len(index)), index)], ExampleEncoder(processor, {}, image_path="fast")
    )
    encoded = 0
    for i in range(len(dataset)):
        item = dataset[i]
        if isinstance(item, Problem):
            reasons[item.file] = item.reason
        else:
            assert item["input_ids"].numel() > 0
            encoded += 1
    return reasons, encoded


def streaming_outcomes(path: Path, processor) -> tuple[dict[str, str], int] | str:
    """(reason per bad row, rows encoded) of a streamed epoch; every row gives one item."""
    try:
        source = open_stream_source("fuzz", str(path), ReadOptions())
    except DatasetNotFoundError as error:
        assert "\n" not in str(error), str(error)
        return NO_DATASET
    items = list(
        StreamingDataset(
            [source], ExampleEncoder(processor, {}, image_path="fast"), BatchPlan(seed=0, batch_size=1), num_workers=0
        )
    )
    assert len(items) == source.rows
    reasons = {item.file: item.reason for item in items if isinstance(item, Problem)}
    return reasons, len(items) - len(reasons)


def agreeing_outcomes(path: Path, processor, cache: Path, split: str = "train") -> tuple[dict[str, str], int] | str:
    """What validate and training say of ``path``, checked to be the same and to name only known reasons."""
    validated = validate_outcomes(path, processor, split)
    trained = training_outcomes(path, processor, cache, split)
    assert validated == trained, path
    if validated != NO_DATASET:
        assert set(validated[0].values()) <= set(REASONS), validated[0]
    return validated


def write_folder(root: Path, annotations: dict[str, bytes], images: dict[str, bytes]) -> Path:
    """A Docling folder with these annotation files and images (under images/), a good image, a symlink loop."""
    (root / "anns" / "train").mkdir(parents=True)
    (root / "images").mkdir()
    Image.new("RGB", (30, 20), "red").save(root / "images" / "good.png")
    os.symlink("loop.png", root / "images" / "loop.png")
    for name, data in images.items():
        (root / "images" / name).write_bytes(data)
    for name, data in annotations.items():
        (root / "anns" / "train" / name).write_bytes(data)
    return root


def tally(outcome: tuple[dict[str, str], int] | str, counts: Counter) -> None:
    if outcome == NO_DATASET:
        counts[NO_DATASET] += 1
    else:
        counts.update(outcome[0].values())
        counts[READ] += outcome[1]


# ---------------------------------------------------------------------------------------------------------------
# The runs


def fuzz_images(tmp_path: Path, processor, n: int, seed: int) -> Counter:
    """``n`` mutated images: decoded alone, then as a Docling folder and as hub parquet rows through both readers;
    each sample's outcome is the one decoding its image alone gave (from the file, or from the bytes: PIL differs
    at times, e.g. a short PCX seeks before the start of a file, EINVAL, but not of a BytesIO)."""
    rng = np.random.default_rng(seed)
    bases = base_images()
    names = sorted(bases)
    cases = {f"{k:05d}-{names[k % len(names)]}.img": mutate(bases[names[k % len(names)]], rng) for k in range(n)}
    anns = GOOD_RECORDS[0]["anns"]
    annotations = {f"{name}.json": json.dumps({"img_pth": f"images/{name}", "anns": anns}).encode() for name in cases}
    folder = write_folder(tmp_path / "folder", annotations, cases)
    from_files = {f"anns/train/{name}.json": alone(folder / "images" / name) for name in cases}
    expected = {name: reason for name, reason in from_files.items() if reason != READ}
    assert agreeing_outcomes(folder, processor, tmp_path / "cache") == (expected, n - len(expected))

    rows = [{"images": [{"bytes": data, "path": name}], "texts": [anns]} for name, data in cases.items()]
    parquet = tmp_path / "images.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=64)
    # a cut to 0 bytes: an empty cell is no image at all in the hub layout
    from_bytes = {f"images.parquet#{k}": alone(data) if data else "bad_schema" for k, data in enumerate(cases.values())}
    expected = {name: reason for name, reason in from_bytes.items() if reason != READ}
    assert agreeing_outcomes(parquet, processor, tmp_path / "cache") == (expected, n - len(expected))
    assert streaming_outcomes(parquet, processor) == (expected, n - len(expected))
    return Counter(from_bytes.values())


def alone(ref: Path | bytes) -> str:
    """READ or the reason, decoding one image by itself; its header read never raises either."""
    image_size(ref)
    try:
        decode_image(ref)
    except ImageError as error:
        return error.reason
    return READ


def fuzz_annotations(tmp_path: Path, processor, n: int, seed: int) -> Counter:
    """``n`` mutated annotation files in one Docling folder, through both readers."""
    rng = np.random.default_rng(seed)
    annotations = {f"{k:05d}.json": mutated_annotation(rng) for k in range(n)}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "outside.png").write_bytes(base_images()["PNG-RGB"])
    folder = write_folder(tmp_path / "annotations", annotations, {})
    outcome = agreeing_outcomes(folder, processor, tmp_path / "cache")
    assert outcome != NO_DATASET and len(outcome[0]) + outcome[1] == n
    counts = Counter()
    tally(outcome, counts)
    return counts


def fuzz_parquet(tmp_path: Path, processor, n: int, seed: int) -> Counter:
    """``n`` parquet files, bytes or column types mutated, through both readers and the streaming reader."""
    rng = np.random.default_rng(seed)
    images = [base_images()[name] for name in ("PNG-RGB", "JPEG-RGB", "QOI-RGB")]
    good = io.BytesIO()
    rows = [{"images": [{"bytes": image, "path": "p"}], "texts": [GOOD_RECORDS[0]["anns"]]} for image in images * 2]
    pq.write_table(pa.Table.from_pylist(rows), good, row_group_size=2)
    counts = Counter()
    for k in range(n):
        path = tmp_path / f"parquet-{k:04d}" / "train.parquet"
        path.parent.mkdir(parents=True)
        if k % 2:
            pq.write_table(mutated_table(rng, images), path)
        else:
            path.write_bytes(mutate(good.getvalue(), rng))
        outcome = agreeing_outcomes(path, processor, tmp_path / "cache")
        tally(outcome, counts)
        streamed = streaming_outcomes(path, processor)
        if streamed != NO_DATASET and outcome != NO_DATASET:  # a damaged data page: one line there, rows named here
            assert streamed == outcome, path
    return counts


def fuzz_docling_eval(tmp_path: Path, processor, n: int, seed: int) -> Counter:
    """``n`` docling-eval rows, most with their GroundTruthDocument mutated (bytes, or nodes replaced or dropped),
    as one dataset through both readers, a sample per page."""
    rng = np.random.default_rng(seed)
    base = docling_eval_rows(["2305.03393v1-pg9", "code_and_formula"])
    rows = []
    for k in range(n):
        row = dict(base[k % len(base)])
        draw = rng.random()
        if draw < 0.2:
            pass  # a good row among the damaged ones
        elif draw < 0.4:
            row["GroundTruthDocument"] = mutate(row["GroundTruthDocument"].encode(), rng).decode("utf-8", "replace")
        else:
            document = json.loads(row["GroundTruthDocument"])
            for _ in range(int(rng.integers(1, 4))):
                parent, key = _random_node(document, rng)
                if rng.random() < 0.7:
                    parent[key] = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
                else:
                    del parent[key]
            row["GroundTruthDocument"] = json.dumps(document)
        rows.append({**row, "document_id": f"doc{k:05d}"})
    outcome = agreeing_outcomes(write_docling_eval(tmp_path / "docling_eval", rows), processor, tmp_path / "c", "test")
    assert outcome != NO_DATASET
    counts = Counter()
    tally(outcome, counts)
    return counts


def run_fuzz(tmp_path: Path, processor, budget: Budget, seed: int) -> dict[str, Counter]:
    return {
        "images": fuzz_images(tmp_path / "i", processor, budget.images, seed),
        "annotations": fuzz_annotations(tmp_path / "a", processor, budget.annotations, seed),
        "parquet": fuzz_parquet(tmp_path / "p", processor, budget.parquet_files, seed),
        "docling-eval rows": fuzz_docling_eval(tmp_path / "d", processor, budget.docling_eval_rows, seed),
    }


def test_every_mutated_input_is_read_or_named(tmp_path, tiny_processor):
    quick = Budget(len(base_images()), QUICK_ANNOTATIONS, QUICK_PARQUET_FILES, QUICK_DOCLING_EVAL_ROWS)
    found = run_fuzz(tmp_path, tiny_processor, quick, seed=QUICK_SEED)
    assert found["images"][READ] > 0 and found["images"]["unreadable_image"] > 0  # the mutations hit both ways
    assert found["annotations"][READ] > 0 and found["annotations"]["invalid_json"] > 0
    assert found["docling-eval rows"][READ] > 0 and found["docling-eval rows"]["bad_document"] > 0


@pytest.mark.slow
def test_every_mutated_input_is_read_or_named_full(tmp_path, tiny_processor):
    started = time.time()
    found = run_fuzz(tmp_path, tiny_processor, FULL, seed=0)
    print(f"\nfuzz: {FULL} in {time.time() - started:.0f} s; {len(base_images())} base images")
    for kind, counts in found.items():
        print(f"  {kind}: {sum(counts.values())} outcomes: " + ", ".join(f"{n} {r}" for r, n in counts.most_common()))
