"""The training loop: one function, read top to bottom. Accelerate does devices, mixed precision and process
groups; the rest is here in plain sight, its parts named: one optimizer step (:mod:`granite_docling.optimization`),
saving, stopping and resuming (:mod:`granite_docling.run_control`), and what a step reports
(:mod:`granite_docling.progress`).

    python train.py experiment=quick          # see train.py for every way to launch it

Vocabulary: ``step`` is an optimizer step, ``batch_size x gradient_accumulation_steps x processes`` samples;
``micro_step`` one forward/backward per process, of ``batch_size`` samples (``gradient_accumulation_steps`` of
them make a step) or, with ``data.batch_tokens``, of as many samples as fit that many padded tokens (as many
micro-steps as the step's samples need); ``epoch`` a pass over the training split.

Every epoch's first step holds its longest sample (:mod:`granite_docling.data.sampler`); where the first step of
a run, fresh or resumed, does not hold the heaviest micro-batch ahead, a memory probe trains and drops it before
(:func:`~granite_docling.optimization.memory_probe`): a run that cannot fit fails in its first minute, not hours in.

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from granite_docling.checkpoint import LoopState, push_to_hub, save_checkpoint
from granite_docling.checkpoint_files import latest_checkpoint
from granite_docling.config import Config, TrainingConfig
from granite_docling.data.loading import build_data
from granite_docling.data.policy import Data
from granite_docling.data.sources import DatasetNotFoundError
from granite_docling.data.steps import training_steps, validation_loader
from granite_docling.evaluation.generate import evaluate_generation
from granite_docling.evaluation.loss_curve import draw_loss_curve
from granite_docling.flops import device_peak_flops
from granite_docling.model import load_model_and_processor
from granite_docling.optimization import (
    any_process_true,
    backward_step,
    make_optimizer,
    memory_advice,
    memory_probe,
    optimizer_state_held,
    optimizer_step,
    prepare_for_training,
    sum_over_processes,
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
from granite_docling.tracking import NullTracker, Tracker, read_metrics

log = logging.getLogger(__name__)


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


def nothing_trained(steps: int, bad_samples: Path) -> DatasetNotFoundError:
    """The error of a run whose ``steps`` steps trained no sample: every sample it met was bad."""
    return DatasetNotFoundError(
        f"no training sample could be read: {steps} step(s) trained nothing, every sample they met was bad "
        f"(each is listed in {bad_samples} with the reason); fix or remove them (granite-docling validate lists "
        "them too) and train again"
    )


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
    data = build_data(
        cfg.dataset,
        processor,
        cfg.data,
        seed=t.seed,
        batch_size=t.batch_size,
        accumulation=t.gradient_accumulation_steps,
        rank=rank,
        world_size=world,
    )
    mixed_datasets = list(data.sizes) if len(data.sizes) > 1 else []  # a mix: each dataset's loss is logged
    bad_samples = BadSampleList(run_dir / "bad_samples.jsonl", accelerator.is_main_process)
    bad_samples.add(data.problems)

    any_process = functools.partial(any_process_true, accelerator)
    train_steps = training_steps(data, pad_id, any_process)
    val_loader = validation_loader(data, pad_id, rank, world)
    global_batch = t.batch_size * t.gradient_accumulation_steps * world
    epoch_steps = train_steps.planned_steps(t.num_epochs)
    total_steps = t.max_steps or sum(epoch_steps)
    optimizer, scheduler = make_optimizer(model, t, cfg.optimizer, total_steps, cfg.scheduler)
    loss_module, optimizer = accelerator.prepare(token_loss(model, t), optimizer)
    log.info(
        f"{total_steps} optimizer steps ({epoch_steps[0]} per epoch; effective batch {global_batch} = "
        f"{t.batch_size} x {t.gradient_accumulation_steps} accumulation x {world} processes)"
    )

    # ---- resume, or save the weights training starts from
    resume_from = latest_checkpoint(checkpoint_root) if t.resume == "auto" else t.resume
    if t.resume == "auto" and resume_from is None:
        log.info("training.resume=auto: no checkpoint in %s yet, starting from scratch", checkpoint_root)
    state = LoopState(global_batch=global_batch, processes=world, workers=cfg.data.num_workers)
    if resume_from is not None:
        state = restore(Path(resume_from), accelerator, loss_module, optimizer, scheduler, t, train_steps, state)
    tracker = NullTracker()
    if accelerator.is_main_process:
        tracker = Tracker(run_dir, cfg, state.step if resume_from is not None else None, state.metrics_rows)
    checkpoints = Checkpoints(accelerator, loss_module, optimizer, scheduler, processor, checkpoint_root, cfg, tracker)
    if t.save_initial and resume_from is None:  # the weights training starts from, for before/after evaluations
        checkpoints.save_model(final_dir.parent / "initial_model")

    # ---- the heaviest micro-batch ahead comes first: a run that cannot fit fails now, not hours in
    loss_module.train()
    optimizer.train()  # schedule-free optimizers: their training point (a no-op for the others)
    advice = memory_advice(t, cfg.data, cfg.model.image_longest_edge)  # what to change, should a micro-batch not fit
    ahead = train_steps.heaviest(state.epoch, state.samples_in_epoch)  # None for streamed data
    if ahead is not None and state.step < total_steps and any_process(not ahead.next_step):
        memory_probe(accelerator, loss_module, optimizer, ahead.batch, advice)  # trained and dropped

    # ---- the loop
    stop = StopRequest()
    stop.install()
    progress = progress_bar(total_steps, state.step, accelerator.is_main_process)
    window = ThroughputWindow(model, device_peak_flops(t.peak_tflops))
    steps = None
    exit_code = 0
    first_step = state.step
    trained_tokens = 0  # supervised tokens this run trained, all processes: 0 when every sample it met was bad
    while state.step < total_steps:
        steps = steps or train_steps.epoch(state.epoch, state.samples_in_epoch)  # from the exact position
        step = window.next_step(steps)  # this process's micro-batches of the step, and the position after it
        if step is None:  # end of epoch
            if state.step > first_step and not trained_tokens:  # an epoch's worth of steps, nothing read
                break
            state.epoch += 1
            state.samples_in_epoch = 0
            steps = None
            if t.val_interval and state.epoch % t.val_interval == 0:
                with evaluation_weights(optimizer):
                    validate(accelerator, loss_module, val_loader, state, tracker)
            if t.save_interval and state.epoch % t.save_interval == 0:
                if exit_code := checkpoints.save(f"checkpoint_epoch_{state.epoch}", state):
                    break
            continue

        group, state.samples_in_epoch = step
        problems = [p for batch in group for p in batch["problems"]]  # bad samples travel in the batches
        with optimizer_state_held(optimizer):  # zeros of its size until the first update makes it
            step_loss = backward_step(accelerator, loss_module, group, mixed_datasets, advice)
        if not math.isfinite(step_loss.loss):
            optimizer.zero_grad(set_to_none=True)
            if exit_code := skip_nonfinite_step(state, step_loss.loss, t.max_nonfinite_steps):
                break
            continue
        grad_norm = optimizer_step(accelerator, loss_module, optimizer, scheduler, t.max_grad_norm)
        state.step += 1
        trained_tokens += step_loss.tokens
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
            with evaluation_weights(optimizer):
                validate(accelerator, loss_module, val_loader, state, tracker)
        if t.gen_eval_steps and state.step % t.gen_eval_steps == 0:
            with evaluation_weights(optimizer):
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
    if exit_code == 0 and state.step > first_step and not trained_tokens:
        tracker.finish()
        raise nothing_trained(state.step - first_step, run_dir / "bad_samples.jsonl")
    if exit_code == 0:
        with evaluation_weights(optimizer):  # the final model is a schedule-free optimizer's average
            validate(accelerator, loss_module, val_loader, state, tracker)  # the final model's (the sweep objective)
            exit_code = _finish(cfg, accelerator, loss_module, processor, final_dir, run_dir, state)
    tracker.finish()
    del checkpoints, loss_module  # the DDP wrapper's reducer holds the process group; _leave releases the rest
    _leave(accelerator)
    return TrainResult(exit_code, tracker.latest)


def _leave(accelerator: Accelerator) -> None:
    """Every process leaves through a barrier and destroys the process group here, not wherever the DDP wrapper
    happens to be freed: the group's destructor joins its gloo worker threads, and rank 1 of an srun pair once
    hung in that join after train() had returned, rank 0 gone (why its worker never finished is not proven).
    Here no process is inside a collective, the prepared model (its reducer holds the group) is released first,
    and the group goes while every process is alive."""
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # drops the accelerator's references to the prepared model and optimizer; gc
    accelerator.end_training()  # torch.distributed.destroy_process_group(): the last reference, threads joined


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


if __name__ == "__main__":
    sys.exit("run training with: python train.py [overrides]")
