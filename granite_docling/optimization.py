"""One optimizer step, exactly: the model's inputs on the device, forward and backward over the step's
micro-batches with the loss normalised by the step's supervised tokens, the clipped update and its schedule.

    optimizer, scheduler = make_optimizer(model, cfg.training, cfg.optimizer, total_steps)
    step_loss = backward_step(accelerator, loss_module, micro_batches)
    grad_norm = optimizer_step(accelerator, loss_module, optimizer, scheduler, max_grad_norm=1.0)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from accelerate import Accelerator

from granite_docling.config import LoraConfig, OptimizerConfig, TrainingConfig
from granite_docling.data.encoding import IGNORE_INDEX
from granite_docling.data.image_tiles import batch_pixel_values
from granite_docling.loss import TokenLoss
from granite_docling.model import apply_lora, parameter_groups

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "pixel_attention_mask")


def lr_lambda(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warmup, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def sum_over_processes(accelerator: Accelerator, *values: float) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist() if accelerator.num_processes > 1 else tensor.tolist()


def any_process_true(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (an all-reduce)."""
    return sum_over_processes(accelerator, float(flag))[0] > 0


def model_inputs(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The model's tensors of a batch, on ``device``; the fast image path's uint8 pages are tiled there."""
    inputs = {k: batch[k].to(device, non_blocking=True) for k in MODEL_KEYS if k in batch}
    if "images" in batch:
        pixel_values, pixel_attention_mask = batch_pixel_values(
            batch["images"], batch["image_layouts"], batch["image_spec"], device
        )
        if pixel_values is not None:
            inputs |= {"pixel_values": pixel_values, "pixel_attention_mask": pixel_attention_mask}
    return inputs


class StepLoss(NamedTuple):
    loss: float  # mean loss per supervised token over the whole step, all processes
    tokens: int  # supervised tokens of the step, all processes
    by_dataset: dict[str, float]  # the same mean over each dataset's samples (those of ``datasets`` this step saw)


def backward_step(
    accelerator: Accelerator, loss_module: torch.nn.Module, group: list[dict], datasets: Sequence[str] = ()
) -> StepLoss:
    """Forward and backward over one optimizer step's micro-batches.

    Every micro-batch's summed loss is divided by the supervised tokens of the WHOLE step, counted over all
    micro-batches and all processes, and multiplied by the number of processes (DDP averages gradients): the
    gradient equals that of one batch holding every sample of the step. ``datasets``: the run's dataset names
    (the same on every process) whose own mean loss to report; one all-reduce sums everything across processes.
    """
    world = accelerator.num_processes
    local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group if b["ids"])
    (global_tokens,) = sum_over_processes(accelerator, local_tokens)
    step_loss_sum = 0.0
    dataset_sums = dict.fromkeys(datasets, 0.0)
    dataset_tokens = dict.fromkeys(datasets, 0)  # on this process
    for micro_step, batch in enumerate(group):
        sync = micro_step == len(group) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(loss_module):
            if batch["ids"]:
                inputs = model_inputs(batch, accelerator.device)
                row_sums, _ = loss_module(**inputs)
                loss_sum = row_sums.sum()
            else:  # every sample of this micro-batch was bad: a zero loss keeps the processes in step
                loss_sum = sum(p.sum() for p in loss_module.parameters() if p.requires_grad) * 0.0
            accelerator.backward(loss_sum * world / max(global_tokens, 1))
        if not batch["ids"]:
            continue
        rows = row_sums.tolist()  # the micro-batch's one device sync
        step_loss_sum += sum(rows)
        if datasets:
            row_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
            for dataset, row_sum, tokens in zip(batch["datasets"], rows, row_tokens, strict=True):
                dataset_sums[dataset] += row_sum
                dataset_tokens[dataset] += tokens
    totals = sum_over_processes(accelerator, step_loss_sum, *dataset_sums.values(), *dataset_tokens.values())
    sums = totals[1 : 1 + len(datasets)]
    tokens = totals[1 + len(datasets) :]
    by_dataset = {name: total / count for name, total, count in zip(dataset_sums, sums, tokens, strict=True) if count}
    return StepLoss(totals[0] / max(global_tokens, 1), int(global_tokens), by_dataset)


def validation_loss(accelerator: Accelerator, loss_module: TokenLoss, loader) -> float:
    """Token-weighted loss over the validation split, summed over every process."""
    loss_module.eval()
    loss_sum = 0.0
    tokens = 0
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            if not batch["ids"]:
                continue
            inputs = model_inputs(batch, accelerator.device)
            row_sums, batch_tokens = loss_module(**inputs)
            loss_sum = loss_sum + row_sums.sum().item()
            tokens = tokens + batch_tokens
    loss_module.train()
    loss_sum, tokens = sum_over_processes(accelerator, loss_sum, tokens)
    return loss_sum / max(tokens, 1)


def prepare_for_training(model: torch.nn.Module, lora: LoraConfig, gradient_checkpointing: bool) -> torch.nn.Module:
    """Activation checkpointing (the transformers 4 and 5 names), then LoRA adapters when enabled."""
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_lora(model, lora) if lora.enabled else model


def token_loss(model: torch.nn.Module, t: TrainingConfig) -> torch.nn.Module:
    """The model wrapped in the chunked loss of ``training.loss_chunk_size`` (compiled with ``training.compile``)."""
    loss_module = TokenLoss(model, t.loss_chunk_size, t.loss_recompute)
    return torch.compile(loss_module) if t.compile else loss_module


def make_optimizer(
    model: torch.nn.Module, t: TrainingConfig, settings: OptimizerConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the vision / connector / text parameter groups, each with its own peak learning rate, and
    their schedule: linear warmup, then cosine down to ``training.min_lr`` at ``total_steps``."""
    learning_rates = {"vision": t.lr_vision, "text": t.lr_text, "connector": t.lr_connector}
    groups = parameter_groups(model, learning_rates, t.weight_decay)
    fused = settings.fused is not False  # null: fused, on CUDA and CPU alike
    optimizer = torch.optim.AdamW(groups, betas=tuple(settings.betas), eps=settings.eps, fused=fused)
    min_ratios = [t.min_lr / group["lr"] for group in groups]
    schedules = [lambda step, r=r: lr_lambda(step, t.warmup_steps, total_steps, r) for r in min_ratios]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)


def optimizer_step(accelerator: Accelerator, loss_module, optimizer, scheduler, max_grad_norm: float):
    """Clip (when ``max_grad_norm``), step, schedule, zero; the gradient norm before clipping, or None."""
    grad_norm = accelerator.clip_grad_norm_(loss_module.parameters(), max_grad_norm) if max_grad_norm else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
