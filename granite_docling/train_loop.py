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
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
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
from granite_docling.config import Config
from granite_docling.data.encoding import IGNORE_INDEX
from granite_docling.data.image_tiles import batch_pixel_values
from granite_docling.data.loading import build_data, make_loader
from granite_docling.data.policy import DataPolicy
from granite_docling.data.problems import append_problems, listed_problems, summarise
from granite_docling.data.steps import training_steps
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
    dataset_sums, dataset_tokens = dict.fromkeys(datasets, 0.0), dict.fromkeys(datasets, 0)  # on this process
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
    sums, tokens = totals[1 : 1 + len(datasets)], totals[1 + len(datasets) :]
    by_dataset = {name: total / count for name, total, count in zip(dataset_sums, sums, tokens, strict=True) if count}
    return StepLoss(totals[0] / max(global_tokens, 1), int(global_tokens), by_dataset)


def validation_loss(accelerator: Accelerator, loss_module: TokenLoss, loader) -> float:
    """Token-weighted loss over the validation split, summed over every process."""
    loss_module.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            if not batch["ids"]:
                continue
            inputs = model_inputs(batch, accelerator.device)
            row_sums, batch_tokens = loss_module(**inputs)
            loss_sum, tokens = loss_sum + row_sums.sum().item(), tokens + batch_tokens
    loss_module.train()
    loss_sum, tokens = sum_over_processes(accelerator, loss_sum, tokens)
    return loss_sum / max(tokens, 1)


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
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    set_seed(t.seed)
    checkpoint_root = Path(t.save_dir) if t.save_dir else run_dir / "checkpoints"
    final_dir = checkpoint_root / "final_model" if t.save_dir else run_dir / "final_model"
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    log.info(
        "run folder %s, %d process(es) on %s, mixed precision %s (%s)",
        run_dir,
        world,
        accelerator.device,
        precision,
        precision_reason,
    )

    # ---- model, data, optimizer, schedule
    model, processor = load_model_and_processor(cfg.model)
    if t.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg.model.lora)
    pad_id = processor.tokenizer.pad_token_id
    data = build_data(cfg.dataset, processor, DataPolicy.from_training(t), rank, world)
    mixed_datasets = list(data.sizes) if len(data.sizes) > 1 else []  # a mix: each dataset's loss is logged
    bad_samples_file = run_dir / "bad_samples.jsonl"  # the main process lists every bad sample once
    listed = listed_problems(bad_samples_file)
    if is_main:
        append_problems(bad_samples_file, data.problems, listed)
        if data.problems:
            log.warning("%s (listed in %s)", summarise(data.problems), bad_samples_file)

    def any_process(flag: bool) -> bool:  # True on every process when it is True on any
        return sum_over_processes(accelerator, float(flag))[0] > 0

    train_steps = training_steps(data, t.batch_size, t.gradient_accumulation_steps, t.num_workers, pad_id, any_process)
    val_loader = None
    if data.val is not None:
        val_indices = range(rank, len(data.val), world)  # no shuffling, no padding: each process a share
        val_loader = make_loader(data.val, val_indices, t.batch_size, t.num_workers, pad_id)

    global_batch = t.batch_size * t.gradient_accumulation_steps * world
    epoch_steps = train_steps.planned_steps(t.num_epochs)
    steps_per_epoch, total_steps = epoch_steps[0], t.max_steps or sum(epoch_steps)
    learning_rates = {"vision": t.lr_vision, "text": t.lr_text, "connector": t.lr_connector}
    groups = parameter_groups(model, learning_rates, t.weight_decay)
    fused = cfg.optimizer.fused is not False  # null: fused, on CUDA and CPU alike
    optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps, fused=fused)
    min_ratios = [t.min_lr / g["lr"] for g in groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda s, r=r: lr_lambda(s, t.warmup_steps, total_steps, r) for r in min_ratios]
    )
    loss_module = TokenLoss(model, t.loss_chunk_size, t.loss_recompute)
    if t.compile:
        loss_module = torch.compile(loss_module)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    log.info(
        "%d optimizer steps (%d per epoch; effective batch %d = %d x %d accumulation x %d processes)",
        total_steps,
        steps_per_epoch,
        global_batch,
        t.batch_size,
        t.gradient_accumulation_steps,
        world,
    )

    # ---- resume
    state = LoopState()
    resume_from = latest_checkpoint(checkpoint_root) if t.resume == "auto" else t.resume
    if t.resume == "auto" and resume_from is None:
        log.info("training.resume=auto: no checkpoint in %s yet, starting from scratch", checkpoint_root)
    if resume_from is not None:
        saved = load_training_state(Path(resume_from), t.trust_checkpoint)
        load_weights(accelerator.unwrap_model(loss_module).model, Path(resume_from))
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if "scaler" in saved and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(saved["scaler"])
        state = loop_state(saved)
        set_rng_state(saved["rng"][min(rank, len(saved["rng"]) - 1)])
        log.info(
            "resumed from %s at step %d (epoch %d, %d %s into it)",
            resume_from,
            state.step,
            state.epoch,
            state.samples_in_epoch,
            train_steps.position_unit,
        )
        check_resumed_shape(state, global_batch, world, t.num_workers, train_steps.exact_on_any_shape)
    state.global_batch, state.processes, state.workers = global_batch, world, t.num_workers

    if t.save_initial and resume_from is None:  # the weights training starts from, for before/after evaluations
        initial_dir = final_dir.parent / "initial_model"
        failure = save_on_main(
            accelerator, lambda: save_checkpoint(initial_dir, accelerator.unwrap_model(loss_module).model, processor)
        )
        if failure:
            raise CheckpointSaveError(failure)
        log.info("initial model saved: %s", initial_dir)

    resume_step = state.step if resume_from is not None else None
    tracker = Tracker(run_dir, cfg, resume_step, state.metrics_rows) if is_main else NullTracker()
    stop = StopRequest()
    stop.install()
    last_saved = None  # the name of the checkpoint this process saved last
    progress = tqdm(total=total_steps, initial=state.step, desc="training", disable=not is_main, dynamic_ncols=True)

    def write_checkpoint(name: str) -> str | None:
        """Save checkpoint ``name``; None, or the failure every process stops on."""
        nonlocal last_saved
        if name == last_saved:  # a stop request at a step that save_steps saved already
            return None
        rng_states = gather_object([rng_state()])  # every process's RNG, by rank
        folder = checkpoint_root / name

        def save() -> None:
            elapsed = state.elapsed_seconds + time.time() - started
            loop = LoopState(**{**asdict(state), "elapsed_seconds": elapsed, "metrics_rows": tracker.rows})
            trainer_state = training_state(optimizer, scheduler, loop, rng_states, config_yaml, accelerator.scaler)
            save_checkpoint(folder, accelerator.unwrap_model(loss_module).model, processor, trainer_state)
            rotate_checkpoints(checkpoint_root, t.max_checkpoints)
            log.info("checkpoint saved: %s", folder)

        failure = save_on_main(accelerator, save)
        if failure:
            advice = "the earlier checkpoints are intact: once it can be written, resume with training.resume=auto"
            log.error("%s; stopping (%s)", failure, advice)
        else:
            last_saved = name
        return failure

    def run_generation_eval() -> None:
        """Greedy answers for a few validation samples, scored like evaluate.py, logged as gen/*."""
        if data.val is not None and is_main:
            from granite_docling.evaluation.generate import evaluate_generation

            samples = data.val.samples(t.gen_eval_samples)
            model_to_run = accelerator.unwrap_model(loss_module).model
            with accelerator.autocast():
                scores = evaluate_generation(
                    model_to_run,
                    processor,
                    samples,
                    t.gen_eval_max_new_tokens,
                    t.batch_size,
                    data.image_edges,
                )
            tracker.log(scores, step=state.step)
            log.info("step %d: " + "  ".join(f"{k} %.3f" for k in scores), state.step, *scores.values())
        accelerator.wait_for_everyone()

    def run_validation() -> None:
        if val_loader is not None and state.validated_step != state.step:  # once a step (epoch ends meet val_steps)
            state.validated_step = state.step
            val = validation_loss(accelerator, loss_module, val_loader)
            tracker.log({"val/loss": val, "epoch": state.epoch}, step=state.step)
            log.info("step %d: validation loss %.4f", state.step, val)

    # ---- the loop
    started = time.time()
    window_start, window_samples, window_tokens, window_wait, window_flops = time.time(), 0, 0, 0.0, 0.0
    peak_flops = device_peak_flops(t.peak_tflops)
    model_flops, train_vision = ModelFlops(model), vision_trains(model)
    steps = None
    exit_code = 0
    loss_module.train()
    while state.step < total_steps:
        if steps is None:  # start (or continue) an epoch at the exact position
            steps = train_steps.epoch(state.epoch, state.samples_in_epoch)
        fetch_started = time.time()
        step = next(steps, None)  # this process's micro-batches of the step, and the position after it
        window_wait += time.time() - fetch_started
        if step is None:  # end of epoch
            state.epoch, state.samples_in_epoch, steps = state.epoch + 1, 0, None
            if t.val_interval and state.epoch % t.val_interval == 0:
                run_validation()
            if t.save_interval and state.epoch % t.save_interval == 0:
                if write_checkpoint(f"checkpoint_epoch_{state.epoch}"):
                    exit_code = 1
                    break
            continue

        group, state.samples_in_epoch = step
        # Bad samples travel in the batches; train on the rest (listed below, once, by the main process).
        problems = [p for batch in group for p in batch["problems"]]

        step_loss, global_tokens, dataset_losses = backward_step(accelerator, loss_module, group, mixed_datasets)

        if not math.isfinite(step_loss):
            optimizer.zero_grad(set_to_none=True)
            state.skipped_steps += 1
            state.nonfinite_in_a_row += 1
            log.warning(
                "step %d: loss is %s, step skipped (%d in a row)", state.step, step_loss, state.nonfinite_in_a_row
            )
            if state.nonfinite_in_a_row >= t.max_nonfinite_steps:
                log.error(
                    "%d non-finite losses in a row: stopping. Try: a 10x lower learning rate (training.lr_*), a "
                    "lower training.max_grad_norm, training.mixed_precision=bf16 instead of fp16, and "
                    "`granite-docling validate` on the data to find corrupt samples.",
                    state.nonfinite_in_a_row,
                )
                exit_code = 1
                break
            continue
        state.nonfinite_in_a_row = 0
        grad_norm = accelerator.clip_grad_norm_(loss_module.parameters(), t.max_grad_norm) if t.max_grad_norm else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.loss_sum, state.loss_steps = state.loss_sum + step_loss, state.loss_steps + 1
        progress.update(1)

        # ---- log every step to metrics.jsonl; a console line every log_interval steps
        shapes = [shape for batch in group for shape in batch_shape(batch)]  # (tokens, tiles, supervised) per sample
        window_samples += len(shapes)
        window_tokens += sum(tokens for tokens, _, _ in shapes)
        if peak_flops:
            window_flops += sum(model_flops.sample(*shape, train_vision=train_vision) for shape in shapes)
        lrs = {f"train/lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
        metrics = {
            "train/loss": step_loss,
            "train/avg_loss": state.loss_sum / state.loss_steps,
            "train/lr": optimizer.param_groups[0]["lr"],
            **lrs,
            "epoch": state.epoch,
            "train/supervised_tokens": global_tokens,
            "train/micro_batches": len(group),
        }
        metrics |= {f"train/loss/{name}": loss for name, loss in dataset_losses.items()}  # report.html draws them
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if state.step % t.log_interval == 0 or state.step == total_steps:
            seconds = time.time() - window_start
            elapsed = state.elapsed_seconds + time.time() - started
            samples_per_second = window_samples * world / seconds
            metrics |= {
                "train/samples_per_second": samples_per_second,
                "train/tokens_per_second": window_tokens * world / seconds,
                "train/data_wait": window_wait / seconds,
            }
            if peak_flops:  # this process's model FLOPs per second over its device's peak
                metrics["train/mfu"] = window_flops / seconds / peak_flops
            eta = (total_steps - state.step) * seconds / max(1, t.log_interval)
            log.info(
                "step %d/%d  epoch %d  loss %.4f  avg %.4f  lr %s  %.2f samples/s  %.0f tokens/s  data wait %.0f%%%s  "
                "elapsed %s  ETA %s",
                state.step,
                total_steps,
                state.epoch,
                step_loss,
                metrics["train/avg_loss"],
                "/".join(f"{g['lr']:.2e}" for g in optimizer.param_groups[::2]),
                samples_per_second,
                metrics["train/tokens_per_second"],
                100 * metrics["train/data_wait"],
                f"  MFU {100 * metrics['train/mfu']:.1f}%" if "train/mfu" in metrics else "",
                _duration(elapsed),
                _duration(eta),
            )
            window_start, window_samples, window_tokens, window_wait, window_flops = time.time(), 0, 0, 0.0, 0.0
        tracker.log(metrics, step=state.step)

        if t.val_steps and state.step % t.val_steps == 0:
            run_validation()
        if t.gen_eval_steps and state.step % t.gen_eval_steps == 0:
            run_generation_eval()
        if t.save_steps and state.step % t.save_steps == 0 and write_checkpoint(f"checkpoint_step_{state.step}"):
            exit_code = 1
            break
        stop_votes, bad_count = sum_over_processes(accelerator, float(stop.requested), float(len(problems)))
        if bad_count:  # rare: gather the new ones to the main process, which lists each sample once
            found = gather_object(problems) if world > 1 else problems
            new = append_problems(bad_samples_file, found, listed) if is_main else 0
            state.bad_samples += new
            if new:
                log.warning("step %d: %s (listed in %s)", state.step, summarise(found), bad_samples_file)
        if stop_votes:
            failure = write_checkpoint(f"checkpoint_step_{state.step}")
            if not failure:
                log.warning("stopped at step %d; resume with training.resume=auto (same run folder)", state.step)
            exit_code = 1 if failure else EXIT_INTERRUPTED
            break

    progress.close()
    stop.uninstall()
    if exit_code == 0:
        run_validation()  # the final model's validation loss (the sweep objective), unless it ran at this step
        exit_code = _finish(cfg, accelerator, loss_module, processor, final_dir, run_dir, state, data)
    tracker.finish()
    accelerator.end_training()
    return TrainResult(exit_code, tracker.latest)


def _finish(cfg, accelerator, loss_module, processor, final_dir, run_dir, state, data) -> int:
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
