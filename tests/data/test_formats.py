"""The recipe "how to add a dataset format", kept true: a toy format (a folder of ``answers/<split>/*.txt``, one
sample each, all on ``page.png``) is registered in a few lines, then auto-detected and read by ``open_source``,
checked by ``granite-docling validate``'s reader, indexed for training, and accepted by pre-flight and the config
check."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixture_data import good_dataset, write_image

from granite_docling.config import DatasetConfig
from granite_docling.data.formats import FORMATS, detect_format, format_problems
from granite_docling.data.formats.base import ReadOptions, Source, limit
from granite_docling.data.formats.hub import is_hub_id
from granite_docling.data.image_tiles import ImageSpec
from granite_docling.data.index import load_or_build
from granite_docling.data.sample import Sample, Turn
from granite_docling.data.sources import open_source, read_dataset
from granite_docling.preflight import dataset_path_problems
from granite_docling.tools.validate import validate_dataset


class TextAnswers(Source):
    """The toy format: ``answers/<split>/<id>.txt`` holds the answer to "Convert this page to docling." about
    ``page.png``."""

    format_name = "text_answers"

    def __init__(self, path, name: str, options: ReadOptions, cache_dir=None):
        self.root, self.name, self.options = Path(path), name, options
        self.files = sorted((self.root / "answers" / options.split).glob("*.txt"))

    @classmethod
    def detect(cls, path: Path, columns) -> bool:
        return (path / "answers").is_dir() and (path / "page.png").is_file()

    @classmethod
    def layout_problem(cls, path: Path, split: str):
        found = sorted(p.name for p in (path / "answers").iterdir()) if (path / "answers").is_dir() else []
        return None if split in found else (f"has no answers/{split}/", found)

    def fingerprint(self) -> str:
        return str([(f.name, f.stat().st_mtime_ns) for f in self.files])

    def __len__(self) -> int:
        return len(self.files)

    def locator(self, i: int) -> str:
        return self.files[i].name

    def record_id(self, locator) -> str:
        return f"answers/{self.options.split}/{locator}"

    def read(self, locator) -> Sample:
        answer = (self.root / self.record_id(locator)).read_text()
        turn = Turn("Convert this page to docling.", answer)
        return limit(
            Sample(self.record_id(locator), self.name, (self.root / "page.png",), (turn,), self.root), self.options
        )


@pytest.fixture
def text_answers(monkeypatch):
    """The registration, one line (undone after the test)."""
    monkeypatch.setitem(FORMATS, TextAnswers.format_name, TextAnswers)


def toy_dataset(root: Path, answers: list[str], split: str = "train") -> Path:
    write_image(root / "page.png")
    (root / "answers" / split).mkdir(parents=True)
    for i, answer in enumerate(answers):
        (root / "answers" / split / f"{i:03d}.txt").write_text(answer)
    return root


def test_a_registered_format_is_detected_read_and_validated(text_answers, tmp_path, tiny_processor):
    root = toy_dataset(tmp_path / "toy", ["<doctag>a</doctag>", "<doctag>b</doctag>"])
    assert detect_format(root) == "text_answers"
    source = open_source(root, "toy", ReadOptions())
    assert isinstance(source, TextAnswers)
    samples, problems = read_dataset(root, "toy", ReadOptions())
    assert [s.turns[0].assistant for s in samples] == ["<doctag>a</doctag>", "<doctag>b</doctag>"] and not problems
    report = validate_dataset(root, tiny_processor)
    assert (report["samples"], report["good"], report["bad"]) == (2, 2, 0)
    index = load_or_build(source, tiny_processor, ImageSpec.from_processor(tiny_processor), tmp_path / "cache")
    assert [index.locator(i) for i in range(len(index))] == ["000.txt", "001.txt"]  # what training reads by


def test_preflight_and_the_config_check_know_a_registered_format(text_answers, tmp_path):
    root = toy_dataset(tmp_path / "toy", ["x"])
    for fmt in ("auto", "text_answers"):
        datasets = {"toy": DatasetConfig(path=str(root), format=fmt)}
        assert format_problems(datasets) == [] and dataset_path_problems(datasets) == []
    wrong_split = {"toy": DatasetConfig(path=str(root), split="val")}
    assert dataset_path_problems(wrong_split) == [
        f"dataset.toy.path={root} has no answers/val/; set dataset.toy.split to one of train"
    ]
    streamed = {"toy": DatasetConfig(path=str(root), format="text_answers", streaming=True)}
    assert format_problems(streamed) == [
        "dataset.toy: this format is indexed, not streamed; drop dataset.toy.streaming=true"
    ]


def test_an_unregistered_format_is_named_with_the_known_ones(tmp_path):
    assert "text_answers" not in FORMATS  # the fixture's registration was undone
    assert format_problems({"toy": DatasetConfig(path="x", format="text_answers")}) == [
        "dataset.toy.format='text_answers' is not one of auto, docling, docling_eval, hub"
    ]
    assert detect_format(good_dataset(tmp_path / "d", 1)) == "docling"


def test_one_hub_id_rule(tmp_path, monkeypatch):
    assert is_hub_id("HuggingFaceM4/DoclingMatix") and is_hub_id("ds4sd/SynthFormulaNet")
    for not_one in ("/data", "./x", "~/x", "a/b/c", "name", "s3://bucket/x", "hf://datasets/org/name", "org/na me"):
        assert not is_hub_id(not_one), not_one
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("org/name")  # a folder here
