"""Saving, stopping and resuming a run: checkpoints every process agrees were written, a stop on SIGTERM or
Ctrl-C after the current step, the restore of a checkpoint, and the run's list of bad samples.

Exit codes: :data:`EXIT_INTERRUPTED` (75) stopped after writing a checkpoint (resume with
``training.resume=auto``); 1 when a checkpoint could not be saved (a full disk: every process stops, the earlier
checkpoints are intact).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from accelerate import Accelerator
from omegaconf import OmegaConf

from granite_docling.checkpoint import (
    load_training_state,
    load_weights,
    rng_state,
    rotate_checkpoints,
    save_checkpoint,
    set_rng_state,
    training_state,
)
from granite_docling.checkpoint_manifest import (
    CheckpointError,
    CheckpointSaveError,
    DamagedCheckpointError,
    complete_checkpoints,
)
from granite_docling.collectives import gather_lists, sum_over_processes
from granite_docling.config import TrainingConfig
from granite_docling.data.sample import Problem
from granite_docling.data.training_data import append_problems, listed_problems, summarise
from granite_docling.optimizers import evaluation_weights
from granite_docling.training_run import LoopState, Run

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: a checkpoint was written, run again to continue


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


def restore(run: Run, folder: Path) -> None:
    """Load a checkpoint's weights, optimizer, schedule, loss scaler and this process's RNG into ``run``, and its
    loop position into ``run.state``, checked against this run's shape (global batch, processes, workers, which
    ``run.state`` holds) and set to it.

    With ``training.resume=auto`` (``folder`` the newest checkpoint), a damaged checkpoint is passed over for the
    one before it, with one warning that names what is wrong; a checkpoint named by ``training.resume=PATH`` is
    restored or refused.
    """
    accelerator, shape, training_batches = run.accelerator, run.state, run.training_batches
    folder, saved = whole_training_state(folder, run.training)
    load_weights(run.model, folder)
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    if "scaler" in saved and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"][min(accelerator.process_index, len(saved["rng"]) - 1)])  # more processes: the last
    state = LoopState.from_saved(saved["loop"])
    log.info(
        f"resumed from {folder} at step {state.step} (epoch {state.epoch}, {state.samples_in_epoch} "
        f"{training_batches.position_unit} into it)"
    )
    check_resumed_shape(state, shape, training_batches.exact_on_any_shape)
    state.global_batch = shape.global_batch
    state.processes = shape.processes
    state.workers = shape.workers
    run.state = state
    run.resumed = True


def whole_training_state(folder: Path, training: TrainingConfig) -> tuple[Path, dict]:
    """The checkpoint to restore and its training state: ``folder``, or with ``training.resume=auto`` the newest
    whole checkpoint at or before it (a damaged one is passed over with a warning that names its file)."""
    if training.resume != "auto":
        return folder, load_training_state(folder, training.trust_checkpoint)
    found = complete_checkpoints(folder.parent)
    candidates = [folder, *reversed(found[: found.index(folder)] if folder in found else [])]
    for candidate in candidates:
        try:
            return candidate, load_training_state(candidate, training.trust_checkpoint)
        except DamagedCheckpointError as error:
            log.warning("training.resume=auto: %s is damaged (%s); trying the one before it", candidate, error.what)
    raise CheckpointError(
        f"training.resume=auto: every checkpoint in {folder.parent} is damaged (see the warnings above); give "
        f"training.resume=PATH of a whole one, or start afresh in another run folder"
    )


class Checkpoints:
    """Saves checkpoints of the run: model folder, training state and the resolved config, on the main process;
    every process learns whether the save failed (a full disk), so that all stop together."""

    def __init__(self, run: Run):
        self.run = run
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(run.cfg))
        self.last_saved = None  # the name of the checkpoint saved last
        self.started = time.time()  # the training time of this process, added to the resumed one

    def save(self, name: str) -> int:
        """Save checkpoint ``name`` at the run's state; 0, or 1 when it failed and every process stops."""
        if name == self.last_saved:  # a stop request at a step that save_steps saved already
            return 0
        run = self.run
        rng_states = gather_lists(run.accelerator, [rng_state()])  # every process's RNG, by rank
        elapsed = run.state.elapsed_seconds + time.time() - self.started
        # the tracker's rows of metrics.jsonl go into the checkpoint (a resume cuts the file there)
        loop = asdict(run.state) | {"elapsed_seconds": elapsed, "metrics_rows": run.tracker.rows}
        folder = run.checkpoint_root / name

        def save() -> None:
            scaler = run.accelerator.scaler
            trainer_state = training_state(run.optimizer, run.scheduler, loop, rng_states, self.config_yaml, scaler)
            save_checkpoint(folder, run.model, run.processor, trainer_state)
            rotate_checkpoints(run.checkpoint_root, run.training.max_checkpoints)
            log.info("checkpoint saved: %s", folder)

        with evaluation_weights(run.optimizer):  # a schedule-free optimizer's average is what is saved
            failure = save_on_main(run.accelerator, save)
        if failure:
            advice = "the earlier checkpoints are intact: once it can be written, resume with training.resume=auto"
            log.error("%s; stopping (%s)", failure, advice)
            return 1
        self.last_saved = name
        return 0

    def save_model(self, folder: Path) -> None:
        """Save the model and processor alone (no training state); raises when it could not be written."""
        run = self.run
        with evaluation_weights(run.optimizer):
            failure = save_on_main(run.accelerator, lambda: save_checkpoint(folder, run.model, run.processor))
        if failure:
            raise CheckpointSaveError(failure)
        log.info("model saved: %s", folder)


def stop_with_checkpoint(checkpoints: Checkpoints) -> int:
    """A stop request: save a checkpoint to resume from; the exit code (EXIT_INTERRUPTED, or 1 when it failed)."""
    step = checkpoints.run.state.step
    if checkpoints.save(f"checkpoint_step_{step}"):
        return 1
    log.warning("stopped at step %d; resume with training.resume=auto (same run folder)", step)
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


def check_resumed_shape(state: LoopState, shape: LoopState, exact_on_any_shape: bool = True) -> None:
    """Say what a resume on another shape (``shape``: this run's global batch, processes and workers) means for
    the saved ``state``'s data order (see granite_docling.data.sampler and granite_docling.data.loading: a stream's
    position is exact on the same shape only)."""
    global_batch, world, workers = shape.global_batch, shape.processes, shape.workers
    saved_batch = state.global_batch
    saved_world = state.processes
    if (
        not exact_on_any_shape
        and saved_world
        and (saved_world, saved_batch, state.workers) != (world, global_batch, workers)
    ):
        log.warning(
            "resumed a streaming run on %d process(es) x %d workers with global batch %d (saved: %d x %d, "
            "%d): a stream's position is exact only on the same shape; each worker skips its share of %d "
            "micro-batches",
            world,
            workers,
            global_batch,
            saved_world,
            state.workers,
            saved_batch,
            state.samples_in_epoch,
        )
    elif saved_batch and saved_batch != global_batch:
        log.warning(
            "the global batch changed from %d to %d samples (batch x accumulation x processes): continuing "
            "the same sample order from global sample %d of epoch %d, in steps of the new size",
            saved_batch,
            global_batch,
            state.samples_in_epoch,
            state.epoch,
        )
    elif saved_world and saved_world != world:
        log.info(
            "resumed on %d process(es) instead of %d with the same global batch of %d: every step holds the "
            "same samples as before",
            world,
            saved_world,
            global_batch,
        )
