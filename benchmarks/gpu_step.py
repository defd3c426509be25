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

FLOPs per sample (model FLOPs: what the architecture needs, not what the hardware ran; our loss recomputes each
chunk's logits in backward, which is not counted, and neither is padding):

* trained parts: 6 x parameters x tokens they process (forward 2, backward 4); frozen parts: 2 x (forward only);
* vision: its parameters x patches (1,024 per 512 px tile; padding tiles are dropped by Idefics3 and not counted),
  plus attention 4 x layers x patches^2 x width per tile (QK^T and AV, 2 FLOPs per multiply-add);
* connector: its parameters x image tokens (64 per tile);
* text: its parameters without the embedding x the sample's tokens, plus attention 4 x layers x tokens^2 x width
  (the full square, the usual convention, though the mask is causal);
* output layer (tied to the embedding): vocabulary x hidden x supervised tokens, the only positions our loss
  projects.

MFU = FLOPs per second / ``--peak-tflops`` (989: the H100 SXM's dense bf16 peak; 756 for an H100 PCIe).
``mfu_loop_formula`` is the ``train/mfu`` that the training loop logs (6, or 2 if frozen, x every parameter x text
tokens, no attention), for comparison: it runs the vision encoder once per text token instead of once per patch
(16 patches per image token), so on full pages it reads ~4x lower than ``mfu``.
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
    from granite_docling.data.prepare import PAGE_PROMPT, document_doctags, write_json
    from granite_docling.data.synth import synth_document

    out, index, seed, scale = task
    document = synth_document(seed, index, 1, scale)
    name = f"page_{index:04d}"
    document.images[0].save(out / "images" / "train" / f"{name}.png")
    turn = {"user": PAGE_PROMPT, "assistant": document_doctags(document.doc), "source": "synthetic"}
    write_json(out / "anns" / "train" / f"{name}.json", {"img_pth": f"images/train/{name}.png", "anns": turn})


def write_pages(out: Path, pages: int, seed: int = 0, scale: float = 2.0) -> Path:
    """``pages`` synthetic one-page documents (Docling folder format), each a page image at ``scale`` + DocTags."""
    from multiprocessing import Pool

    from granite_docling.data.prepare import prepare_output_dirs

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


class FlopCounter:
    """Model FLOPs of one training sample from parameter counts, token counts and tiles (see the module docstring)."""

    def __init__(self, model):
        from granite_docling.model import parameter_counts

        counts = parameter_counts(model)
        config = model.config
        vision, text = config.vision_config, config.text_config
        embedding = model.get_input_embeddings().weight.numel()
        self.vision_params = counts["vision"]
        self.connector_params = counts["connector"]
        self.text_params = counts["text"] - embedding  # the embedding is a lookup; as output layer, counted apart
        self.head_params = embedding  # tied: vocab x hidden
        self.patches = (vision.image_size // vision.patch_size) ** 2
        self.tokens_per_tile = self.patches // config.scale_factor**2
        self.vision_attention = 4 * vision.num_hidden_layers * self.patches**2 * vision.hidden_size
        self.text_attention_per_token2 = 4 * text.num_hidden_layers * text.num_attention_heads * text.head_dim

    def sample(self, tokens: int, tiles: int, supervised: int, train_vision: bool) -> float:
        vision = tiles * (2 * self.vision_params * self.patches + self.vision_attention)
        connector = 2 * self.connector_params * tiles * self.tokens_per_tile
        text = 2 * self.text_params * tokens + self.text_attention_per_token2 * tokens**2
        head = 2 * self.head_params * supervised
        return vision * (3 if train_vision else 1) + 3 * (connector + text + head)


def batch_shape(batch: dict) -> list[tuple[int, int, int]]:
    """(tokens, tiles, supervised tokens) of every sample of a batch, padding excluded."""
    tokens = batch["attention_mask"].sum(dim=1).tolist()
    supervised = (batch["labels"][:, 1:] != -100).sum(dim=1).tolist()
    if "image_layouts" in batch:  # the fast image path
        tiles = [sum(layout.tiles for layout in layouts) for layouts in batch["image_layouts"]]
    elif "pixel_values" in batch:  # the stock path: all-zero tiles are padding
        tiles = (batch["pixel_values"].flatten(2).abs().sum(-1) > 0).sum(dim=1).tolist()
    else:
        tiles = [0] * len(tokens)
    return list(zip(tokens, tiles, supervised, strict=True))


def peak_memory_gb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_configuration(accelerator, loss_module, cfg, processor, flops: FlopCounter, batch_size: int,
                      freeze_vision: bool, steps: int, warmup: int, peak_tflops: float) -> dict:  # fmt: skip
    """Time ``steps`` optimizer steps of one (batch size, vision frozen or not) configuration."""
    import torch
    from accelerate.utils import set_seed

    from granite_docling import train_loop
    from granite_docling.data.loading import build_data, make_loader
    from granite_docling.model import component_of, parameter_groups
    from granite_docling.train_loop import backward_step

    t = cfg.training
    model = accelerator.unwrap_model(loss_module).model
    for name, parameter in model.named_parameters():
        if component_of(name) == "vision":
            parameter.requires_grad_(not freeze_vision)
    cfg = copy.deepcopy(cfg)
    cfg.training.batch_size = batch_size
    set_seed(t.seed)
    data = build_data(cfg, processor)
    loader = make_loader(data.train, data.train_sampler, batch_size, t.num_workers, processor.tokenizer.pad_token_id)
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
        loss, _ = backward_step(accelerator, loss_module, [batch])
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        shape = batch_shape(batch) if batch["ids"] else []
        records.append({"seconds": time.perf_counter() - start, "wait": waited, "loss": loss, "shape": shape})
    loop_formula = getattr(train_loop, "training_flops_per_token", None)  # the loop's own logged MFU, to compare
    loop_flops_per_token = loop_formula(model) if loop_formula else None
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
        # train/mfu as train_loop logs it: 6 (2 if frozen) x every parameter x text tokens, no attention term
        "mfu_loop_formula": None
        if loop_flops_per_token is None
        else sum(s[0] for r in timed for s in r["shape"]) * loop_flops_per_token / seconds / (peak_tflops * 1e12),
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
                      f"training.num_workers={args.num_workers}", "training.val_ratio=0",
                      f"training.length_cache_dir={Path(tmp) / 'lengths'}", *args.override)  # fmt: skip
        accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
        set_seed(cfg.training.seed)
        model, processor = load_model_and_processor(cfg.model)
        flops = FlopCounter(model)
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
