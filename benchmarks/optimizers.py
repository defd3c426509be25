"""Every optimizer x schedule of conf/optimizer and conf/scheduler on the same tiny-preset run: final validation
loss and seconds per optimizer step; and on the full-size architecture at 512 px, one step's time and peak memory
per optimizer.

    python benchmarks/optimizers.py                                   # tiny: 6 optimizers x 4 schedules, 40 steps
    python benchmarks/optimizers.py --optimizers sgd --schedules wsd --steps 2 --pages 4 --formulas 4   # quick
    python benchmarks/optimizers.py --full                            # full size at 512 px (a GPU, or ~20 GB RAM)
    python benchmarks/optimizers.py --full-state                      # full size: optimizer state alone, ~1 GB RAM

Tiny: ``experiment=quick`` (the tiny preset, batch 4, learning rates 3e-3, 10 warmup steps) on sample data made
with ``granite-docling sample-data --seed 7 --pages 4 --formulas 36`` (a seed no test or demo trains on; mostly
formula crops, whose steps take a second on two CPU cores, where a batch of pages takes ten), 20% held out, ``--steps``
optimizer steps through :func:`granite_docling.train_loop.train` in this process, one run after the other with
the same data order; the validation loss is the final model's (for schedule-free, its average), seconds per step
the loop's own throughput window over all steps (the first, which allocates the optimizer's state, included).

Full: ``model=granite_docling_258m model.random_init=true model.image_longest_edge=512`` (257.5 M parameters),
one synthetic page at 512 px and its answer, each optimizer in a fresh process: forward, backward and two
optimizer steps (the first makes the state); the second step's seconds and the peak memory (CUDA's
``max_memory_allocated``, or the process's peak resident size on a CPU). ``--full-state`` measures what needs
no weights: the full-size architecture built on the meta device, and the bytes of the state each optimizer makes
at its first update (:func:`granite_docling.optimizers.state_bytes`, the memory probe's own measure). Prints one
JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPTIMIZERS = ["adamw", "adafactor", "muon", "sgd", "schedule_free", "adamw_8bit"]
SCHEDULES = ["cosine", "linear", "constant", "wsd"]


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from granite_docling.config import register_configs
    from granite_docling.launch import register_resolvers

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name="config", overrides=list(overrides)))


def tiny_run(data: Path, optimizer: str, schedule: str, steps: int, out: Path) -> dict:
    from granite_docling.train_loop import train

    cfg = compose("experiment=quick", f"dataset.sample.path={data}", f"optimizer={optimizer}",
                  f"scheduler={schedule}", f"training.max_steps={steps}", f"training.log_interval={steps}",
                  "data.val_ratio=0.2", "data.num_workers=0")  # fmt: skip
    run_dir = out / f"{optimizer}-{schedule}"
    result = train(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    throughput = [row["train/samples_per_second"] for row in rows if "train/samples_per_second" in row]
    batch = cfg.training.batch_size * cfg.training.gradient_accumulation_steps
    return {
        "part": "tiny",
        "optimizer": optimizer,
        "scheduler": schedule,
        "steps": steps,
        "exit_code": result.exit_code,
        "final_train_loss": round(rows[-2 if "val/loss" in rows[-1] else -1]["train/loss"], 4),
        "val_loss": round(result.latest["val/loss"], 4),
        "seconds_per_step": round(batch / throughput[-1], 3),
    }


def full_run(optimizer: str) -> dict:
    """One optimizer on the full-size architecture at 512 px, in this process: two steps, the second timed."""
    import torch
    from PIL import Image

    from granite_docling.model import load_model_and_processor
    from granite_docling.optimization import make_optimizer
    from granite_docling.optimizers import state_bytes

    cfg = compose("model=granite_docling_258m", "model.random_init=true", "model.image_longest_edge=512",
                  f"optimizer={optimizer}")  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_model_and_processor(cfg.model)
    model.to(device).train()
    optimizer_, _ = make_optimizer(model, cfg.training, cfg.optimizer, 10, cfg.scheduler)
    if hasattr(optimizer_, "train"):
        optimizer_.train()
    page = Image.new("RGB", (512, 512), "white")
    answer = "<doctag><text>Hello</text></doctag>"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Convert this page."}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]  # fmt: skip
    text = processor.apply_chat_template(messages)
    batch = {k: v.to(device) for k, v in processor(text=[text], images=[[page]], return_tensors="pt").items()}
    batch["labels"] = batch["input_ids"].clone()
    seconds = []
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        optimizer_.step()
        optimizer_.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    state = state_bytes(optimizer_)  # the memory probe's own measure (8-bit states hold ints beside tensors)
    return {"part": "full", "optimizer": optimizer, "device": device.type, "step_seconds": round(seconds[1], 2),
            "peak_memory_gb": round(peak_gb, 2), "optimizer_state_gb": round(state / 2**30, 3)}  # fmt: skip


def full_state(optimizer: str) -> dict:
    """The optimizer state of the full-size architecture, from its shapes alone."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    from granite_docling.model import load_model_config
    from granite_docling.optimization import make_optimizer
    from granite_docling.optimizers import state_bytes

    cfg = compose("model=granite_docling_258m", "model.random_init=true", f"optimizer={optimizer}")
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(load_model_config(cfg.model))
    optimizer_, _ = make_optimizer(model, cfg.training, cfg.optimizer, 10, cfg.scheduler)
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = state_bytes(optimizer_)
    return {"part": "full_state", "optimizer": optimizer, "weights_mib": round(weights / 2**20),
            "state_mib": round(state / 2**20), "state_per_weight_byte": round(state / weights, 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per tiny run")
    parser.add_argument("--pages", type=int, default=4, help="sample-data document pages")
    parser.add_argument("--formulas", type=int, default=36, help="sample-data formula crops")
    parser.add_argument("--full", action="store_true", help="the full-size part instead of the tiny one")
    parser.add_argument("--full-state", action="store_true", help="full size: each optimizer's state, no weights")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the full-size part's child process
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    optimizers = args.optimizers.split(",")
    if args.one:
        print(json.dumps(full_run(args.one)), flush=True)
        return 0
    if args.full_state:
        for name in optimizers:
            print(json.dumps(full_state(name)), flush=True)
        return 0
    if args.full:
        for name in optimizers:  # a fresh process each: peak memory is the run's own
            done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            print(lines[-1] if lines else json.dumps({"part": "full", "optimizer": name, "error": done.stderr[-500:]}))
        return 0
    from granite_docling.cli import main as granite_docling

    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data"
        granite_docling(["sample-data", str(data), "--pages", str(args.pages), "--formulas", str(args.formulas),
                         "--seed", "7"])  # fmt: skip
        for optimizer in optimizers:
            for schedule in args.schedules.split(","):
                print(json.dumps(tiny_run(data, optimizer, schedule, args.steps, Path(folder))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
