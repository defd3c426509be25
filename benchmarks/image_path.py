"""The fast image path against the stock Idefics3 processor, through the real DataLoader, on this CPU.

    python benchmarks/image_path.py                 # the real-docs fixture PDFs (9 pages), prepared into a temp folder
    python benchmarks/image_path.py --json          # one JSON object
    python benchmarks/image_path.py --data PATH     # any Docling-format folder

Timing: passes of ``make_loader`` (one worker, batches of one sample), stock and fast alternately so that load on
the machine hits both alike. Worker CPU is the finished worker process's own (decode, encode, collate, and
handing the batch over through shared memory: stock ships float32 tiles, fast uint8 pages); the training
process's CPU is receiving the batches plus, for the fast path, ``batch_pixel_values`` on the CPU (on a GPU
that part runs there). One torch thread everywhere, so CPU seconds are one core's work. Medians over
``--repeats`` passes, per page.

Checks, sample by sample: ``input_ids`` and labels identical, the same number of tiles, and the pixel difference
in grey levels (0..255) over every tile; bytes are the tensors a worker hands over per sample.

Ratios are stock / fast: ``worker_cpu_ratio`` (loader-worker CPU per page), ``total_ratio`` (worker + training
process, everything on this CPU), ``bytes_ratio`` (bytes per sample through the loader).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from granite_docling.data.encoding import collate_skipping_problems  # noqa: E402
from granite_docling.data.image_tiles import batch_pixel_values  # noqa: E402
from granite_docling.data.indexed import ConversationDataset  # noqa: E402
from granite_docling.data.loading import make_loader  # noqa: E402
from granite_docling.data.sources import ReadOptions, read_dataset  # noqa: E402

REAL_DOCS = REPO / "tests" / "fixtures" / "real_docs"


def real_docs_dataset(out: Path) -> Path:
    """The fixture PDFs as a page-per-sample Docling folder (pages rendered at scale 2: 1224x1584 for letter)."""
    from granite_docling.tools.prepare import prepare_dataset

    prepare_dataset(sorted(REAL_DOCS.glob("*.pdf")), out, unit="page")
    return out


def tensor_bytes(example: dict) -> int:
    """Bytes of every tensor in a loader item (what crosses from the worker to the training process)."""
    total = 0
    for value in example.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, torch.Tensor):
                total += item.numel() * item.element_size()
    return total


def loader_seconds(dataset: ConversationDataset, indices: list[int], pad_id: int, spec) -> dict[str, float]:
    """CPU seconds of one pass of the real loader (one worker, batches of one sample) over ``indices``: the
    worker's (encode + collate + handing the batch over through shared memory; read off the finished worker
    process) and the training process's (receiving the batches, plus tiling them where the path needs it)."""
    loader = make_loader(dataset, indices, batch_size=1, num_workers=1, pad_id=pad_id)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    start, device = time.process_time(), 0.0
    for batch in loader:
        if "images" in batch:
            tiles_start = time.process_time()
            batch_pixel_values(batch["images"], batch["image_layouts"], spec, "cpu")
            device += time.process_time() - tiles_start
    main = time.process_time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the worker has exited and been waited for
    worker = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return {"worker": worker, "main": main, "device": device}


def compare(stock: ConversationDataset, fast: ConversationDataset, pad_id: int, spec) -> dict:
    """input_ids, labels and tile counts equal? Pixel differences in grey levels, bytes per sample."""
    levels_per_unit = spec.std[0] / spec.rescale_factor  # normalised value -> grey levels
    differences, ids_equal, tiles_equal, stock_bytes, fast_bytes = [], True, True, 0, 0
    for index in range(len(stock)):
        reference, example = stock[index], fast[index]
        batch = collate_skipping_problems([example], pad_id)
        pixel_values, _ = batch_pixel_values(batch["images"], batch["image_layouts"], spec, "cpu")
        stock_bytes, fast_bytes = stock_bytes + tensor_bytes(reference), fast_bytes + tensor_bytes(example)
        ids_equal &= torch.equal(reference["input_ids"], example["input_ids"])
        ids_equal &= torch.equal(reference["labels"], example["labels"])
        tiles_equal &= reference["pixel_values"].shape == pixel_values[0].shape
        if reference["pixel_values"].shape == pixel_values[0].shape:
            differences.append(((pixel_values[0] - reference["pixel_values"]).abs() * levels_per_unit).flatten())
    difference = torch.cat(differences)
    sample = difference[torch.randperm(len(difference), generator=torch.Generator().manual_seed(0))[:10_000_000]]
    return {
        "mean_abs_levels": float(difference.mean()),
        "p99_levels": float(torch.quantile(sample, 0.99)),
        "max_levels": float(difference.max()),
        "input_ids_equal": bool(ids_equal),
        "tile_layout_equal": bool(tiles_equal),
        "stock_bytes_per_sample": stock_bytes / len(stock),
        "fast_bytes_per_sample": fast_bytes / len(stock),
    }


def measure(data: Path, repeats: int, max_samples: int | None) -> dict:
    from transformers import AutoProcessor

    from granite_docling.model import ASSETS_DIR

    torch.set_num_threads(1)  # CPU seconds then measure one core's work (the forked worker inherits this)
    processor = AutoProcessor.from_pretrained(ASSETS_DIR)
    samples, _ = read_dataset(data, data.name, ReadOptions(max_samples=max_samples))
    stock = ConversationDataset.from_samples({data.name: samples}, processor, {}, image_path="stock")
    fast = ConversationDataset.from_samples({data.name: samples}, processor, {}, image_path="fast")
    pad_id = processor.tokenizer.pad_token_id
    spec = fast.encoder.image_spec(data.name)
    result = compare(stock, fast, pad_id, spec)

    pages = sum(len(sample.images) for sample in samples)
    runs = {"stock": [], "fast": []}
    for _ in range(repeats):  # alternate, so that load on the machine hits both alike
        for name, dataset in (("stock", stock), ("fast", fast)):
            runs[name].append(loader_seconds(dataset, list(range(len(samples))), pad_id, spec))
    per_page = {
        name: {key: statistics.median(run[key] for run in results) / pages for key in ("worker", "main", "device")}
        for name, results in runs.items()
    }
    stock_total = per_page["stock"]["worker"] + per_page["stock"]["main"]
    fast_total = per_page["fast"]["worker"] + per_page["fast"]["main"]
    return {
        "data": str(data),
        "samples": len(samples),
        "pages": pages,
        "worker_cpu_ratio": per_page["stock"]["worker"] / per_page["fast"]["worker"],
        "total_ratio": stock_total / fast_total,
        "bytes_ratio": result["stock_bytes_per_sample"] / result["fast_bytes_per_sample"],
        **result,
        "stock_worker_seconds_per_page": per_page["stock"]["worker"],
        "stock_total_seconds_per_page": stock_total,
        "fast_worker_seconds_per_page": per_page["fast"]["worker"],
        "fast_device_seconds_per_page": per_page["fast"]["device"],
        "fast_total_seconds_per_page": fast_total,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a Docling-format folder (default: the real-docs fixture pages)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per sample; the median counts")
    parser.add_argument("--max-samples", type=int, default=None, help="only the first N samples")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or real_docs_dataset(Path(tmp) / "real_docs")
        result = measure(data, args.repeats, args.max_samples)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['samples']} samples, {result['pages']} pages from {result['data']}")
    print(
        f"loader-worker CPU per page: stock {result['stock_worker_seconds_per_page']:.3f} s, fast "
        f"{result['fast_worker_seconds_per_page']:.3f} s  -> {result['worker_cpu_ratio']:.1f}x less"
    )
    print(
        f"total CPU per page (worker + training process, this CPU): stock "
        f"{result['stock_total_seconds_per_page']:.3f} s, fast {result['fast_total_seconds_per_page']:.3f} s "
        f"(tiling {result['fast_device_seconds_per_page']:.3f} s)  -> {result['total_ratio']:.1f}x less"
    )
    print(
        f"bytes per sample: stock {result['stock_bytes_per_sample'] / 1e6:.1f} MB, fast "
        f"{result['fast_bytes_per_sample'] / 1e6:.1f} MB  -> {result['bytes_ratio']:.1f}x fewer"
    )
    print(
        f"pixels: mean |diff| {result['mean_abs_levels']:.3f} grey levels, p99 {result['p99_levels']:.1f}, "
        f"max {result['max_levels']:.0f}; input_ids equal: {result['input_ids_equal']}, tile layout equal: "
        f"{result['tile_layout_equal']}"
    )
    return 0 if result["input_ids_equal"] and result["tile_layout_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
