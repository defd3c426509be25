"""Optimizer steps of the full-size architecture on real-size pages: samples/s, MFU, peak memory, data-wait share.

    python benchmarks/gpu_step.py                          # one GPU: batch 1, 2, 4, 8 x vision trained / frozen
    python benchmarks/gpu_step.py --batch-sizes 4 --freeze-vision false --steps 20
    python benchmarks/gpu_step.py --cpu-smoke              # the tiny preset, 1 step per configuration, on CPU

``benchmarks/gpu_check.sh`` runs it under a time limit. Prints one JSON line per configuration.

What runs is the training path itself, minus its bookkeeping: ``model=granite_docling_258m model.random_init=true``
(257.5 M parameters, random weights, the vendored processor at its real settings: 2048 px long edge, 512 px tiles),
data through ``build_data`` / ``make_loader`` (fast image path, length grouping), the step through
:func:`granite_docling.train_loop.backward_step` with :class:`granite_docling.loss.TokenLoss`, then gradient
clipping and fused AdamW with the loop's parameter groups, under Accelerate's bf16 autocast. The pages are
synthetic one-page documents rendered at scale 2 (1224x1584 px: 17 tiles, ~1.1k image tokens each), with their
DocTags as answers. One model is built; each configuration gets fresh optimizer state and its own loader.

Timing: every step is synchronised; ``data_wait_share`` is the time spent waiting for the next batch over the
step time, both summed over the timed steps (the first ``--warmup`` steps are left out).

MFU = model FLOPs per second (:class:`granite_docling.flops.ModelFlops`, the count the training loop logs as
``train/mfu``: vision per patch, attention included, the output layer at supervised positions only) over
``--peak-tflops`` (989: the H100 SXM's dense bf16 peak; 756 for an H100 PCIe).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _write_page(task: tuple[Path, int, int, float]) -> None:
    from granite_docling.data.answers import PAGE_PROMPT, document_doctags
    from granite_docling.tools.prepare import write_json
    from granite_docling.tools.sample_data import synth_document

    out, index, seed, scale = task
    document = synth_document(seed, index, 1, scale)
    name = f"page_{index:04d}"
    document.images[0].save(out / "images" / "train" / f"{name}.png")
    turn = {"user": PAGE_PROMPT, "assistant": document_doctags(document.doc), "source": "synthetic"}
    write_json(out / "anns" / "train" / f"{name}.json", {"img_pth": f"images/train/{name}.png", "anns": turn})


def write_pages(out: Path, pages: int, seed: int = 0, scale: float = 2.0) -> Path:
    """``pages`` synthetic one-page documents (Docling folder format), each a page image at ``scale`` + DocTags."""
    from multiprocessing import Pool

    from granite_docling.tools.prepare import prepare_output_dirs

    prepare_output_dirs(out, "train", overwrite=True)
    tasks = [(out, index, seed, scale) for index in range(pages)]
    processes = min(8, os.cpu_count() or 1, pages)
    if processes > 1:
        with Pool(processes) as pool:
            pool.map(_write_page, tasks)
    else:
        for task in tasks:
            _write_page(task)
    return out


def compose(*overrides: str):
    """conf/config.yaml composed with ``overrides`` into the typed Config, as train.py does."""
    from granite_docling.launch import compose_config

    return compose_config(REPO / "conf", *overrides)


def peak_memory_gb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_configuration(accelerator, loss_module, cfg, processor, flops, batch_size: int,
                      freeze_vision: bool, steps: int, warmup: int, peak_tflops: float) -> dict:  # fmt: skip
    """Time ``steps`` optimizer steps of one (batch size, vision frozen or not) configuration."""
    import torch
    from accelerate.utils import set_seed

    from granite_docling.data.loading import build_data, make_loader
    from granite_docling.data.sampler import BatchPlan
    from granite_docling.flops import batch_shape
    from granite_docling.model import component_of, parameter_groups
    from granite_docling.optimization import backward_step

    t = cfg.training
    model = accelerator.unwrap_model(loss_module).model
    for name, parameter in model.named_parameters():
        if component_of(name) == "vision":
            parameter.requires_grad_(not freeze_vision)
    cfg = copy.deepcopy(cfg)
    cfg.training.batch_size = batch_size
    set_seed(t.seed)
    data = build_data(cfg.dataset, processor, cfg.data, BatchPlan(t.seed, batch_size, t.gradient_accumulation_steps))
    loader = make_loader(data.train, data.train_sampler, batch_size, data.num_workers, processor.tokenizer.pad_token_id)
    rates = {"vision": t.lr_vision, "text": t.lr_text, "connector": t.lr_connector}
    fused = accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(parameter_groups(model, rates, t.weight_decay), fused=fused)
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    epoch, batches = 0, None
    records = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        batch = None
        while batch is None:
            if batches is None:
                data.train_sampler.set_epoch(epoch)
                batches = iter(loader)
            batch = next(batches, None)
            if batch is None:
                epoch, batches = epoch + 1, None
        waited = time.perf_counter() - start
        loss = backward_step(accelerator, loss_module, [batch]).loss
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        shape = batch_shape(batch)
        records.append({"seconds": time.perf_counter() - start, "wait": waited, "loss": loss, "shape": shape})
    timed = records[warmup:]
    seconds = sum(r["seconds"] for r in timed)
    samples = sum(len(r["shape"]) for r in timed)
    model_flops = sum(flops.sample(*s, train_vision=not freeze_vision) for r in timed for s in r["shape"])
    result = {
        "batch_size": batch_size,
        "freeze_vision": freeze_vision,
        "samples_per_s": samples / seconds,
        "tokens_per_s": sum(s[0] for r in timed for s in r["shape"]) / seconds,
        "mfu": model_flops / seconds / (peak_tflops * 1e12),
        "tflops_per_s": model_flops / seconds / 1e12,
        "tflop_per_sample": model_flops / samples / 1e12,
        "peak_memory_gb": peak_memory_gb(device),
        "data_wait_share": sum(r["wait"] for r in timed) / seconds,
        "step_seconds": seconds / len(timed),
        "tokens_per_sample": sum(s[0] for r in timed for s in r["shape"]) / samples,
        "tiles_per_sample": sum(s[1] for r in timed for s in r["shape"]) / samples,
        "supervised_per_sample": sum(s[2] for r in timed for s in r["shape"]) / samples,
        "final_loss": records[-1]["loss"],
        "timed_steps": len(timed),
    }
    del optimizer, loader, data
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny preset on CPU, batch 1, 1 step per config")
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="comma-separated")
    parser.add_argument("--freeze-vision", default="both", choices=("both", "true", "false"))
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per configuration, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--pages", type=int, help="synthetic pages to make; default: largest batch x steps")
    parser.add_argument("--data", type=Path, help="a Docling folder instead of the synthetic pages")
    parser.add_argument("--num-workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 2)))
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=float(os.environ.get("PEAK_TFLOPS", 989.0)),
        help="accelerator peak for MFU, TFLOP/s (H100 SXM dense bf16: 989; env PEAK_TFLOPS)",
    )
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later configurations are skipped")
    parser.add_argument("--override", action="append", default=[], help="extra config override (repeatable)")
    args = parser.parse_args(argv)
    began = time.perf_counter()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from granite_docling.flops import ModelFlops
    from granite_docling.loss import TokenLoss
    from granite_docling.model import load_model_and_processor

    if args.cpu_smoke:
        preset, precision, batch_sizes = ["model=tiny"], "no", [1]
        args.steps, args.warmup, args.pages = 1, 0, args.pages or 2
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: install a CUDA build of torch, or run with --cpu-smoke")
        preset, precision = ["model=granite_docling_258m", "model.random_init=true"], "bf16"
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must be larger than --warmup ({args.warmup})")
    freeze = {"both": [False, True], "true": [True], "false": [False]}[args.freeze_vision]

    with tempfile.TemporaryDirectory(prefix="gpu_step_") as tmp:
        data = args.data or write_pages(Path(tmp) / "pages", args.pages or max(batch_sizes) * args.steps)
        cfg = compose(*preset, "dataset=[folder]", f"dataset.folder.path={data}", "dataset.folder.max_turns=1",
                      f"training.mixed_precision={precision}", "training.gradient_checkpointing=false",
                      f"training.batch_size={max(batch_sizes)}", "training.gradient_accumulation_steps=1",
                      f"data.num_workers={args.num_workers}", "data.val_ratio=0",
                      f"data.index_cache_dir={Path(tmp) / 'lengths'}", *args.override)  # fmt: skip
        accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
        set_seed(cfg.training.seed)
        model, processor = load_model_and_processor(cfg.model)
        flops = ModelFlops(model)
        loss_module = accelerator.prepare(TokenLoss(model, cfg.training.loss_chunk_size))
        loss_module.train()
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        common = {"model": cfg.model.name, "device": device_name, "mixed_precision": precision,
                  "peak_tflops": args.peak_tflops, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                  "torch": torch.__version__}  # fmt: skip
        for freeze_vision in freeze:
            for batch_size in batch_sizes:
                config = {"batch_size": batch_size, "freeze_vision": freeze_vision}
                if args.time_budget is not None and time.perf_counter() - began > args.time_budget:
                    print(json.dumps({**config, "skipped": "time budget", **common}), flush=True)
                    continue
                try:
                    result = run_configuration(accelerator, loss_module, cfg, processor, flops, batch_size,
                                               freeze_vision, args.steps, args.warmup, args.peak_tflops)  # fmt: skip
                except torch.cuda.OutOfMemoryError as error:
                    model.zero_grad(set_to_none=True)
                    gc.collect()
                    torch.cuda.empty_cache()
                    result = {**config, "error": f"out of memory: {str(error).splitlines()[0]}"}
                print(json.dumps({**result, **common}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
