"""Padding with length-grouped batches against random batches, batch size 8, on one dataset.

    python benchmarks/padding.py                    # synthetic pages + formula crops (write_sample_data), temp folder
    python benchmarks/padding.py --json             # one JSON object
    python benchmarks/padding.py --data PATH        # any Docling-format folder
    python benchmarks/padding.py --real-docs        # the 9 real-docs fixture pages (prepare_dataset)

Lengths (tokens, tiles) come from the text and the image headers (``granite_docling.data.lengths``), with the
real processor; the first batches are then encoded through the real loader to check that the padding the sampler
predicts is the padding the batches get. Both samplers see the same epochs (same seed, same samples);
``padding_fraction`` is the share of the padded (B, T_max) token grid that is padding, summed over the epochs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from granite_docling.data.image_tiles import ImageSpec  # noqa: E402
from granite_docling.data.indexed import ConversationDataset  # noqa: E402
from granite_docling.data.lengths import LengthCounter, padding_fraction  # noqa: E402
from granite_docling.data.loading import make_loader  # noqa: E402
from granite_docling.data.sampler import BatchPlan, GlobalBatchSampler  # noqa: E402
from granite_docling.data.sources import ReadOptions, read_dataset  # noqa: E402


def synthetic_dataset(out: Path, pages: int, formulas: int) -> Path:
    from granite_docling.tools.sample_data import write_sample_data

    write_sample_data(out, pages=pages, formulas=formulas, seed=0)
    return out


def real_docs_dataset(out: Path) -> Path:
    from granite_docling.tools.prepare import prepare_dataset

    prepare_dataset(sorted((REPO / "tests" / "fixtures" / "real_docs").glob("*.pdf")), out, unit="page")
    return out


def measured_padding(dataset: ConversationDataset, batches: list[list[int]], pad_id: int) -> float:
    """Padding of ``batches`` as the real loader builds them (from ``attention_mask``)."""
    flat = [i for batch in batches for i in batch]
    loader = make_loader(dataset, flat, batch_size=len(batches[0]), num_workers=0, pad_id=pad_id)
    real = grid = 0
    for batch in loader:
        real, grid = real + int(batch["attention_mask"].sum()), grid + batch["attention_mask"].numel()
    return 1 - real / grid


def measure(data: Path, batch_size: int, epochs: int, check_batches: int, seed: int = 0) -> dict:
    from transformers import AutoProcessor

    from granite_docling.model import ASSETS_DIR

    processor = AutoProcessor.from_pretrained(ASSETS_DIR)
    samples, _ = read_dataset(data, data.name, ReadOptions())
    lengths = LengthCounter(processor).count(samples, ImageSpec.from_processor(processor))
    tokens, tiles = [t for t, _ in lengths], [n for _, n in lengths]
    arrays = (np.array(tokens), np.array(tiles))
    grouped = GlobalBatchSampler([len(samples)], [None], BatchPlan(seed, batch_size), lengths=arrays)
    plain = GlobalBatchSampler([len(samples)], [None], BatchPlan(seed, batch_size))
    epochs_batches = {"grouped": [], "random": []}
    for epoch in range(epochs):
        for name, sampler in (("grouped", grouped), ("random", plain)):
            sampler.set_epoch(epoch)
            epochs_batches[name] += list(sampler)

    result = {
        "data": str(data),
        "samples": len(samples),
        "batch_size": batch_size,
        "epochs": epochs,
        "padding_fraction": padding_fraction(epochs_batches["grouped"], tokens),
        "random_padding_fraction": padding_fraction(epochs_batches["random"], tokens),
        "tile_padding_fraction": padding_fraction(epochs_batches["grouped"], tiles),
        "random_tile_padding_fraction": padding_fraction(epochs_batches["random"], tiles),
        "tokens_per_sample": {"min": min(tokens), "median": statistics.median(tokens), "max": max(tokens)},
    }
    result["padding_ratio"] = result["random_padding_fraction"] / max(result["padding_fraction"], 1e-12)
    if check_batches:
        dataset = ConversationDataset.from_samples({data.name: samples}, processor, {}, image_path="fast")
        full = [b for b in epochs_batches["grouped"] if len(b) == batch_size][:check_batches]
        predicted = padding_fraction(full, tokens)
        result["checked_batches"] = len(full)
        result["predicted_equals_measured"] = (
            abs(predicted - measured_padding(dataset, full, processor.tokenizer.pad_token_id)) < 1e-9
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a Docling-format folder (default: synthetic pages)")
    parser.add_argument("--real-docs", action="store_true", help="use the real-docs fixture pages")
    parser.add_argument("--pages", type=int, default=240, help="synthetic document pages (default data)")
    parser.add_argument("--formulas", type=int, default=80, help="synthetic formula crops (default data)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--check-batches", type=int, default=4, help="batches encoded to check the prediction")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            data = args.data
        elif args.real_docs:
            data = real_docs_dataset(Path(tmp) / "real_docs")
        else:
            data = synthetic_dataset(Path(tmp) / "synthetic", args.pages, args.formulas)
        result = measure(data, args.batch_size, args.epochs, args.check_batches)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    lengths = result["tokens_per_sample"]
    print(f"{result['samples']} samples ({lengths['min']}-{lengths['max']} tokens, median {lengths['median']:g}) "
          f"from {result['data']}, batch {result['batch_size']}, {result['epochs']} epochs")  # fmt: skip
    print(f"padding: length-grouped {result['padding_fraction']:.1%}, random {result['random_padding_fraction']:.1%}"
          f"  -> {result['padding_ratio']:.0f}x less")  # fmt: skip
    print(f"tile padding: length-grouped {result['tile_padding_fraction']:.1%}, "
          f"random {result['random_tile_padding_fraction']:.1%}")  # fmt: skip
    if "checked_batches" in result:
        print(f"predicted padding equals the loader's on {result['checked_batches']} batches: "
              f"{result['predicted_equals_measured']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
