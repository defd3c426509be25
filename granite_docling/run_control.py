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

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from omegaconf import OmegaConf

from granite_docling.checkpoint import (
    LoopState,
    check_resumed_shape,
    load_training_state,
    load_weights,
    loop_state,
    rng_state,
    rotate_checkpoints,
    save_checkpoint,
    set_rng_state,
    training_state,
)
from granite_docling.checkpoint_files import (
    CheckpointError,
    CheckpointSaveError,
    DamagedCheckpointError,
    complete_checkpoints,
)
from granite_docling.config import TrainingConfig
from granite_docling.data.problems import append_problems, listed_problems, summarise
from granite_docling.data.sample import Problem
from granite_docling.optimization import sum_over_processes
from granite_docling.optimizers import evaluation_weights

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


def restore(
    folder: Path,
    accelerator: Accelerator,
    loss_module,
    optimizer,
    scheduler,
    t: TrainingConfig,
    train_steps,
    shape: LoopState,
) -> LoopState:
    """Load a checkpoint's weights, optimizer, schedule, loss scaler and this process's RNG. Returns its loop
    position, checked against this run's shape (``shape``: global batch, processes, workers) and set to it.

    With ``training.resume=auto`` (``folder`` the newest checkpoint), a damaged checkpoint is passed over for the
    one before it, with one warning that names what is wrong; a checkpoint named by ``training.resume=PATH`` is
    restored or refused.
    """
    folder, saved = whole_training_state(folder, t)
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
    check_resumed_shape(state, shape.global_batch, shape.processes, shape.workers, train_steps.exact_on_any_shape)
    state.global_batch = shape.global_batch
    state.processes = shape.processes
    state.workers = shape.workers
    return state


def whole_training_state(folder: Path, t: TrainingConfig) -> tuple[Path, dict]:
    """The checkpoint to restore and its training state: ``folder``, or with ``training.resume=auto`` the newest
    whole checkpoint at or before it (a damaged one is passed over with a warning that names its file)."""
    if t.resume != "auto":
        return folder, load_training_state(folder, t.trust_checkpoint)
    found = complete_checkpoints(folder.parent)
    candidates = [folder, *reversed(found[: found.index(folder)] if folder in found else [])]
    for candidate in candidates:
        try:
            return candidate, load_training_state(candidate, t.trust_checkpoint)
        except DamagedCheckpointError as error:
            log.warning("training.resume=auto: %s is damaged (%s); trying the one before it", candidate, error.what)
    raise CheckpointError(
        f"training.resume=auto: every checkpoint in {folder.parent} is damaged (see the warnings above); give "
        f"training.resume=PATH of a whole one, or start afresh in another run folder"
    )


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

        with evaluation_weights(self.optimizer):  # a schedule-free optimizer's average is what is saved
            failure = save_on_main(self.accelerator, save)
        if failure:
            advice = "the earlier checkpoints are intact: once it can be written, resume with training.resume=auto"
            log.error("%s; stopping (%s)", failure, advice)
            return 1
        self.last_saved = name
        return 0

    def save_model(self, folder: Path) -> None:
        """Save the model and processor alone (no training state); raises when it could not be written."""
        with evaluation_weights(self.optimizer):
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
