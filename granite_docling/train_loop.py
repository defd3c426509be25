"""The training loop: :func:`train`, read top to bottom, and :func:`train_step`, one optimizer step. Accelerate
does devices, mixed precision and process groups; the rest is here in plain sight, its parts named: the run's
objects and loop state, built once (:mod:`granite_docling.training_run`), the step's parts
(:mod:`granite_docling.optimization`), saving, stopping and resuming (:mod:`granite_docling.run_control`), what
a step reports (:mod:`granite_docling.progress`) and what the processes compute together
(:mod:`granite_docling.collectives`).

    python train.py experiment=quick          # see train.py for every way to launch it

Vocabulary: a step (``state.step`` of ``total_steps``) is an optimizer step, ``batch_size x
gradient_accumulation_steps x processes`` samples; a micro-step one forward/backward per process of one
micro-batch, ``batch_size`` samples (``gradient_accumulation_steps`` of them make a step) or, with
``data.batch_tokens``, as many samples as fit that many padded tokens (as many micro-batches as the step's samples
need); ``micro_batches`` one step's group of them on this process; an epoch a pass over the training split,
``steps_per_epoch`` steps long. ``run.training_batches`` gives each epoch's steps from a position in it,
``epoch_batches`` is the epoch's iterator over them.

Every epoch's first step holds its longest sample (:mod:`granite_docling.data.sampler`); where the first step of
a run, fresh or resumed, does not hold the heaviest micro-batch ahead, a memory probe trains and drops it before
(:func:`probe_memory`): a run that cannot fit fails in its first minute, not hours in.

Exit codes: 0 done; :data:`EXIT_INTERRUPTED` (75) stopped by SIGTERM / Ctrl-C after writing a checkpoint,
resume with ``training.resume=auto`` (same ``hydra.run.dir``) or ``training.resume=PATH``; 1 on errors,
including too many non-finite losses in a row and a checkpoint that could not be saved (a full disk: every
process stops, the earlier checkpoints are intact); 2 (through train.py's ``error:`` line) for a micro-batch
that does not fit in memory, and for a run that trained no sample in an epoch or in all its steps (every one
it met was bad).
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from granite_docling.checkpoint import push_to_hub, save_checkpoint
from granite_docling.checkpoint_manifest import latest_checkpoint
from granite_docling.collectives import any_process_true, gather_lists, sum_over_processes
from granite_docling.config import Config
from granite_docling.data.loading import build_data, training_steps, validation_loader
from granite_docling.data.sampler import BatchPlan
from granite_docling.data.sources import DatasetNotFoundError
from granite_docling.evaluation.generate import evaluate_generation
from granite_docling.evaluation.loss_curve import draw_loss_curve
from granite_docling.flops import device_peak_flops
from granite_docling.model import load_model_and_processor
from granite_docling.optimization import (
    StepLoss,
    backward_step,
    make_optimizer,
    memory_advice,
    memory_probe,
    optimizer_state_held,
    prepare_for_training,
    token_loss,
    validation_loss,
)
from granite_docling.optimizers import evaluation_weights
from granite_docling.precision import device_precision
from granite_docling.progress import ThroughputWindow, progress_bar, progress_line, step_metrics
from granite_docling.run_control import (
    BadSampleList,
    Checkpoints,
    StopRequest,
    restore,
    save_on_main,
    stop_with_checkpoint,
)
from granite_docling.tracking import Tracker, read_metrics
from granite_docling.training_run import LoopState, Run

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    exit_code: int  # 0 done, EXIT_INTERRUPTED, 1 on errors
    latest: dict[str, float] = field(default_factory=dict)  # every metric as last logged (val/loss, train/loss...)


def train(cfg: Config, run_dir: str | Path) -> TrainResult:
    """Train as ``cfg`` says, in ``run_dir`` (metrics, checkpoints, the final model); the exit code and the last
    logged metrics. Raises for a run that trained no sample and a micro-batch that does not fit in memory."""
    run = start_run(cfg, Path(run_dir))
    accelerator, training, state = run.accelerator, run.training, run.state
    checkpoints = Checkpoints(run)
    if training.save_initial and not run.resumed:  # the weights training starts from, for before/after evaluations
        checkpoints.save_model(run.final_dir.parent / "initial_model")
    run.loss_module.train()
    run.optimizer.train()  # schedule-free optimizers: their training point (a no-op for the others)
    probe_memory(run)

    stop = StopRequest()
    stop.install()
    progress = progress_bar(run.total_steps, state.step, accelerator.is_main_process)
    window = ThroughputWindow(run.model, device_peak_flops(training.peak_tflops))
    epoch_batches = None
    exit_code = 0
    first_step = state.step
    while state.step < run.total_steps:
        epoch_batches = epoch_batches or run.training_batches.epoch(state.epoch, state.samples_in_epoch)
        fetch_started = time.time()
        fetched = next(epoch_batches, None)  # this process's micro-batches of the step, and the position after it
        window.waited_for_data(time.time() - fetch_started)
        if fetched is None:  # end of epoch
            if state.step > first_step and not run.trained_tokens:  # an epoch's worth of steps, nothing read
                break
            epoch_batches = None
            if exit_code := end_epoch(run, checkpoints):
                break
            continue

        micro_batches, state.samples_in_epoch = fetched
        problems = [p for batch in micro_batches for p in batch["problems"]]  # bad samples travel in the batches
        done = train_step(run, micro_batches)
        if exit_code := done.exit_code:
            break
        if not done.trained:
            continue
        progress.update(1)

        # ---- log every step to metrics.jsonl; a console line every log_interval steps
        window.add(micro_batches)
        groups = run.optimizer.param_groups
        metrics = step_metrics(done.loss, state, groups, len(micro_batches), done.grad_norm)
        if state.step % training.log_interval == 0 or state.step == run.total_steps:
            metrics |= window.close(accelerator.num_processes)
            log.info(progress_line(state, run.total_steps, metrics, groups, window, training.log_interval))
        run.tracker.log(metrics, step=state.step)

        if training.val_steps and state.step % training.val_steps == 0:
            with evaluation_weights(run.optimizer):
                validate(run)
        if training.gen_eval_steps and state.step % training.gen_eval_steps == 0:
            with evaluation_weights(run.optimizer):
                generation_eval(run)
        if training.save_steps and state.step % training.save_steps == 0:
            if exit_code := checkpoints.save(f"checkpoint_step_{state.step}"):
                break
        stop_votes, bad_count = sum_over_processes(accelerator, float(stop.requested), float(len(problems)))
        if bad_count:  # rare: gather the new ones to the main process, which lists each sample once
            state.bad_samples += run.bad_samples.add(gather_lists(accelerator, problems), state.step)
        if stop_votes:
            exit_code = stop_with_checkpoint(checkpoints)
            break

    progress.close()
    stop.uninstall()
    if exit_code == 0 and state.step > first_step and not run.trained_tokens:
        run.tracker.finish()
        raise nothing_trained(state.step - first_step, run.run_dir / "bad_samples.jsonl")
    if exit_code == 0:
        with evaluation_weights(run.optimizer):  # the final model is a schedule-free optimizer's average
            validate(run)  # the final model's (the sweep objective)
            exit_code = _finish(run)
    run.tracker.finish()
    latest = run.tracker.latest
    del checkpoints, run  # the DDP wrapper's reducer holds the process group; _leave releases the rest
    _leave(accelerator)
    return TrainResult(exit_code, latest)


def end_epoch(run: Run, checkpoints: Checkpoints) -> int:
    """An epoch is done: the next starts at its first sample, after the validation and the checkpoint its
    ``val_interval`` / ``save_interval`` ask for; 0, or 1 when the checkpoint could not be saved."""
    state, training = run.state, run.training
    state.epoch += 1
    state.samples_in_epoch = 0
    if training.val_interval and state.epoch % training.val_interval == 0:
        with evaluation_weights(run.optimizer):
            validate(run)
    if training.save_interval and state.epoch % training.save_interval == 0:
        return checkpoints.save(f"checkpoint_epoch_{state.epoch}")
    return 0


class StepDone(NamedTuple):
    """What :func:`train_step` did."""

    loss: StepLoss  # the step's loss over every process (NaN / Inf for a skipped step)
    grad_norm: torch.Tensor | None  # before clipping; None without training.max_grad_norm or when skipped
    trained: bool  # False: a non-finite loss, the step was skipped (no update, state.step unchanged)
    exit_code: int = 0  # 1: too many non-finite steps in a row, the run stops


def train_step(run: Run, micro_batches: list[dict]) -> StepDone:
    """One optimizer step over this process's ``micro_batches``, the whole of it: forward and backward over each
    (:func:`~granite_docling.optimization.backward_step`: the loss normalised by the step's supervised tokens
    over every process), then for a finite loss the clipped update, the schedule and the loop state's counters;
    for a NaN / Inf loss (the same on every process) no update, the step counted as skipped, and
    ``training.max_nonfinite_steps`` of them in a row stop the run."""
    accelerator, optimizer, state, training = run.accelerator, run.optimizer, run.state, run.training
    with optimizer_state_held(optimizer):  # zeros of its size until the first update makes it
        step_loss = backward_step(accelerator, run.loss_module, micro_batches, run.mixed_datasets, run.memory_advice)
    if not math.isfinite(step_loss.loss):
        optimizer.zero_grad(set_to_none=True)
        exit_code = skip_nonfinite_step(state, step_loss.loss, training.max_nonfinite_steps)
        return StepDone(step_loss, None, trained=False, exit_code=exit_code)

    grad_norm = None
    if training.max_grad_norm:
        grad_norm = accelerator.clip_grad_norm_(run.loss_module.parameters(), training.max_grad_norm)
    optimizer.step()
    run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    state.step += 1
    state.loss_sum += step_loss.loss
    state.loss_steps += 1
    state.nonfinite_in_a_row = 0
    run.trained_tokens += step_loss.tokens
    return StepDone(step_loss, grad_norm, trained=True)


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


def start_run(cfg: Config, run_dir: Path) -> Run:
    """Everything a run needs before its first step, built once: the accelerator, the model inside its loss, the
    data, the optimizer and its schedule, the loop state (a checkpoint's, when resuming) and the tracker."""
    run_dir.mkdir(parents=True, exist_ok=True)
    training = cfg.training
    precision, precision_reason = device_precision(training.mixed_precision)
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(training.seed)
    log.info(
        f"run folder {run_dir}, {world} process(es) on {accelerator.device}, mixed precision {precision} "
        f"({precision_reason})"
    )

    # ---- model, data, optimizer, schedule
    model, processor = load_model_and_processor(cfg.model)
    model = prepare_for_training(model, cfg.model.lora, training.gradient_checkpointing)
    pad_id = processor.tokenizer.pad_token_id
    plan = BatchPlan(training.seed, training.batch_size, training.gradient_accumulation_steps, rank, world)
    data = build_data(cfg.dataset, processor, cfg.data, plan)
    bad_samples = BadSampleList(run_dir / "bad_samples.jsonl", accelerator.is_main_process)
    bad_samples.add(data.problems)
    training_batches = training_steps(data, pad_id, functools.partial(any_process_true, accelerator))
    global_batch = training.batch_size * training.gradient_accumulation_steps * world
    steps_per_epoch = training_batches.planned_steps(training.num_epochs)
    total_steps = training.max_steps or sum(steps_per_epoch)
    optimizer, scheduler = make_optimizer(model, training, cfg.optimizer, total_steps, cfg.scheduler)
    loss_module, optimizer = accelerator.prepare(token_loss(model, training), optimizer)
    log.info(
        f"{total_steps} optimizer steps ({steps_per_epoch[0]} per epoch; effective batch {global_batch} = "
        f"{training.batch_size} x {training.gradient_accumulation_steps} accumulation x {world} processes)"
    )
    run = Run(
        cfg=cfg,
        run_dir=run_dir,
        accelerator=accelerator,
        state=LoopState(global_batch=global_batch, processes=world, workers=cfg.data.num_workers),
        loss_module=loss_module,
        optimizer=optimizer,
        scheduler=scheduler,
        memory_advice=memory_advice(training, cfg.data, cfg.model.image_longest_edge),
        processor=processor,
        data=data,
        mixed_datasets=list(data.sizes) if len(data.sizes) > 1 else [],  # a mix: each dataset's loss is logged
        training_batches=training_batches,
        val_loader=validation_loader(data, pad_id, rank, world),
        total_steps=total_steps,
        bad_samples=bad_samples,
    )

    # ---- resume, and the tracker (which continues the resumed run's)
    resume_from = latest_checkpoint(run.checkpoint_root) if training.resume == "auto" else training.resume
    if training.resume == "auto" and resume_from is None:
        log.info("training.resume=auto: no checkpoint in %s yet, starting from scratch", run.checkpoint_root)
    if resume_from is not None:
        restore(run, Path(resume_from))
    if accelerator.is_main_process:
        run.tracker = Tracker(run_dir, cfg, run.state.step if run.resumed else None, run.state.metrics_rows)
    return run


def probe_memory(run: Run) -> None:
    """Train and drop the heaviest micro-batch ahead where the run's first step, fresh or resumed, does not hold
    it (:func:`~granite_docling.optimization.memory_probe`): a run that cannot fit fails now, not hours in."""
    state = run.state
    ahead = run.training_batches.heaviest(state.epoch, state.samples_in_epoch)  # None for streamed data
    if ahead is not None and state.step < run.total_steps and any_process_true(run.accelerator, not ahead.next_step):
        memory_probe(run.accelerator, run.loss_module, run.optimizer, ahead.batch, run.memory_advice)


def validate(run: Run) -> None:
    """The validation loss, logged as val/loss; once a step (an epoch's end may meet val_steps), none without a
    validation split."""
    state = run.state
    if run.val_loader is not None and state.validated_step != state.step:
        state.validated_step = state.step
        val = validation_loss(run.accelerator, run.loss_module, run.val_loader)
        run.tracker.log({"val/loss": val, "epoch": state.epoch}, step=state.step)
        log.info("step %d: validation loss %.4f", state.step, val)


def generation_eval(run: Run) -> None:
    """Greedy answers for a few validation samples, scored like evaluate.py, logged as gen/*."""
    training, step = run.training, run.state.step
    if run.data.val is not None and run.accelerator.is_main_process:
        samples = run.data.val.samples(training.gen_eval_samples)
        with run.accelerator.autocast():
            scores = evaluate_generation(
                run.model,
                run.processor,
                samples,
                training.gen_eval_max_new_tokens,
                training.batch_size,
                run.data.image_edges,
            )
        run.tracker.log(scores, step=step)
        log.info("step %d: " + "  ".join(f"{k} %.3f" for k in scores), step, *scores.values())
    run.accelerator.wait_for_everyone()


def nothing_trained(steps: int, bad_samples: Path) -> DatasetNotFoundError:
    """The error of a run whose ``steps`` steps trained no sample: every sample it met was bad."""
    return DatasetNotFoundError(
        f"no training sample could be read: {steps} step(s) trained nothing, every sample they met was bad "
        f"(each is listed in {bad_samples} with the reason); fix or remove them (granite-docling validate lists "
        "them too) and train again"
    )


def _leave(accelerator: Accelerator) -> None:
    """Every process leaves through a barrier and destroys the process group here, not wherever the DDP wrapper
    happens to be freed: the group's destructor joins its gloo worker threads, and rank 1 of an srun pair once
    hung in that join after train() had returned, rank 0 gone (why its worker never finished is not proven).
    Here no process is inside a collective, the prepared model (its reducer holds the group) is released first,
    and the group goes while every process is alive."""
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # drops the accelerator's references to the prepared model and optimizer; gc
    accelerator.end_training()  # torch.distributed.destroy_process_group(): the last reference, threads joined


def _finish(run: Run) -> int:
    """Final model, bad-sample summary, loss curve, hub upload; prints where everything is. Returns the exit code
    (1 when the final model could not be saved)."""
    accelerator, final_dir, run_dir, training = run.accelerator, run.final_dir, run.run_dir, run.training
    failure = save_on_main(accelerator, lambda: save_checkpoint(final_dir, run.model, run.processor, None))
    if failure:
        log.error("%s; the last checkpoint in %s is intact", failure, final_dir.parent)
        return 1
    if accelerator.is_main_process:
        plot = draw_loss_curve(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss_curve.png")
        bad_files = sorted(run_dir.glob("bad_samples*.jsonl"))
        n_bad = sum(len(f.read_text().splitlines()) for f in bad_files)
        log.info("training done: %d steps, final model in %s", run.state.step, final_dir)
        log.info("metrics: %s; loss curve: %s", run_dir / "metrics.jsonl", plot)
        if n_bad:
            log.warning("%d bad sample(s) skipped in total, listed in %s", n_bad, ", ".join(map(str, bad_files)))
        if training.push_to_hub:
            push_to_hub(final_dir, training.hub_repo_id, training.hub_private)
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit("run training with: python train.py [overrides]")
