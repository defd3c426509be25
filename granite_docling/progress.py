"""What a run reports as it goes: the metrics of every step, throughput windows (samples, tokens, data wait, MFU)
and the console line every ``log_interval`` steps.

    step 20/50  epoch 1  loss 1.2500  avg 1.5000  lr 1.00e-05/2.00e-05  4.00 samples/s  1234 tokens/s  data wait 3% ...
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from granite_docling.flops import ModelFlops, batch_shape, vision_trains
from granite_docling.optimization import StepLoss
from granite_docling.training_run import LoopState


def progress_bar(total_steps: int, done: int, is_main: bool) -> tqdm:
    """The optimizer steps as a bar, on the main process only."""
    return tqdm(total=total_steps, initial=done, desc="training", disable=not is_main, dynamic_ncols=True)


class ThroughputWindow:
    """Samples, tokens, model FLOPs and data wait since the last console line, as rates per second."""

    def __init__(self, model: torch.nn.Module, peak_flops: float | None):
        self.peak_flops = peak_flops  # this device's peak; None: no MFU
        self.seconds = 0.0  # length of the last closed window
        self.model_flops = ModelFlops(model) if peak_flops else None
        self.train_vision = vision_trains(model)
        self.run_started = time.time()  # this process's training time counts from here
        self.reset()

    def reset(self, now: float | None = None) -> None:
        """Start a new window (at ``now``)."""
        self.started = time.time() if now is None else now
        self.samples = 0
        self.tokens = 0
        self.flops = 0.0
        self.waited = 0.0

    def waited_for_data(self, seconds: float) -> None:
        """The loop waited ``seconds`` for its next micro-batches: data wait."""
        self.waited += seconds

    def add(self, group: list[dict]) -> None:
        """One step's micro-batches, as this process ran them."""
        shapes = [shape for batch in group for shape in batch_shape(batch)]  # (tokens, tiles, supervised) each
        self.samples += len(shapes)
        self.tokens += sum(tokens for tokens, _, _ in shapes)
        if self.model_flops is not None:
            self.flops += sum(self.model_flops.sample(*shape, train_vision=self.train_vision) for shape in shapes)

    def close(self, world: int, now: float | None = None) -> dict[str, float]:
        """The window's rates over ``world`` processes; a new window starts (``seconds``: the closed one's)."""
        now = time.time() if now is None else now
        seconds = max(now - self.started, 1e-9)
        self.seconds = seconds
        rates = {
            "train/samples_per_second": self.samples * world / seconds,
            "train/tokens_per_second": self.tokens * world / seconds,
            "train/data_wait": self.waited / seconds,
        }
        if self.model_flops is not None:  # this process's model FLOPs per second over its device's peak
            rates["train/mfu"] = self.flops / seconds / self.peak_flops
        self.reset(now)
        return rates


def step_metrics(
    step_loss: StepLoss, state: LoopState, param_groups: list[dict], micro_batches: int, grad_norm
) -> dict[str, float]:
    """What every step logs to metrics.jsonl (and the trackers)."""
    metrics = {
        "train/loss": step_loss.loss,
        "train/avg_loss": state.loss_sum / state.loss_steps,
        "train/lr": param_groups[0]["lr"],
        **{f"train/lr_{group['name']}": group["lr"] for group in param_groups},
        "epoch": state.epoch,
        "train/supervised_tokens": step_loss.tokens,
        "train/micro_batches": micro_batches,
    }
    metrics |= {f"train/loss/{name}": loss for name, loss in step_loss.by_dataset.items()}  # report.html draws them
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    return metrics


def progress_line(
    state: LoopState,
    total_steps: int,
    metrics: dict,
    param_groups: list[dict],
    window: ThroughputWindow,
    log_every: int,
) -> str:
    """The console line of a logged step: loss, learning rates, throughput, data wait, MFU, elapsed and ETA."""
    elapsed = state.elapsed_seconds + time.time() - window.run_started
    eta = (total_steps - state.step) * window.seconds / max(1, log_every)
    mfu = f"  MFU {100 * metrics['train/mfu']:.1f}%" if "train/mfu" in metrics else ""
    learning_rates = "/".join(f"{group['lr']:.2e}" for group in param_groups[::2])
    return (
        f"step {state.step}/{total_steps}  epoch {state.epoch}  loss {metrics['train/loss']:.4f}  "
        f"avg {metrics['train/avg_loss']:.4f}  lr {learning_rates}  {metrics['train/samples_per_second']:.2f} "
        f"samples/s  {metrics['train/tokens_per_second']:.0f} tokens/s  data wait "
        f"{100 * metrics['train/data_wait']:.0f}%{mfu}  elapsed {duration(elapsed)}  ETA {duration(eta)}"
    )


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
