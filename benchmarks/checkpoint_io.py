"""What choosing the checkpoint to resume reads from the disk: the manifests of this format against the pickled
training states the older format had to load, over three checkpoints of one run, measured in one process.

    python benchmarks/checkpoint_io.py --json                   # the full-size architecture (~15 GB of disk)
    python benchmarks/checkpoint_io.py --preset tiny --json     # a quick run (tests)

Three checkpoints (steps 1-3) of the preset with random weights and a real AdamW state (every parameter has its two
moments, as after any optimizer step) are written with :func:`granite_docling.checkpoint.save_checkpoint`, and beside
each the same training state as the older format's pickled ``training_state.pt``. Then:

* ``resume=auto`` now: :func:`granite_docling.checkpoint_manifest.latest_checkpoint` (reads the manifests);
* the older format: every ``training_state.pt`` loaded whole to read its step, as ``checkpoint_sort_key`` did
  (here with ``weights_only=True``, which reads the same bytes).

Bytes read are the process's ``rchar`` (``/proc/self/io``): every byte a read call returned, from the disk or the
page cache alike. Also reported: the seconds a save takes, flushed to the disk (``fsync``) included.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar")


def trained_state(preset: str):
    """Model, processor, optimizer and scheduler after one AdamW step on zero gradients (moments of full size)."""
    import torch

    from granite_docling.launch import compose_config
    from granite_docling.model import load_model_and_processor, parameter_groups

    cfg = compose_config(REPO / "conf", f"model={preset}", "model.random_init=true")
    model, processor = load_model_and_processor(cfg.model)
    t = cfg.training
    groups = parameter_groups(model, {"vision": t.lr_vision, "text": t.lr_text, "connector": t.lr_connector}, 0.0)
    optimizer = torch.optim.AdamW(groups)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, processor, optimizer, scheduler


def measure(preset: str, work: Path) -> dict:
    import torch

    from granite_docling.checkpoint import read_pickled_state, rng_state, save_checkpoint, training_state
    from granite_docling.checkpoint_manifest import PICKLED_STATE_FILE, latest_checkpoint
    from granite_docling.training_run import LoopState

    model, processor, optimizer, scheduler = trained_state(preset)
    root = work / "checkpoints"
    save_seconds = []
    for step in (1, 2, 3):
        state = training_state(optimizer, scheduler, asdict(LoopState(step=step)), [rng_state()], "training: {}\n")
        started = time.perf_counter()
        folder = save_checkpoint(root / f"checkpoint_step_{step}", model, processor, state)
        save_seconds.append(time.perf_counter() - started)
        torch.save(state, folder / PICKLED_STATE_FILE)  # the older format, beside it
    del model, optimizer

    before = bytes_read()
    chosen = latest_checkpoint(root)
    manifests = bytes_read() - before

    before = bytes_read()
    steps = {}
    for folder in sorted(root.iterdir()):  # what the older format's checkpoint_sort_key did for each
        steps[folder] = read_pickled_state(folder / PICKLED_STATE_FILE)["loop"]["step"]  # all of it, to read a number
    pickles = bytes_read() - before
    assert chosen == max(steps, key=steps.get), "both ways must choose the same checkpoint"

    files = [p for p in (root / "checkpoint_step_3").rglob("*") if p.is_file() and p.name != PICKLED_STATE_FILE]
    return {
        "preset": preset,
        "checkpoints": 3,
        "checkpoint_mb": round(sum(p.stat().st_size for p in files) / MB, 1),
        "training_state_pt_mb": round((root / "checkpoint_step_3" / PICKLED_STATE_FILE).stat().st_size / MB, 1),
        "resume_auto_bytes_read": manifests,
        "older_format_bytes_read": pickles,
        "ratio": round(pickles / max(manifests, 1), 1),
        "save_seconds": [round(s, 2) for s in save_seconds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="granite_docling_258m", help="conf/model preset (random init)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the checkpoints (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="checkpoint_io_", dir=args.work))
    try:
        result = measure(args.preset, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.preset}: 3 checkpoints of {result['checkpoint_mb']} MB each")
        print(f"  resume=auto reads {result['resume_auto_bytes_read']:,} bytes to choose one")
        print(f"  the older format read {result['older_format_bytes_read']:,} bytes ({result['ratio']}x)")
        print(f"  a save, flushed to the disk, takes {', '.join(map(str, result['save_seconds']))} s")


if __name__ == "__main__":
    main()
