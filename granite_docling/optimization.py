"""The parts of one optimizer step: the model's inputs on the device, forward and backward over the step's
micro-batches with the loss normalised by the step's supervised tokens, the optimizer and its schedule, the
memory probe; :func:`granite_docling.train_loop.train_step` puts them together.

    optimizer, scheduler = make_optimizer(model, cfg.training, cfg.optimizer, total_steps)
    memory_probe(accelerator, loss_module, optimizer, heaviest_micro_batch)   # before the first step, if needed
    with optimizer_state_held(optimizer):    # zeros the size of its first state, until it has one
        step_loss = backward_step(accelerator, loss_module, micro_batches)

A micro-batch that runs out of memory (``torch.OutOfMemoryError`` on a GPU, the CPU allocator's "can't allocate
memory") raises :class:`OutOfMemoryError`: one line naming its samples, their tokens and what to change. The
memory probe (or a first step that holds the heaviest micro-batch) meets it in a run's first minute: a run killed
for memory instead (the kernel's OOM killer gives no error to catch) dies there too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from accelerate import Accelerator

from granite_docling.checkpoint import rng_state, set_rng_state
from granite_docling.collectives import sum_over_processes
from granite_docling.config import DataConfig, LoraConfig, TrainingConfig, scheduler_default
from granite_docling.data.encoding import IGNORE_INDEX
from granite_docling.data.image_tiles import batch_pixel_values
from granite_docling.flops import batch_shape
from granite_docling.loss import TokenLoss
from granite_docling.model import apply_lora, parameter_groups
from granite_docling.optimizers import build_optimizer, build_schedule, state_bytes
from granite_docling.user_error import UserError

log = logging.getLogger(__name__)

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "pixel_attention_mask")


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


class OutOfMemoryError(UserError):
    """A micro-batch did not fit in memory; the message names its samples and what to change."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device, or the CPU allocator, running out of memory."""
    message = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or "can't allocate" in message


def memory_advice(training: TrainingConfig, data: DataConfig, image_longest_edge: int | None) -> str:
    """What to change when a micro-batch does not fit, for this run's settings."""
    changes = [] if training.gradient_checkpointing else ["training.gradient_checkpointing=true"]
    if data.batch_tokens:
        changes.append(f"a lower data.batch_tokens (now {data.batch_tokens})")
    else:
        changes.append(f"data.batch_tokens, or a lower training.batch_size (now {training.batch_size})")
    limit = f", now {data.max_length}" if data.max_length else ""
    changes.append(f"data.max_length below the sample's tokens (drops the longer samples{limit})")
    edge = f" (now {image_longest_edge} px)" if image_longest_edge else ""
    changes.append(f"a smaller model.image_longest_edge{edge}")
    return "Change one of: " + "; ".join(changes)


def describe_micro_batch(batch: dict, shown: int = 3) -> str:
    """``N sample(s), P padded tokens: id (T tokens, I image tiles), ...``, the longest ``shown`` samples of a
    collated batch."""
    shapes = sorted(zip(batch["ids"], batch_shape(batch), strict=True), key=lambda item: -item[1][0])
    named = [f"{sample_id} ({tokens} tokens, {tiles} image tiles)" for sample_id, (tokens, tiles, _) in shapes]
    more = f" and {len(named) - shown} more" if len(named) > shown else ""
    padded = batch["input_ids"].numel() if named else 0
    return f"{len(named)} sample(s), {padded} padded tokens: {', '.join(named[:shown])}{more}"


@contextlib.contextmanager
def naming_out_of_memory(batch: dict, device: torch.device, advice: str) -> Iterator[None]:
    """Running out of memory inside becomes one :class:`OutOfMemoryError` line that names ``batch``."""
    try:
        yield
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        what = describe_micro_batch(batch) if batch["ids"] else "an empty micro-batch"
        raise OutOfMemoryError(f"out of memory on {device} training a micro-batch of {what}. {advice}") from error


class StepLoss(NamedTuple):
    loss: float  # mean loss per supervised token over the whole step, all processes
    tokens: int  # supervised tokens of the step, all processes
    by_dataset: dict[str, float]  # the same mean over each dataset's samples (those of ``datasets`` this step saw)


def backward_step(
    accelerator: Accelerator,
    loss_module: torch.nn.Module,
    group: list[dict],
    datasets: Sequence[str] = (),
    advice: str = "",
) -> StepLoss:
    """Forward and backward over one optimizer step's micro-batches.

    Every micro-batch's summed loss is divided by the supervised tokens of the WHOLE step, counted over all
    micro-batches and all processes, and multiplied by the number of processes (DDP averages gradients): the
    gradient equals that of one batch holding every sample of the step. ``datasets``: the run's dataset names
    (the same on every process) whose own mean loss to report; one all-reduce sums everything across processes.
    A micro-batch that runs out of memory raises :class:`OutOfMemoryError`, its message ending in ``advice``.
    """
    world = accelerator.num_processes
    local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group if b["ids"])
    (global_tokens,) = sum_over_processes(accelerator, local_tokens)
    step_loss_sum = 0.0
    dataset_sums = dict.fromkeys(datasets, 0.0)
    dataset_tokens = dict.fromkeys(datasets, 0)  # on this process
    for micro_step, batch in enumerate(group):
        sync = micro_step == len(group) - 1
        no_sync = contextlib.nullcontext() if sync else accelerator.no_sync(loss_module)
        with no_sync, naming_out_of_memory(batch, accelerator.device, advice):
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


@contextlib.contextmanager
def optimizer_state_held(optimizer) -> Iterator[list[torch.Tensor]]:
    """Zeros the size of the state the optimizer makes at its first update (measured on the meta device,
    :func:`~granite_docling.optimizers.state_bytes`; AdamW's two moments per trainable parameter where it cannot
    be), held inside while it has no state yet: a first step, or a probe, holds the memory every later step
    holds, so that it fails if they would. Nothing once the optimizer has its state."""
    held: list[torch.Tensor] = []
    if not optimizer.state:
        trainable = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        measured = state_bytes(optimizer)
        total = 2 * sum(p.numel() * p.element_size() for p in trainable) if measured is None else measured
        weights = sum(p.numel() * p.element_size() for p in trainable) or 1
        for device in {p.device for p in trainable}:  # each device its share of the state, in bytes
            share = sum(p.numel() * p.element_size() for p in trainable if p.device == device) * total // weights
            held.append(torch.zeros(share, dtype=torch.uint8, device=device))
    try:
        yield held
    finally:
        held.clear()


def memory_probe(
    accelerator: Accelerator, loss_module: torch.nn.Module, optimizer, batch: dict, advice: str = ""
) -> None:
    """Forward and backward over ``batch`` (a run's heaviest micro-batch ahead, where its first step does not
    hold it), with the optimizer's state held (:func:`optimizer_state_held`), then everything put back: the
    gradients dropped, the RNG states restored, no weight, optimizer or schedule touched. A run that cannot fit
    fails here (:class:`OutOfMemoryError`, or the kernel's OOM killer), before its first step. Every process
    calls it (its backward all-reduces like a step's)."""
    started = time.time()
    rng = rng_state()
    try:
        with optimizer_state_held(optimizer):
            backward_step(accelerator, loss_module, [batch], advice=advice)
    finally:
        optimizer.zero_grad(set_to_none=True)
        set_rng_state(rng)
    if batch["ids"]:
        seconds = time.time() - started
        log.info("memory probe: the heaviest micro-batch ahead fits (%s; %.1f s)", describe_micro_batch(batch), seconds)


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


def token_loss(model: torch.nn.Module, training: TrainingConfig) -> torch.nn.Module:
    """The model wrapped in the chunked loss of ``training.loss_chunk_size`` (compiled with ``training.compile``)."""
    loss_module = TokenLoss(model, training.loss_chunk_size, training.loss_recompute)
    return torch.compile(loss_module) if training.compile else loss_module


def make_optimizer(
    model: torch.nn.Module,
    training: TrainingConfig,
    settings: Mapping,
    total_steps: int,
    schedule: Mapping | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer ``settings`` names (``cfg.optimizer``, by ``_target_``) over the vision / connector / text
    parameter groups, each with its own peak learning rate and weight decay, and the schedule ``schedule``
    names (``cfg.scheduler``; warmup + cosine when None), each group floored at ``training.min_lr``."""
    learning_rates = {"vision": training.lr_vision, "text": training.lr_text, "connector": training.lr_connector}
    groups = parameter_groups(model, learning_rates, training.weight_decay)
    optimizer = build_optimizer(model, groups, settings)
    warmup, min_lr = training.warmup_steps, training.min_lr
    scheduler = build_schedule(optimizer, schedule or scheduler_default(), warmup, total_steps, min_lr)
    return optimizer, scheduler
