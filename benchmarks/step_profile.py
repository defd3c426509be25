"""Where the time of one training step goes: data, vision encoder, connector, text layers, loss, backward, optimizer.

    python benchmarks/step_profile.py --json                         # full-size architecture, 512 px pages
    python benchmarks/step_profile.py --preset tiny --samples 2 --json   # a quick run (tests)

The model is the preset with random weights, the data the 9 real-docs pages (``prepare_dataset``, scale 2) at
``--image-edge`` px, batch 1, float32, through the loop's own pieces: the loader (in this process), ``model_inputs``
(the fast image path tiles pages there), ``TokenLoss`` (our chunked loss) and fused AdamW. Forward phases are timed with
hooks on the model's ``vision_model``, ``connector`` and ``text_model``; ``loss`` is the rest of the forward (the
output layer and cross-entropy over supervised positions). Each phase's seconds per sample are the mean over the
samples after the first (warm-up).
"""

from __future__ import annotations

import argparse
import glob
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_DOCS = REPO / "tests" / "fixtures" / "real_docs"
PHASES = ("data", "inputs", "vision", "connector", "text", "loss", "backward", "optimizer")


def clock_modules(model, seconds: dict[str, float]) -> None:
    """Add each forward of the model's vision encoder, connector and text layers to ``seconds``."""
    inner = model.model
    for name, module in (("vision", inner.vision_model), ("connector", inner.connector), ("text", inner.text_model)):
        started = {}
        module.register_forward_pre_hook(lambda *_, started=started: started.__setitem__("t", time.perf_counter()))
        module.register_forward_hook(
            lambda *_, name=name, started=started: seconds.__setitem__(
                name, seconds[name] + time.perf_counter() - started["t"]
            )
        )


def profile(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from granite_docling.data.loading import build_data, make_loader
    from granite_docling.data.sampler import BatchPlan
    from granite_docling.launch import compose_config
    from granite_docling.loss import TokenLoss
    from granite_docling.model import load_model_and_processor, parameter_groups
    from granite_docling.optimization import model_inputs
    from granite_docling.tools.prepare import prepare_dataset

    data_dir = work / "pages"
    prepare_dataset(sorted(glob.glob(str(REAL_DOCS / "*.pdf"))), data_dir, unit="page", scale=2.0)
    edge = [f"model.image_longest_edge={args.image_edge}"] if args.image_edge else []
    dataset = [f"dataset.folder.path={data_dir}", "dataset.folder.max_turns=1", "data.val_ratio=0"]
    cache = f"data.index_cache_dir={work / 'index'}"
    cfg = compose_config(
        REPO / "conf", f"model={args.preset}", "model.random_init=true", *edge, "dataset=[folder]", *dataset, cache
    )
    torch.manual_seed(0)
    model, processor = load_model_and_processor(cfg.model)
    t = cfg.training
    data = build_data(cfg.dataset, processor, cfg.data, BatchPlan(t.seed, t.batch_size, t.gradient_accumulation_steps))
    loader = make_loader(data.train, range(len(data.train)), 1, 0, processor.tokenizer.pad_token_id)
    groups = parameter_groups(model, {"vision": t.lr_vision, "text": t.lr_text, "connector": t.lr_connector}, 0.01)
    optimizer = torch.optim.AdamW(groups, fused=True)  # as the loop does by default
    loss_module = TokenLoss(model, t.loss_chunk_size, t.loss_recompute).train()
    device = torch.device("cpu")

    totals: dict[str, float] = defaultdict(float)
    forward = defaultdict(float)
    clock_modules(model, forward)
    batches = iter(loader)
    timed = 0
    for k in range(min(args.samples, len(data.train))):
        step: dict[str, float] = {}
        forward.clear()
        started = time.perf_counter()
        batch = next(batches)
        step["data"] = time.perf_counter() - started
        started = time.perf_counter()
        inputs = model_inputs(batch, device)
        step["inputs"] = time.perf_counter() - started
        started = time.perf_counter()
        row_sums, tokens = loss_module(**inputs)
        total_forward = time.perf_counter() - started
        step |= {name: forward[name] for name in ("vision", "connector", "text")}
        step["loss"] = total_forward - sum(forward[name] for name in ("vision", "connector", "text"))
        started = time.perf_counter()
        (row_sums.sum() / max(tokens, 1)).backward()
        step["backward"] = time.perf_counter() - started
        started = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step["optimizer"] = time.perf_counter() - started
        if k == 0:
            continue  # warm-up
        timed += 1
        for name, seconds in step.items():
            totals[name] += seconds
    if not timed:
        raise RuntimeError("--samples must be at least 2 (the first is warm-up)")
    per_sample = {name: totals[name] / timed for name in PHASES}
    step_seconds = sum(per_sample.values())
    return {
        "preset": args.preset,
        "image_edge": args.image_edge,
        "samples_timed": timed,
        "seconds_per_sample": per_sample,
        "share": {name: per_sample[name] / step_seconds for name in PHASES},
        "step_seconds": step_seconds,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="granite_docling_258m", help="conf/model preset (random init)")
    parser.add_argument("--image-edge", type=int, default=512, help="pages resized to this long edge; 0 = preset's")
    parser.add_argument("--samples", type=int, default=9, help="samples to run, the first one warm-up")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="step_profile_") as work:
        result = profile(args, Path(work))
    if args.json:
        print(json.dumps(result))
    else:
        for name in PHASES:
            print(f"{name:10s} {result['seconds_per_sample'][name]:8.3f} s  {100 * result['share'][name]:5.1f}%")


if __name__ == "__main__":
    main()
