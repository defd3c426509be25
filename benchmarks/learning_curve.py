"""A learning curve on CPU: the ``small`` preset trained on synthetic formula crops, held-out crops scored with
``evaluate.py`` at a few points, against the untrained model.

    python benchmarks/learning_curve.py                  # ~20 minutes on 2 cores; writes benchmarks/learning_curve.*
    python benchmarks/learning_curve.py --steps 60 --eval-samples 8 --out /tmp/lc   # a quick smoke run

Steps: make train / held-out crops with ``granite-docling sample-data`` (different seeds, so no overlap), save the
untrained model (same seed as training), train with ``experiment=learning_curve`` (checkpoints every
``--save-steps``), then run ``evaluate.py`` on each checkpoint. Prints and writes exact match, edit distance and
BLEU against optimizer steps (JSON, Markdown table, PNG). A toy model on toy data: the curve shows that the whole
path learns, not how granite-docling itself will fine-tune.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("exact_match", "edit_distance", "bleu", "f1")


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def save_untrained(out: Path, seed: int) -> Path:
    """The small preset's random initialisation, as training starts from it (same seed)."""
    from accelerate.utils import set_seed

    from granite_docling.checkpoint import save_checkpoint
    from granite_docling.launch import compose_config
    from granite_docling.model import load_model_and_processor

    cfg = compose_config(REPO / "conf", "experiment=learning_curve")
    set_seed(seed)
    model, processor = load_model_and_processor(cfg.model)
    return save_checkpoint(out, model, processor, None)


def evaluate(checkpoint: Path, data: Path, out: Path, samples: int, max_new_tokens: int) -> dict:
    run("evaluate.py", f"checkpoint={checkpoint}", "dataset=[sample]", f"dataset.sample.path={data}",
        "eval.split=all", f"eval.max_samples={samples}", f"eval.max_new_tokens={max_new_tokens}",
        "eval.batch_size=8", "eval.page_exports=false", f"hydra.run.dir={out}")  # fmt: skip
    overall = json.loads((out / "metrics.json").read_text())["overall"]
    return {name: overall[name]["mean"] for name in METRICS}


def plot(points: list[dict], path: Path) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), dpi=110)
    for ax, name in zip(axes, ("exact_match", "edit_distance", "bleu"), strict=True):
        ax.plot([p["step"] for p in points], [p[name] for p in points], "o-")
        ax.set_title(f"held-out {name.replace('_', ' ')}")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle("small preset on synthetic formula crops, CPU")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "learning_curve")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps to train")
    parser.add_argument("--save-steps", type=int, default=75, help="evaluate a checkpoint every N steps")
    parser.add_argument("--train-formulas", type=int, default=2000)
    parser.add_argument("--eval-samples", type=int, default=48, help="held-out crops scored at each point")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks", help="where the JSON / PNG / table go")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args()

    out, started = args.out, time.time()
    train_data, held_out = out / "train_data", out / "held_out"
    if not train_data.exists():
        run("-m", "granite_docling.cli", "sample-data", str(train_data), "--pages", "0",
            "--formulas", str(args.train_formulas), "--seed", "0")  # fmt: skip
    if not held_out.exists():
        run("-m", "granite_docling.cli", "sample-data", str(held_out), "--pages", "0",
            "--formulas", str(args.eval_samples), "--seed", "1")  # fmt: skip

    untrained = save_untrained(out / "untrained", args.seed)
    train_started = time.time()
    overrides = [f"dataset.sample.path={train_data}", f"training.max_steps={args.steps}", f"training.seed={args.seed}",
                 f"training.save_steps={args.save_steps}", f"hydra.run.dir={out / 'run'}"]  # fmt: skip
    run("train.py", "experiment=learning_curve", *overrides)
    train_minutes = (time.time() - train_started) / 60

    checkpoints = {0: untrained}
    for folder in sorted((out / "run" / "checkpoints").glob("checkpoint_step_*")):
        checkpoints[int(folder.name.rsplit("_", 1)[1])] = folder
    checkpoints[args.steps] = out / "run" / "final_model"
    points = []
    for step, folder in sorted(checkpoints.items()):
        scores = evaluate(folder, held_out, out / "eval" / f"step_{step}", args.eval_samples, args.max_new_tokens)
        points.append({"step": step, **scores})
        print(json.dumps(points[-1]), flush=True)

    total_minutes = (time.time() - started) / 60
    result = {"points": points, "train_minutes": round(train_minutes, 1), "total_minutes": round(total_minutes, 1),
              "eval_samples": args.eval_samples, "train_formulas": args.train_formulas}  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "learning_curve.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(points, args.results / "learning_curve.png")
    if args.json:
        print(json.dumps(result))
    else:
        print("| step | exact match | edit distance | BLEU | F1 |\n|---:|---:|---:|---:|---:|")
        for p in points:
            print(
                f"| {p['step']} | {p['exact_match']:.3f} | {p['edit_distance']:.3f} | {p['bleu']:.3f} | {p['f1']:.3f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
