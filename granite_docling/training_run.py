"""One training run as the loop holds it: :class:`LoopState`, where the loop is (saved into every checkpoint's
state.json as a plain dict), and :class:`Run`, the objects built once at the start
(:func:`granite_docling.train_loop.start_run`) and passed whole to the step, the evaluations, the checkpoints and
the resume, instead of threading them one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from granite_docling.config import Config, TrainingConfig
from granite_docling.data.loading import IndexedSteps, StreamedSteps
from granite_docling.data.training_data import Data
from granite_docling.tracking import NullTracker


@dataclass
class LoopState:
    """Where the loop is: enough to continue at the exact next batch. The field names are state.json's ``loop``
    keys: renaming one breaks the resume of older checkpoints."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    samples_in_epoch: int = 0  # samples of the epoch's global order consumed (streaming: this process's batches)
    skipped_steps: int = 0  # steps skipped for a non-finite loss, in total
    nonfinite_in_a_row: int = 0  # consecutive non-finite steps
    loss_sum: float = 0.0  # running totals behind train/avg_loss
    loss_steps: int = 0
    bad_samples: int = 0  # bad samples found by the workers and listed, in total
    global_batch: int = 0  # batch x accumulation x processes when saved (0: unknown, an older checkpoint)
    processes: int = 0  # number of processes when saved
    workers: int = 0  # DataLoader workers per process when saved (a stream's position depends on them)
    elapsed_seconds: float = 0.0  # training time before this (resumed) process started
    validated_step: int | None = None  # the step of the last validation
    metrics_rows: int | None = None  # rows of metrics.jsonl when saved (None: an older checkpoint)

    @classmethod
    def from_saved(cls, loop: dict) -> LoopState:
        """The state a checkpoint's ``loop`` dict saved (fields of older checkpoints that no longer exist are left
        out, fields they lack take their defaults)."""
        return cls(**{key: value for key, value in loop.items() if key in cls.__dataclass_fields__})


@dataclass
class Run:
    """What one training run holds, built once: the accelerator and the prepared objects, the data, the loop
    state, and what the step and the saves need."""

    cfg: Config  # the whole resolved config: written into every checkpoint
    accelerator: Accelerator
    loss_module: torch.nn.Module  # the model inside its loss (granite_docling.loss), prepared by Accelerate
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    processor: Any
    data: Data
    training_batches: IndexedSteps | StreamedSteps  # each epoch's steps, from a position in it
    val_loader: Any  # the validation split's batches on this process, or None
    total_steps: int
    run_dir: Path  # the Hydra run folder: metrics, bad samples, checkpoints unless training.save_dir
    bad_samples: Any  # granite_docling.run_control.BadSampleList: the run's bad_samples.jsonl
    state: LoopState = field(default_factory=LoopState)
    tracker: NullTracker = field(default_factory=NullTracker)  # a Tracker on the main process
    resumed: bool = False  # whether the run continues a checkpoint
    mixed_datasets: list[str] = field(default_factory=list)  # a mix's dataset names, whose own losses are logged
    memory_advice: str = ""  # what to change should a micro-batch not fit
    trained_tokens: int = 0  # supervised tokens this process's run trained, all processes: 0 if every sample was bad

    @property
    def training(self) -> TrainingConfig:
        return self.cfg.training

    @property
    def checkpoint_root(self) -> Path:
        """Where checkpoint_step_N / checkpoint_epoch_N go: ``training.save_dir``, else the run folder's
        checkpoints/."""
        return Path(self.training.save_dir) if self.training.save_dir else self.run_dir / "checkpoints"

    @property
    def final_dir(self) -> Path:
        """The final model's folder: beside the checkpoints in ``training.save_dir``, else in the run folder."""
        return self.checkpoint_root / "final_model" if self.training.save_dir else self.run_dir / "final_model"

    @property
    def model(self) -> torch.nn.Module:
        """The model being trained, out of its loss and Accelerate's wrappers."""
        return self.accelerator.unwrap_model(self.loss_module).model
