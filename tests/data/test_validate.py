"""`granite-docling validate`: counts, reasons, token lengths that match the processor, exit codes."""

from __future__ import annotations

import json

import pytest
from conftest import run_script
from fixture_data import BAD_FILES, dataset_with_bad_samples, good_dataset
from PIL import Image
from transformers import AutoProcessor

from granite_docling.data.encoding import encode_conversation
from granite_docling.data.sample import Sample, Turn
from granite_docling.model import ASSETS_DIR
from granite_docling.tools.validate import count_tokens, percentiles


@pytest.fixture(scope="module")
def real_processor():
    return AutoProcessor.from_pretrained(ASSETS_DIR)


@pytest.mark.parametrize(
    "sizes", [[(612, 792)], [(8, 8)], [(3000, 400)], [(600, 800), (200, 100)], [(700, 500)], [(500, 700)], []]
)
def test_token_count_matches_the_real_processor(real_processor, sizes):
    images = [Image.new("RGB", size, "white") for size in sizes]
    sample = Sample("x", "d", tuple(images), (Turn("Convert this page to docling.", "<doctag>hi</doctag>"),))
    encoded = encode_conversation(real_processor, sample.turns, images)
    tokens, tiles = count_tokens(real_processor, sample, sizes)
    assert tokens == len(encoded["input_ids"])
    assert tiles == (encoded["pixel_values"].shape[0] if images else 0)


def test_token_count_matches_the_tiny_processor_with_single_tile_images(tiny_processor):
    images = [Image.new("RGB", (40, 30), "white")]  # fits one 64 px tile: no splitting
    sample = Sample("x", "d", tuple(images), (Turn("q", "a"),))
    tokens, tiles = count_tokens(tiny_processor, sample, [(40, 30)])
    encoded = encode_conversation(tiny_processor, sample.turns, images)
    assert (tokens, tiles) == (len(encoded["input_ids"]), encoded["pixel_values"].shape[0])


def test_percentiles():
    assert percentiles([]) == {}
    assert percentiles([5, 1, 3]) == {"min": 1.0, "p50": 3.0, "p90": 5.0, "p99": 5.0, "max": 5.0}


def test_validate_json_names_every_bad_sample(tmp_path):
    root = dataset_with_bad_samples(tmp_path / "data", n_good=4)
    result = run_script("-m", "granite_docling.cli", "validate", str(root), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert (report["samples"], report["good"], report["bad"]) == (4 + len(BAD_FILES), 4, len(BAD_FILES))
    assert {(p["file"], p["reason"]) for p in report["problems"]} == {
        (f"anns/train/{name}", reason) for name, reason in BAD_FILES.items()
    }
    assert report["tokens"]["max"] > report["tokens"]["min"] > 0
    assert report["images_per_sample"] == {"min": 1.0, "p50": 1.0, "p90": 1.0, "p99": 1.0, "max": 1.0}


def test_validate_exit_codes_and_text_report(tmp_path):
    good = run_script("-m", "granite_docling.cli", "validate", str(good_dataset(tmp_path / "good", 3)))
    assert good.returncode == 0, good.stderr
    assert "3 samples, 3 good, 0 bad" in good.stdout and "tokens / sample" in good.stdout
    (tmp_path / "empty").mkdir()
    missing = run_script("-m", "granite_docling.cli", "validate", str(tmp_path / "empty"))
    assert missing.returncode == 2 and "not a dataset" in missing.stderr
