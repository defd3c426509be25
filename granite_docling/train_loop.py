"""The training loop: one function, read top to bottom. Accelerate does devices, mixed precision and process
groups; the rest is here in plain sight.

    python train.py experiment=quick          # see train.py for every way to launch it

Vocabulary: ``step`` is an optimizer step, ``batch_size x gradient_accumulation_steps x processes`` samples;
``micro_step`` one forward/backward per process, of ``batch_size`` samples (``gradient_accumulation_steps`` of
them make a step) or, with ``training.batch_tokens``, of as many samples as fit that many padded tokens (as many
micro-steps as the step's samples need); ``epoch`` a pass over the training split.

Exit codes: 0 done; :data:`EXIT_INTERRUPTED` (75) stopped by SIGTERM / Ctrl-C after writing a checkpoint,
resume with ``training.resume=auto`` (same ``hydra.run.dir``) or ``training.resume=PATH``; 1 on errors,
including too many non-finite losses in a row and a checkpoint that could not be saved (a full disk: every
process stops, the earlier checkpoints are intact).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from granite_docling.checkpoint import (
    LoopState,
    check_resumed_shape,
    load_training_state,
    load_weights,
    loop_state,
    push_to_hub,
    rng_state,
    rotate_checkpoints,
    save_checkpoint,
    set_rng_state,
    training_state,
)
from granite_docling.checkpoint_files import CheckpointSaveError, latest_checkpoint
from granite_docling.config import Config, LoraConfig, OptimizerConfig, TrainingConfig
from granite_docling.data.encoding import IGNORE_INDEX
from granite_docling.data.image_tiles import batch_pixel_values
from granite_docling.data.loading import build_data, make_loader
from granite_docling.data.policy import Data, DataPolicy
from granite_docling.data.problems import append_problems, listed_problems, summarise
from granite_docling.data.sample import Problem
from granite_docling.data.steps import training_steps
from granite_docling.evaluation.generate import evaluate_generation
from granite_docling.evaluation.loss_curve import draw_loss_curve
from granite_docling.flops import ModelFlops, batch_shape, device_peak_flops, vision_trains
from granite_docling.loss import TokenLoss
from granite_docling.model import apply_lora, load_model_and_processor, parameter_groups
from granite_docling.precision import device_precision
from granite_docling.tracking import NullTracker, Tracker, read_metrics

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: a checkpoint was written, run again to continue
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "pixel_attention_mask")


class StopRequest:
    """SIGTERM or a first Ctrl-C asks the loop to stop after the current step; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning(
            "%s received: stopping after this step and writing a checkpoint (Ctrl-C again to abort without saving)",
            signal.Signals(signum).name,
        )


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


def save_on_main(accelerator: Accelerator, save: Callable[[], object]) -> str | None:
    """Run ``save`` on the main process; every process returns None, or the failure's one line when the save
    failed (the all-reduce that tells them is also the barrier after the save)."""
    failure = None
    if accelerator.is_main_process:
        try:
            save()
        except CheckpointSaveError as error:
            failure = str(error)
    (failed,) = sum_over_processes(accelerator, float(failure is not None))
    if failed and failure is None:
        failure = "the main process could not save a checkpoint (its log says why)"
    return failure


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


def restore(
    folder: Path, accelerator: Accelerator, loss_module, optimizer, scheduler, t: TrainingConfig, train_steps
) -> LoopState:
    """Load a checkpoint's weights, optimizer, schedule, loss scaler and this process's RNG. Returns its loop
    position, checked against this run's shape (batch, processes, workers) and set to it."""
    saved = load_training_state(folder, t.trust_checkpoint)
    load_weights(accelerator.unwrap_model(loss_module).model, folder)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if "scaler" in saved and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"][min(accelerator.process_index, len(saved["rng"]) - 1)])  # more processes: the last
    state = loop_state(saved)
    log.info(
        f"resumed from {folder} at step {state.step} (epoch {state.epoch}, {state.samples_in_epoch} "
        f"{train_steps.position_unit} into it)"
    )
    world = accelerator.num_processes
    global_batch = t.batch_size * t.gradient_accumulation_steps * world
    check_resumed_shape(state, global_batch, world, t.num_workers, train_steps.exact_on_any_shape)
    state.global_batch = global_batch
    state.processes = world
    state.workers = t.num_workers
    return state


class Checkpoints:
    """Saves checkpoints of the run: model folder, training state and the resolved config, on the main process;
    every process learns whether the save failed (a full disk), so that all stop together."""

    def __init__(
        self, accelerator: Accelerator, loss_module, optimizer, scheduler, processor, root: Path, cfg, tracker
    ):
        self.accelerator = accelerator
        self.loss_module = loss_module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.processor = processor
        self.root = root
        self.max_checkpoints = cfg.training.max_checkpoints
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        self.tracker = tracker  # its rows of metrics.jsonl go into the checkpoint (a resume cuts the file there)
        self.last_saved = None  # the name of the checkpoint saved last
        self.started = time.time()  # the training time of this process, added to the resumed one

    @property
    def model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.loss_module).model

    def save(self, name: str, state: LoopState) -> int:
        """Save checkpoint ``name`` at ``state``; 0, or 1 when it failed and every process stops."""
        if name == self.last_saved:  # a stop request at a step that save_steps saved already
            return 0
        rng_states = gather_object([rng_state()])  # every process's RNG, by rank
        elapsed = state.elapsed_seconds + time.time() - self.started
        loop = LoopState(**{**asdict(state), "elapsed_seconds": elapsed, "metrics_rows": self.tracker.rows})
        folder = self.root / name

        def save() -> None:
            scaler = self.accelerator.scaler
            trainer_state = training_state(self.optimizer, self.scheduler, loop, rng_states, self.config_yaml, scaler)
            save_checkpoint(folder, self.model, self.processor, trainer_state)
            rotate_checkpoints(self.root, self.max_checkpoints)
            log.info("checkpoint saved: %s", folder)

        failure = save_on_main(self.accelerator, save)
        if failure:
            advice = "the earlier checkpoints are intact: once it can be written, resume with training.resume=auto"
            log.error("%s; stopping (%s)", failure, advice)
            return 1
        self.last_saved = name
        return 0

    def save_model(self, folder: Path) -> None:
        """Save the model and processor alone (no training state); raises when it could not be written."""
        failure = save_on_main(self.accelerator, lambda: save_checkpoint(folder, self.model, self.processor))
        if failure:
            raise CheckpointSaveError(failure)
        log.info("model saved: %s", folder)


def stop_with_checkpoint(checkpoints: Checkpoints, state: LoopState) -> int:
    """A stop request: save a checkpoint to resume from; the exit code (EXIT_INTERRUPTED, or 1 when it failed)."""
    if checkpoints.save(f"checkpoint_step_{state.step}", state):
        return 1
    log.warning("stopped at step %d; resume with training.resume=auto (same run folder)", state.step)
    return EXIT_INTERRUPTED


class BadSampleList:
    """The run's bad_samples.jsonl: the main process lists every bad sample once (a resumed run too)."""

    def __init__(self, path: Path, is_main: bool):
        self.path = path
        self.is_main = is_main
        self.listed = listed_problems(path)

    def add(self, problems: list[Problem], step: int | None = None) -> int:
        """List the new ones of ``problems`` (found at ``step``, or before training); how many were new."""
        if not self.is_main:
            return 0
        new = append_problems(self.path, problems, self.listed)
        if step is None and problems:
            log.warning("%s (listed in %s)", summarise(problems), self.path)
        elif new:
            log.warning("step %d: %s (listed in %s)", step, summarise(problems), self.path)
        return new


def skip_nonfinite_step(state: LoopState, loss: float, max_in_a_row: int) -> int:
    """Count a step skipped for a NaN / Inf loss; 0 to go on, or 1 (the exit code) when that makes too many in a
    row."""
    state.skipped_steps += 1
    state.nonfinite_in_a_row += 1
    log.warning("step %d: loss is %s, step skipped (%d in a row)", state.step, loss, state.nonfinite_in_a_row)
    if state.nonfinite_in_a_row < max_in_a_row:
        return 0
    log.error(
        "%d non-finite losses in a row: stopping. Try: a 10x lower learning rate (training.lr_*), a "
        "lower training.max_grad_norm, training.mixed_precision=bf16 instead of fp16, and "
        "`granite-docling validate` on the data to find corrupt samples.",
        state.nonfinite_in_a_row,
    )
    return 1


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

    def next_step(self, steps: Iterator):
        """The next of ``steps`` (None at the end), the time waited for it counted as data wait."""
        fetch_started = time.time()
        step = next(steps, None)
        self.waited += time.time() - fetch_started
        return step

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
        f"{100 * metrics['train/data_wait']:.0f}%{mfu}  elapsed {_duration(elapsed)}  ETA {_duration(eta)}"
    )


def optimizer_step(accelerator: Accelerator, loss_module, optimizer, scheduler, max_grad_norm: float):
    """Clip (when ``max_grad_norm``), step, schedule, zero; the gradient norm before clipping, or None."""
    grad_norm = accelerator.clip_grad_norm_(loss_module.parameters(), max_grad_norm) if max_grad_norm else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def validate(accelerator: Accelerator, loss_module, loader, state: LoopState, tracker) -> None:
    """The validation loss, logged as val/loss; once a step (an epoch's end may meet val_steps), none without a
    validation split."""
    if loader is not None and state.validated_step != state.step:
        state.validated_step = state.step
        val = validation_loss(accelerator, loss_module, loader)
        tracker.log({"val/loss": val, "epoch": state.epoch}, step=state.step)
        log.info("step %d: validation loss %.4f", state.step, val)


def generation_eval(accelerator: Accelerator, loss_module, processor, data: Data, t: TrainingConfig, tracker, step):
    """Greedy answers for a few validation samples, scored like evaluate.py, logged as gen/*."""
    if data.val is not None and accelerator.is_main_process:
        samples = data.val.samples(t.gen_eval_samples)
        model = accelerator.unwrap_model(loss_module).model
        with accelerator.autocast():
            scores = evaluate_generation(
                model, processor, samples, t.gen_eval_max_new_tokens, t.batch_size, data.image_edges
            )
        tracker.log(scores, step=step)
        log.info("step %d: " + "  ".join(f"{k} %.3f" for k in scores), step, *scores.values())
    accelerator.wait_for_everyone()


@dataclass
class TrainResult:
    exit_code: int  # 0 done, EXIT_INTERRUPTED, 1 on errors
    latest: dict[str, float] = field(default_factory=dict)  # every metric as last logged (val/loss, train/loss...)


def train(cfg: Config, run_dir: str | Path) -> TrainResult:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.training
    precision, precision_reason = device_precision(t.mixed_precision)
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    rank = accelerator.process_index
    world = accelerator.num_processes
    set_seed(t.seed)
    checkpoint_root = Path(t.save_dir) if t.save_dir else run_dir / "checkpoints"
    final_dir = checkpoint_root / "final_model" if t.save_dir else run_dir / "final_model"
    log.info(
        f"run folder {run_dir}, {world} process(es) on {accelerator.device}, mixed precision {precision} "
        f"({precision_reason})"
    )

    # ---- model, data, optimizer, schedule
    model, processor = load_model_and_processor(cfg.model)
    model = prepare_for_training(model, cfg.model.lora, t.gradient_checkpointing)
    pad_id = processor.tokenizer.pad_token_id
    data = build_data(cfg.dataset, processor, DataPolicy.from_training(t), rank, world)
    mixed_datasets = list(data.sizes) if len(data.sizes) > 1 else []  # a mix: each dataset's loss is logged
    bad_samples = BadSampleList(run_dir / "bad_samples.jsonl", accelerator.is_main_process)
    bad_samples.add(data.problems)

    any_process = functools.partial(any_process_true, accelerator)
    train_steps = training_steps(data, t.batch_size, t.gradient_accumulation_steps, t.num_workers, pad_id, any_process)
    val_loader = None
    if data.val is not None:  # no shuffling, no padding: each process a share
        val_loader = make_loader(data.val, range(rank, len(data.val), world), t.batch_size, t.num_workers, pad_id)
    global_batch = t.batch_size * t.gradient_accumulation_steps * world
    epoch_steps = train_steps.planned_steps(t.num_epochs)
    total_steps = t.max_steps or sum(epoch_steps)
    optimizer, scheduler = make_optimizer(model, t, cfg.optimizer, total_steps)
    loss_module = TokenLoss(model, t.loss_chunk_size, t.loss_recompute)
    if t.compile:
        loss_module = torch.compile(loss_module)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    log.info(
        f"{total_steps} optimizer steps ({epoch_steps[0]} per epoch; effective batch {global_batch} = "
        f"{t.batch_size} x {t.gradient_accumulation_steps} accumulation x {world} processes)"
    )

    # ---- resume, or save the weights training starts from
    resume_from = latest_checkpoint(checkpoint_root) if t.resume == "auto" else t.resume
    if t.resume == "auto" and resume_from is None:
        log.info("training.resume=auto: no checkpoint in %s yet, starting from scratch", checkpoint_root)
    state = LoopState(global_batch=global_batch, processes=world, workers=t.num_workers)
    if resume_from is not None:
        state = restore(Path(resume_from), accelerator, loss_module, optimizer, scheduler, t, train_steps)
    tracker = NullTracker()
    if accelerator.is_main_process:
        tracker = Tracker(run_dir, cfg, state.step if resume_from is not None else None, state.metrics_rows)
    checkpoints = Checkpoints(accelerator, loss_module, optimizer, scheduler, processor, checkpoint_root, cfg, tracker)
    if t.save_initial and resume_from is None:  # the weights training starts from, for before/after evaluations
        checkpoints.save_model(final_dir.parent / "initial_model")

    # ---- the loop
    stop = StopRequest()
    stop.install()
    progress = tqdm(total=total_steps, initial=state.step, desc="training", disable=not accelerator.is_main_process)
    window = ThroughputWindow(model, device_peak_flops(t.peak_tflops))
    steps = None
    exit_code = 0
    loss_module.train()
    while state.step < total_steps:
        steps = steps or train_steps.epoch(state.epoch, state.samples_in_epoch)  # from the exact position
        step = window.next_step(steps)  # this process's micro-batches of the step, and the position after it
        if step is None:  # end of epoch
            state.epoch += 1
            state.samples_in_epoch = 0
            steps = None
            if t.val_interval and state.epoch % t.val_interval == 0:
                validate(accelerator, loss_module, val_loader, state, tracker)
            if t.save_interval and state.epoch % t.save_interval == 0:
                if exit_code := checkpoints.save(f"checkpoint_epoch_{state.epoch}", state):
                    break
            continue

        group, state.samples_in_epoch = step
        problems = [p for batch in group for p in batch["problems"]]  # bad samples travel in the batches
        step_loss = backward_step(accelerator, loss_module, group, mixed_datasets)
        if not math.isfinite(step_loss.loss):
            optimizer.zero_grad(set_to_none=True)
            if exit_code := skip_nonfinite_step(state, step_loss.loss, t.max_nonfinite_steps):
                break
            continue
        grad_norm = optimizer_step(accelerator, loss_module, optimizer, scheduler, t.max_grad_norm)
        state.step += 1
        state.loss_sum += step_loss.loss
        state.loss_steps += 1
        state.nonfinite_in_a_row = 0
        progress.update(1)

        # ---- log every step to metrics.jsonl; a console line every log_interval steps
        window.add(group)
        metrics = step_metrics(step_loss, state, optimizer.param_groups, len(group), grad_norm)
        if state.step % t.log_interval == 0 or state.step == total_steps:
            metrics |= window.close(world)
            log.info(progress_line(state, total_steps, metrics, optimizer.param_groups, window, t.log_interval))
        tracker.log(metrics, step=state.step)

        if t.val_steps and state.step % t.val_steps == 0:
            validate(accelerator, loss_module, val_loader, state, tracker)
        if t.gen_eval_steps and state.step % t.gen_eval_steps == 0:
            generation_eval(accelerator, loss_module, processor, data, t, tracker, state.step)
        if t.save_steps and state.step % t.save_steps == 0:
            if exit_code := checkpoints.save(f"checkpoint_step_{state.step}", state):
                break
        stop_votes, bad_count = sum_over_processes(accelerator, float(stop.requested), float(len(problems)))
        if bad_count:  # rare: gather the new ones to the main process, which lists each sample once
            state.bad_samples += bad_samples.add(gather_object(problems) if world > 1 else problems, state.step)
        if stop_votes:
            exit_code = stop_with_checkpoint(checkpoints, state)
            break

    progress.close()
    stop.uninstall()
    if exit_code == 0:
        validate(accelerator, loss_module, val_loader, state, tracker)  # the final model's (the sweep objective)
        exit_code = _finish(cfg, accelerator, loss_module, processor, final_dir, run_dir, state)
    tracker.finish()
    accelerator.end_training()
    return TrainResult(exit_code, tracker.latest)


def _finish(cfg, accelerator, loss_module, processor, final_dir, run_dir, state) -> int:
    """Final model, bad-sample summary, loss curve, hub upload; prints where everything is. Returns the exit code
    (1 when the final model could not be saved)."""
    model = accelerator.unwrap_model(loss_module).model
    failure = save_on_main(accelerator, lambda: save_checkpoint(final_dir, model, processor, None))
    if failure:
        log.error("%s; the last checkpoint in %s is intact", failure, final_dir.parent)
        return 1
    if accelerator.is_main_process:
        plot = draw_loss_curve(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss_curve.png")
        bad_files = sorted(run_dir.glob("bad_samples*.jsonl"))
        n_bad = sum(len(f.read_text().splitlines()) for f in bad_files)
        log.info("training done: %d steps, final model in %s", state.step, final_dir)
        log.info("metrics: %s; loss curve: %s", run_dir / "metrics.jsonl", plot)
        if n_bad:
            log.warning("%d bad sample(s) skipped in total, listed in %s", n_bad, ", ".join(map(str, bad_files)))
        if cfg.training.push_to_hub:
            push_to_hub(final_dir, cfg.training.hub_repo_id, cfg.training.hub_private)
    accelerator.wait_for_everyone()
    return 0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


if __name__ == "__main__":
    sys.exit("run training with: python train.py [overrides]")
