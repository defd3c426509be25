"""Evaluation's two engines on the same checkpoint and samples: transformers' ``generate`` here against an
OpenAI-compatible server (vLLM), samples/s of each and whether their answers agree.

    make serve CHECKPOINT=outputs/<run>/final_model &            # in another shell: vLLM in .venv-vllm
    python benchmarks/engines.py outputs/<run>/final_model data/eval --server-url http://localhost:8000 --json

Both answer the first turn of the same samples (the first ``--samples`` of ``--split`` with at most ``--max-images``
images, the server's per-prompt limit) with the same per-sample
token budgets (``--max-new-tokens``, cut at ``--reference-factor`` x the reference as ``evaluate.py`` does):
transformers in batches of ``--batch-size`` (float32, this process), the server with ``--concurrency`` requests in
flight (:func:`granite_docling.evaluation.server.generate_via_server`, what ``eval.engine=server`` runs). Each side
is timed over all samples after one warm-up request; ``ratio`` is the server's samples/s over transformers'.
``same_answers`` counts the samples whose texts are equal (greedy on both sides: a trained model agrees; random
weights can break near-ties differently in float32).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="the model folder the server serves")
    parser.add_argument("data", type=Path, help="a dataset (Docling folder, parquet, docling-eval shards)")
    parser.add_argument("--server-url", required=True, help="e.g. http://localhost:8000")
    parser.add_argument("--split", default="train")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-images", type=int, default=1, help="the server's --limit-mm-per-prompt (make serve: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--reference-factor", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=4, help="transformers: prompts per generate call")
    parser.add_argument("--concurrency", type=int, default=16, help="server: requests in flight")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    import torch

    from granite_docling.config import ModelConfig
    from granite_docling.data.sources import ReadOptions, read_dataset
    from granite_docling.evaluation.generate import first_turn_prompt, generate, reference_budgets
    from granite_docling.evaluation.server import generate_via_server
    from granite_docling.model import load_model_and_processor

    samples, _ = read_dataset(args.data, args.data.name, ReadOptions(split=args.split))
    samples = [s for s in samples if len(s.images) <= args.max_images][: args.samples]  # the server's image limit
    model, processor = load_model_and_processor(ModelConfig(name="served", checkpoint=str(args.checkpoint)))
    prompts = [first_turn_prompt(sample) for sample in samples]
    references = [sample.turns[0].assistant for sample in samples]
    budgets = reference_budgets(processor, references, args.max_new_tokens, args.reference_factor)

    generate(model, processor, prompts[:1], budgets[:1], progress=False)  # warm-up
    started = time.perf_counter()
    local = generate(model, processor, prompts, budgets, args.batch_size, progress=False)
    local_seconds = time.perf_counter() - started

    generate_via_server(args.server_url, prompts[:1], budgets[:1], progress=False)  # warm-up
    started = time.perf_counter()
    served = generate_via_server(args.server_url, prompts, budgets, args.concurrency, progress=False)
    served_seconds = time.perf_counter() - started

    result = {
        "samples": len(samples),
        "transformers_samples_per_s": len(samples) / local_seconds,
        "server_samples_per_s": len(samples) / served_seconds,
        "ratio": local_seconds / served_seconds,
        "same_answers": sum(a.text == b.text and a.stopped == b.stopped for a, b in zip(local, served, strict=True)),
        "new_tokens_transformers": sum(a.new_tokens for a in local),
        "new_tokens_server": sum(b.new_tokens for b in served),
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "torch_threads": torch.get_num_threads(),
        "checkpoint": str(args.checkpoint),
        "answers": [
            {"transformers": a.text, "server": b.text, "stopped": [a.stopped, b.stopped]}
            for a, b in zip(local, served, strict=True)
        ],
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
