"""Batches by tokens against batch 1 on a mix like the seed's: documents of 1-3 pages beside many formula crops.

    python benchmarks/token_budget.py --json                        # 90 pages in 1-3 page documents, 400 crops
    python benchmarks/token_budget.py --pages 6 --formulas 24 --json   # a quick run (tests)
    python benchmarks/token_budget.py --preset small --override training.mixed_precision=bf16

The seed guide's own config trains one DoclingMatix shard (~1,150 documents) beside SynthFormulaNet capped at
10,000 crops: about 9 crops per document. The data here is ``granite-docling sample-data`` in that proportion
(two datasets, ``docs`` and ``crops``). Both runs train one whole epoch of the same samples through
:func:`granite_docling.train_loop.train` at the seed's global batch (1 x 8 accumulation, one process):

* ``batch 1``: one sample per forward / backward pass, as the seed's config does;
* ``budget``: ``data.batch_tokens`` set to the longest sample's length (image tokens included), so no
  micro-batch holds more padded tokens than the longest sample alone.

Reported for each: forward / backward passes over the epoch (all, and per dataset: the passes that hold its
samples and its samples per pass), the largest padded micro-batch (tokens), samples/s over the epoch after the
first ``--warmup`` steps, and the mean loss (the same steps, so the same losses up to float error); over the same
steps, the share of the time spent waiting for data, and on a GPU the MFU the loop logs and the peak GPU memory
(``torch.cuda.max_memory_allocated``). ``benchmarks/gpu_check.sh`` runs it at full size with
``training.mixed_precision=auto``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_data(root: Path, pages: int, formulas: int) -> dict[str, Path]:
    paths = {"docs": root / "docs", "crops": root / "crops"}
    for name, (n_pages, n_formulas) in {"docs": (pages, 0), "crops": (0, formulas)}.items():
        command = [sys.executable, "-m", "granite_docling.cli", "sample-data", str(paths[name]),
                   "--pages", str(n_pages), "--formulas", str(n_formulas), "--qa-turns", "0"]  # fmt: skip
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    return paths


def compose(args: argparse.Namespace, paths: dict[str, Path], run_dir: Path, *extra: str):
    from granite_docling.launch import compose_config

    return compose_config(
        REPO / "conf",
        f"model={args.preset}",
        "dataset=[folder,sample]",
        "dataset.folder.name=docs",
        f"dataset.folder.path={paths['docs']}",
        "dataset.folder.max_turns=1",
        "dataset.sample.name=crops",
        f"dataset.sample.path={paths['crops']}",
        "training.num_epochs=1",
        "training.batch_size=1",
        "training.gradient_accumulation_steps=8",
        "data.val_ratio=0",
        "training.save_interval=0",
        "training.log_interval=1",
        "training.gradient_checkpointing=false",
        "training.mixed_precision=no",
        f"data.num_workers={args.num_workers}",
        f"data.index_cache_dir={run_dir.parent / 'index'}",
        *args.override,
        *extra,
    )


def passes(cfg) -> dict:
    """Forward / backward passes of one epoch from the sampler, overall and per dataset, and the largest one."""
    from granite_docling.data.loading import build_data
    from granite_docling.data.sampler import BatchPlan
    from granite_docling.model import load_model_config, load_processor

    processor = load_processor(cfg.model, load_model_config(cfg.model))
    t = cfg.training
    data = build_data(cfg.dataset, processor, cfg.data, BatchPlan(t.seed, t.batch_size, t.gradient_accumulation_steps))
    sampler, tokens = data.train_sampler, data.train_sampler.lengths[0]
    names = [name for name, size in zip(data.train.source_names, data.train.sizes, strict=True) for _ in range(size)]
    sampler.set_epoch(0)
    batches = [b for b in sampler if b]
    by_dataset = {}
    for name in dict.fromkeys(names):
        holding = [b for b in batches if any(names[i] == name for i in b)]
        samples = sum(names[i] == name for b in batches for i in b)
        by_dataset[name] = {"samples": samples, "passes": len(holding), "samples_per_pass": samples / len(holding)}
    return {
        "passes": len(batches),
        "largest_padded_tokens": max(len(b) * int(tokens[b].max()) for b in batches),
        "longest_sample": int(tokens.max()),
        "by_dataset": by_dataset,
    }


def train_epoch(cfg, run_dir: Path, warmup: int) -> dict:
    import torch

    from granite_docling.train_loop import train

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if train(cfg, run_dir).exit_code != 0:
        raise RuntimeError(f"training exited with an error; see {run_dir}")
    peak_gpu_gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "train/loss" in row]
    global_batch = cfg.training.batch_size * cfg.training.gradient_accumulation_steps
    timed = rows[warmup:-1]  # every step but the epoch's last holds the global batch
    if not timed:
        raise RuntimeError(f"{len(rows)} steps leave none to time after {warmup} warm-up steps and the last")
    step_seconds = [global_batch / row["train/samples_per_second"] for row in timed]
    seconds = sum(step_seconds)
    mfu = [row.get("train/mfu") for row in timed]  # logged where the device's peak is known (GPUs)
    return {
        "steps": len(rows),
        "samples_per_s": global_batch * len(timed) / seconds,
        "data_wait_share": sum(row["train/data_wait"] * s for row, s in zip(timed, step_seconds, strict=True))
        / seconds,
        "mfu": None if None in mfu else sum(m * s for m, s in zip(mfu, step_seconds, strict=True)) / seconds,
        "peak_gpu_memory_gb": peak_gpu_gb,
        "mean_loss": sum(row["train/loss"] for row in rows) / len(rows),
        "passes_logged": sum(row["train/micro_batches"] for row in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=90, help="document pages (1-3 per document)")
    parser.add_argument("--formulas", type=int, default=400, help="formula crops")
    parser.add_argument("--preset", default="tiny", help="conf/model preset")
    parser.add_argument("--override", action="append", default=[], help="config override for both runs (repeatable)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of samples/s")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="token_budget_") as work:
        work = Path(work)
        paths = make_data(work / "data", args.pages, args.formulas)
        plain = compose(args, paths, work / "batch1")
        plan = {"batch1": passes(plain)}
        budget = plan["batch1"]["longest_sample"]
        budgeted = compose(args, paths, work / "budget", f"data.batch_tokens={budget}")
        plan["budget"] = passes(budgeted)
        result = {"preset": args.preset, "batch_tokens": budget}
        for name, cfg in (("batch1", plain), ("budget", budgeted)):
            result[name] = plan[name] | train_epoch(cfg, work / name, args.warmup)
    result["passes_ratio"] = result["batch1"]["passes"] / result["budget"]["passes"]
    result["speedup"] = result["budget"]["samples_per_s"] / result["batch1"]["samples_per_s"]
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
