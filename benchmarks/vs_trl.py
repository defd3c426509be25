"""Training throughput of our loop against TRL's ``SFTTrainer``: same model, pages, batch, steps, workers, lr.

    python benchmarks/vs_trl.py --json                       # real-docs pages, tiny preset, 20 steps of batch 2
    python benchmarks/vs_trl.py --data data/mine --steps 20 --batch-size 4
    python benchmarks/vs_trl.py --epochs 1 --batch-size 1 --num-workers 0 --preset granite_docling_258m \
        --override model.random_init=true --override model.image_longest_edge=512 --json   # full size, whole epoch

``--same-order`` checks our step against TRL's: TRL trains the samples in the order and batches our run trained
them (its sampler made sequential over our order), with the newline it supervises after ``<|end_of_text|>``
masked, so both sides supervise the same tokens from the same weights; ``max_step_loss_rel_diff`` is the largest
relative difference of the two sides' per-step losses (ours must agree within 1%).

``--override`` applies any config override to both sides (the model preset, the page size, ...);
``--ours-batch-size`` gives our side another global batch (say 8 under ``data.batch_tokens``, where TRL's
batch is as large as its memory allows). ``--epochs N``
trains whole epochs on both sides, so both see every sample the same number of times; a run of ``--steps`` sees
the first steps' samples of each side's own order, which differ (ours groups by length), and the result says
so (``same_samples``: whether both sides supervised the same tokens, counting TRL's one extra per sample).
Each side's peak memory is the resident high-water mark of this process while it trains (``VmHWM`` reset
before each side; loader workers are other processes: ``--num-workers 0`` keeps everything in this one); on a GPU
also the most memory torch held there (``peak_gpu_memory_mb``, ``torch.cuda.max_memory_allocated``).

Both runs happen in this one process, one after the other, from the same random initialisation (the ``tiny``
preset: the real vendored tokenizer and processor, 64 px tiles, pages resized to a 128 px long edge, ~900 tokens
per real page). Ours goes through :func:`granite_docling.train_loop.train` with a composed config (its defaults:
fast image path, length-grouped batches, chunked loss on supervised positions only). TRL is set up as its docs
advise for a vision-language model: a prompt-completion dataset (one user turn with the page image, one assistant
turn), so its ``DataCollatorForVisionLanguageModeling`` runs the stock processor and ``completion_only_loss``
(TRL's default for that format) masks the prompt. ``assistant_only_loss`` is not available: granite-docling's chat
template has no ``{% generation %}`` markers and TRL cannot patch it. Both runs: float32 (``--bf16``: bf16
autocast), no gradient checkpointing, AdamW with the same constant learning rate, weight decay 0.01, clipping at
1.0, no evaluation or checkpoints during the timed steps.

Timing: the seconds between the ends of consecutive optimizer steps (data wait included), over every step after
the first ``--warmup`` ones; samples/s is the samples of those steps over that time. ``ratio`` is ours over TRL's.

The losses are reported, not compared: TRL's completion also supervises the newline the chat template writes after
each answer's ``<|end_of_text|>``, one more token per sample than ours, so equal models give slightly different
numbers; and the two runs see the pages in different orders (ours groups them by length).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_DOCS = REPO / "tests" / "fixtures" / "real_docs"


def compose(*overrides: str):
    """conf/config.yaml composed with ``overrides`` into the typed Config, as train.py does."""
    from granite_docling.launch import compose_config

    return compose_config(REPO / "conf", *overrides)


def prepare_real_docs(out: Path, max_pages: int | None = None) -> Path:
    """The real-docs PDFs rendered at scale 2 (1224x1584 for a letter page), one sample per page."""
    from granite_docling.tools.prepare import prepare_dataset

    prepare_dataset(sorted(glob.glob(str(REAL_DOCS / "*.pdf"))), out, unit="page", scale=2.0)
    if max_pages is not None:  # keep the first pages only (quick runs): drop the other annotations
        for extra in sorted((out / "anns" / "train").glob("*.json"))[max_pages:]:
            extra.unlink()
    return out


def config_overrides(args: argparse.Namespace, data: Path, run_dir: Path, batch_size: int) -> list[str]:
    lr = args.lr
    if args.epochs:
        length = [f"training.num_epochs={args.epochs}", "training.max_steps=null"]
    else:
        length = [f"training.max_steps={args.steps}"]
    return [
        f"model={args.preset}", "dataset=[folder]", f"dataset.folder.path={data}", "dataset.folder.max_turns=1",
        *length, f"training.batch_size={batch_size}",
        "training.gradient_accumulation_steps=1", f"data.num_workers={args.num_workers}",
        "training.gradient_checkpointing=false", f"training.mixed_precision={'bf16' if args.bf16 else 'no'}",
        "data.val_ratio=0",
        f"training.lr_vision={lr}", f"training.lr_text={lr}", f"training.lr_connector={lr}",
        f"training.min_lr={lr}",  # min_lr == lr: a constant schedule, like TRL's lr_scheduler_type=constant
        "training.warmup_steps=0", "training.weight_decay=0.01", "training.max_grad_norm=1.0",
        "training.log_interval=1", "training.save_interval=0",
        f"training.seed={args.seed}", f"data.index_cache_dir={run_dir / 'index'}", *args.override,
    ]  # fmt: skip


def reset_peak_memory() -> None:
    """Start new high-water marks: this process's resident memory (Linux: ``/proc/self/clear_refs``) and the GPU's."""
    if _cuda():
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb() -> float | None:
    """This process's resident high-water mark since the last reset, in MiB (None where it cannot be read)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def peak_gpu_memory_mb() -> float | None:
    """The most GPU memory torch held for tensors since the last reset, in MiB (None without a GPU)."""
    if not _cuda():
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def timed_rate(step_seconds: list[float], step_samples: list[int], warmup: int) -> float:
    """Samples per second over the steps after the first ``warmup``."""
    seconds, samples = sum(step_seconds[warmup:]), sum(step_samples[warmup:])
    if seconds <= 0 or samples == 0:
        raise RuntimeError(f"no timed steps: {len(step_seconds)} steps, {warmup} of them warm-up")
    return samples / seconds


def run_ours(args: argparse.Namespace, data: Path, work: Path) -> dict:
    """Our loop on the pages; per-step times and samples from its metrics.jsonl (logged every step)."""
    import granite_docling.train_loop as train_loop

    run_dir = work / "ours"
    cfg = compose(*config_overrides(args, data, run_dir, args.ours_batch_size or args.batch_size))
    samples, padded, step_ids = [], [], []
    backward_step = train_loop.backward_step

    def counting_backward_step(accelerator, loss_module, group, *args, **kwargs):  # what each step trained on
        samples.append(sum(len(b["ids"]) for b in group))
        step_ids.append([sample_id for b in group for sample_id in b["ids"]])
        padded.append(sum(b["input_ids"].numel() for b in group if b["ids"]))
        return backward_step(accelerator, loss_module, group, *args, **kwargs)

    train_loop.backward_step = counting_backward_step
    reset_peak_memory()
    try:
        exit_code = train_loop.train(cfg, run_dir).exit_code
    finally:
        train_loop.backward_step = backward_step
    peak, peak_gpu = peak_memory_mb(), peak_gpu_memory_mb()
    if exit_code != 0:
        raise RuntimeError(f"our training loop exited with {exit_code} (its log is on stderr)")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    # One step per log window (log_interval=1): the window's seconds = its samples / its samples per second.
    seconds = [n / r["train/samples_per_second"] for n, r in zip(samples, rows, strict=True)]
    losses = [r["train/loss"] for r in rows]
    return {
        "samples_per_s": timed_rate(seconds, samples, args.warmup),
        "losses": losses,
        "supervised_tokens_per_sample": sum(r["train/supervised_tokens"] for r in rows) / sum(samples),
        "padded_tokens_per_sample": sum(padded) / sum(samples),
        "samples": sum(samples),
        "peak_memory_mb": peak,
        "peak_gpu_memory_mb": peak_gpu,
        "step_ids": step_ids,
    }


def trl_dataset(data: Path, order: list[str] | None = None):
    """The same samples (first turn) as a prompt-completion ``datasets.Dataset``; images decoded on access."""
    import datasets

    from granite_docling.data.sources import ReadOptions, read_dataset

    samples, problems = read_dataset(str(data), "folder", ReadOptions(split="train", max_turns=1), "auto")
    if problems:
        raise RuntimeError(f"{len(problems)} bad sample(s) in {data}: {problems[:3]}")
    if order is not None:  # the sample ids in the order to train them
        by_id = {s.id: s for s in samples}
        samples = [by_id[sample_id] for sample_id in order]
    columns = {
        "images": [[str(ref) for ref in s.images] for s in samples],
        "prompt": [[{"role": "user", "content": s.turns[0].user}] for s in samples],
        "completion": [[{"role": "assistant", "content": s.turns[0].assistant}] for s in samples],
    }
    dataset = datasets.Dataset.from_dict(columns)
    return dataset.cast_column("images", datasets.List(datasets.Image()))


def without_trailing_newline(collate, newline_id: int):
    """TRL's collator, with the supervised newline after each answer's ``<|end_of_text|>`` masked (as ours)."""

    def masked(examples):
        batch = collate(examples)
        labels = batch["labels"]
        for row in range(labels.shape[0]):
            supervised = (labels[row] != -100).nonzero()
            if len(supervised) and labels[row, supervised[-1, 0]] == newline_id:
                labels[row, supervised[-1, 0]] = -100
        return batch

    return masked


def run_trl(args: argparse.Namespace, data: Path, work: Path, order: list[list[str]] | None = None) -> dict:
    """TRL's SFTTrainer on the same model, initialisation, pages and settings; with ``order`` (our steps' sample
    ids), on our batches in our order, supervising the tokens ours does."""
    import torch
    from accelerate.utils import set_seed
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from granite_docling.model import load_model_and_processor

    cfg = compose(*config_overrides(args, data, work / "trl", args.batch_size))
    set_seed(args.seed)  # as train() does before building the model: the same random weights
    model, processor = load_model_and_processor(cfg.model)

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, _args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

        def on_step_end(self, _args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    class CountingSFTTrainer(SFTTrainer):
        """SFTTrainer that records each step's batch shape and supervised tokens; training is untouched."""

        samples: list[int] = []
        padded: list[int] = []
        supervised: list[int] = []

        def _get_train_sampler(self, *args, **kwargs):
            if order is None:
                return super()._get_train_sampler(*args, **kwargs)
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *rest, **kwargs):
            self.samples.append(int(inputs["input_ids"].shape[0]))
            self.padded.append(int(inputs["input_ids"].numel()))
            self.supervised.append(int((inputs["labels"][:, 1:] != -100).sum()))
            return super().training_step(model, inputs, *rest, **kwargs)

    config = SFTConfig(
        output_dir=str(work / "trl"),
        max_steps=-1 if args.epochs else args.steps,
        num_train_epochs=args.epochs or 1,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.01,
        max_grad_norm=1.0,
        optim="adamw_torch",
        gradient_checkpointing=False,
        bf16=args.bf16,
        fp16=False,
        max_length=None,  # never truncate: TRL's default (1024) would cut pages through their answers
        completion_only_loss=True,  # the default for prompt-completion data, spelled out
        dataloader_num_workers=args.num_workers,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        use_cpu=not _cuda(),
    )
    trainer = CountingSFTTrainer(
        model=model,
        args=config,
        train_dataset=trl_dataset(data, [i for ids in order for i in ids] if order else None),
        processing_class=processor,
        callbacks=[StepClock()],
    )
    if order is not None:
        trainer.data_collator = without_trailing_newline(trainer.data_collator, processor.tokenizer.encode("\n")[0])
    reset_peak_memory()
    trainer.train()
    peak, peak_gpu = peak_memory_mb(), peak_gpu_memory_mb()
    seconds = [b - a for a, b in itertools.pairwise(step_ends)]
    samples = trainer.samples
    if len(seconds) != len(samples):
        raise RuntimeError(f"{len(seconds)} timed steps but {len(samples)} batches: accumulation is not 1?")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "samples_per_s": timed_rate(seconds, samples, args.warmup),
        "losses": losses,
        "supervised_tokens_per_sample": sum(trainer.supervised) / sum(samples),
        "padded_tokens_per_sample": sum(trainer.padded) / sum(samples),
        "samples": sum(samples),
        "peak_memory_mb": peak,
        "peak_gpu_memory_mb": peak_gpu,
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a Docling-format folder; default: the real-docs pages")
    parser.add_argument("--max-pages", type=int, help="with the default data: use only the first N pages")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the timing")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--ours-batch-size", type=int, help="our global batch, if not --batch-size (a token budget)")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers, for both")
    parser.add_argument("--lr", type=float, default=1e-3, help="constant learning rate, for both")
    parser.add_argument("--preset", default="tiny", help="conf/model preset (random init)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-first", action="store_true", help="run TRL before ours (to check order effects)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (default: float32)")
    parser.add_argument("--same-order", action="store_true", help="TRL trains our batches in our order (a check)")
    parser.add_argument("--epochs", type=int, help="train whole epochs on both sides instead of --steps")
    parser.add_argument("--override", action="append", default=[], help="config override for both (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (and nothing else on stdout)")
    args = parser.parse_args(argv)
    if args.same_order and args.ours_batch_size not in (None, args.batch_size):
        parser.error("--same-order trains the same batches on both sides: leave out --ours-batch-size")
    if args.same_order and args.trl_first:
        parser.error("--same-order runs ours first (TRL follows our order)")
    if not args.epochs and args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must be larger than --warmup ({args.warmup})")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import torch
    import transformers
    import trl

    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        work = Path(tmp)
        data = args.data or prepare_real_docs(work / "real_docs", args.max_pages)
        load_before = os.getloadavg()[0]
        with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its logs; stdout is for the result
            if args.trl_first:
                trl_result = run_trl(args, data, work)
                ours = run_ours(args, data, work)
            else:
                ours = run_ours(args, data, work)
                trl_result = run_trl(args, data, work, ours["step_ids"] if args.same_order else None)
        load_after = os.getloadavg()[0]
    # TRL also supervises the newline after each <|end_of_text|>: one token per sample more on the same samples.
    extra = 0 if args.same_order else 1  # --same-order masks it
    same_samples = (
        ours["samples"] == trl_result["samples"]
        and abs(trl_result["supervised_tokens_per_sample"] - ours["supervised_tokens_per_sample"] - extra) < 1e-6
    )
    result = {
        "ratio": ours["samples_per_s"] / trl_result["samples_per_s"],
        "same_order": args.same_order,
        "same_samples": same_samples,
        "ours_supervised_tokens_per_s": ours["samples_per_s"] * ours["supervised_tokens_per_sample"],
        "trl_supervised_tokens_per_s": trl_result["samples_per_s"] * trl_result["supervised_tokens_per_sample"],
        "ours_peak_memory_mb": ours["peak_memory_mb"],
        "trl_peak_memory_mb": trl_result["peak_memory_mb"],
        "ours_peak_gpu_memory_mb": ours["peak_gpu_memory_mb"],
        "trl_peak_gpu_memory_mb": trl_result["peak_gpu_memory_mb"],
        "ours_samples": ours["samples"],
        "trl_samples": trl_result["samples"],
        "ours_samples_per_s": ours["samples_per_s"],
        "trl_samples_per_s": trl_result["samples_per_s"],
        "ours_loss": _mean(ours["losses"]),
        "trl_loss": _mean(trl_result["losses"]),
        "ours_step_losses": ours["losses"],
        "trl_step_losses": trl_result["losses"],
        "ours_final_loss": ours["losses"][-1],
        "trl_final_loss": trl_result["losses"][-1],
        "ours_supervised_tokens_per_sample": ours["supervised_tokens_per_sample"],
        "trl_supervised_tokens_per_sample": trl_result["supervised_tokens_per_sample"],
        "ours_padded_tokens_per_sample": ours["padded_tokens_per_sample"],
        "trl_padded_tokens_per_sample": trl_result["padded_tokens_per_sample"],
        "preset": args.preset,
        "data": str(args.data) if args.data else "tests/fixtures/real_docs (scale 2)",
        "steps": None if args.epochs else args.steps,
        "epochs": args.epochs,
        "overrides": args.override,
        "precision": "bf16" if args.bf16 else "float32",
        "warmup_steps": args.warmup,
        "batch_size": args.batch_size,
        "ours_batch_size": args.ours_batch_size or args.batch_size,
        "num_workers": args.num_workers,
        "lr": args.lr,
        "order": "trl, ours" if args.trl_first else "ours, trl",
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    }
    if args.same_order:
        pairs = zip(ours["losses"], trl_result["losses"], strict=True)
        result["max_step_loss_rel_diff"] = max(abs(a - b) / abs(a) for a, b in pairs)
    if not same_samples:
        note = "note: the two sides trained on different samples (see --epochs): their rates are not comparable"
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:36s} {value:.4g}" if isinstance(value, float) else f"{key:36s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
