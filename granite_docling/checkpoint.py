"""Atomic checkpoints that are complete HF model folders, plus everything needed to resume exactly.

A checkpoint folder holds what stock ``AutoModelForImageTextToText`` / ``AutoProcessor`` need (config,
safetensors weights, generation config, processor, tokenizer and chat template files; LoRA runs save merged
weights) and ``training_state.pt``: optimizer, scheduler, loop position (step, epoch, samples consumed in the
epoch), RNG states of every process, and the resolved config. LoRA runs also keep ``adapter/`` for resuming.

Writes go to a hidden temporary folder that is renamed into place, so a crash mid-save never leaves a folder
that looks complete; only complete folders are considered by ``training.resume=auto``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
ADAPTER_DIR = "adapter"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_(epoch|step)_(\d+)$")


@dataclass
class LoopState:
    """Where the loop is: enough to continue at the exact next batch."""

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
    extra: dict = field(default_factory=dict)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model_folder(folder: Path, model: torch.nn.Module, processor) -> None:
    """A stock-loadable model folder. A peft model is saved merged (without touching the training copy),
    with its adapter beside it in ``adapter/``."""
    if hasattr(model, "merge_and_unload"):  # peft
        model.save_pretrained(folder / ADAPTER_DIR)
        merged = _merged_copy(model)
        merged.save_pretrained(folder, safe_serialization=True)
        del merged
    else:
        model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def _merged_copy(peft_model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()


def save_checkpoint(folder: Path, model, processor, training_state: dict | None) -> Path:
    """Write ``folder`` atomically: model files, processor files and (unless None) ``training_state.pt``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(tmp, model, processor)
    if training_state is not None:
        torch.save(training_state, tmp / STATE_FILE)
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        folder.rename(old)  # rename, not delete, first: there is always one complete copy on disk
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def checkpoint_sort_key(folder: Path) -> tuple[int, float]:
    """Newest last: by the optimizer step recorded in it, then modification time."""
    state_file = folder / STATE_FILE
    step = -1
    if state_file.is_file():
        step = torch.load(state_file, map_location="cpu", weights_only=False)["loop"]["step"]
    return step, folder.stat().st_mtime


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root`` that finished writing, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT_NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_sort_key)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def rotate_checkpoints(root: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; return what was deleted."""
    if keep is None:
        return []
    found = complete_checkpoints(root)
    doomed = found[: max(0, len(found) - keep)]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed old checkpoint %s (keeping %d)", folder, keep)
    return doomed


def training_state(
    optimizer, scheduler, loop: LoopState, rng_states: list[dict], config_yaml: str, scaler=None
) -> dict:
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loop": asdict(loop),
        "rng": rng_states,  # one per process, by rank
        "config": config_yaml,
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def load_training_state(folder: Path) -> dict:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {STATE_FILE}: it is a model folder, not a training checkpoint. To fine-tune from "
            f"it, set model.checkpoint={folder} instead of training.resume"
        )
    return torch.load(path, map_location="cpu", weights_only=False)


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Restore trained weights from a checkpoint folder into the (possibly peft-wrapped) training model."""
    if hasattr(model, "merge_and_unload"):  # LoRA: the adapter is the trained state; base weights are the original
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(folder / "adapter" / "adapter_model.safetensors"))
        return
    from safetensors.torch import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state |= load_file(file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings, not stored twice
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {folder} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def push_to_hub(folder: Path, repo_id: str, private: bool) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload fine-tuned granite-docling")
    log.info("pushed %s to https://huggingface.co/%s", folder, repo_id)
    return repo_id


def check_resumed_shape(state: LoopState, global_batch: int, world: int, workers: int, streaming: bool) -> None:
    """Say what a resume on another shape means for the data order (see granite_docling.data.sampler)."""
    saved_batch, saved_world = state.global_batch, state.processes
    if streaming and saved_world and (saved_world, saved_batch, state.workers) != (world, global_batch, workers):
        log.warning("resumed a streaming run on %d process(es) x %d workers with global batch %d (saved: %d x %d, "
                    "%d): a stream's position is exact only on the same shape; each worker skips its share of %d "
                    "micro-batches", world, workers, global_batch, saved_world, state.workers, saved_batch,
                    state.samples_in_epoch)  # fmt: skip
    elif saved_batch and saved_batch != global_batch:
        log.warning("the global batch changed from %d to %d samples (batch x accumulation x processes): continuing "
                    "the same sample order from global sample %d of epoch %d, in steps of the new size",
                    saved_batch, global_batch, state.samples_in_epoch, state.epoch)  # fmt: skip
    elif saved_world and saved_world != world:
        log.info("resumed on %d process(es) instead of %d with the same global batch of %d: every step holds the "
                 "same samples as before", world, saved_world, global_batch)  # fmt: skip
