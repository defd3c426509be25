"""Checkpoints that are complete HF model folders, plus everything needed to resume exactly, and nothing that
runs code when read.

A checkpoint folder holds what stock ``AutoModelForImageTextToText`` / ``AutoProcessor`` need (config,
safetensors weights, generation config, processor, tokenizer and chat template files; LoRA runs save merged
weights, and keep ``adapter/`` for resuming) and the training state, in two files no reader executes:

* ``training_state/tensors.safetensors``: its tensors (optimizer moments, torch RNG states);
* ``training_state/state.json``: the rest (loop position, scheduler, optimizer settings, Python / NumPy RNG
  states, the resolved config), naming its tensors by key; see :func:`pack_state`. (A folder of their own:
  vLLM takes every ``*.safetensors`` file at the top of a model folder for weights.)
* ``checkpoint.json``, written last: format, step, epoch and the size and content hash of every file. Listing,
  sorting and rotating checkpoints read only this file, never the optimizer state; resuming checks every file
  against it, and loading the model (``model.checkpoint=``, ``evaluate.py``, ``predict``) the model's files, so
  that a truncated or overwritten file is refused in one line, not trained or evaluated on. A model folder saved
  without a training state (``final_model``, ``initial_model``) has the manifest too.

Writes go to a hidden temporary folder that is flushed to the disk and renamed into place
(:mod:`granite_docling.atomic_folders`), so a crash, a SIGKILL or a power cut mid-save never leaves a folder that looks
complete. A save that fails (a full disk, no permission) removes its temporary folder, leaves every earlier
checkpoint as it was and raises :class:`CheckpointSaveError` with one line that says why.

Checkpoints written before this format keep their state in ``training_state.pt``, a pickle. They are read only
when the user asks for it (``training.trust_checkpoint=true`` for train.py, ``trust_checkpoint=true`` for
evaluate.py; otherwise :class:`CheckpointError` says how), and even then with ``weights_only=True`` and an
allow-list of NumPy's array types (:func:`read_pickled_state`): a crafted pickle is refused, never run.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

try:  # how NumPy arrays are unpickled (the RNG state of an older training_state.pt)
    from numpy._core.multiarray import _reconstruct as reconstruct
except ImportError:  # NumPy 1
    from numpy.core.multiarray import _reconstruct as reconstruct

from granite_docling.atomic_folders import describe_write_error, publish
from granite_docling.checkpoint_manifest import (
    MANIFEST_FILE,
    PICKLED_STATE_FILE,
    STATE_FILE,
    TENSORS_FILE,
    CheckpointError,
    CheckpointSaveError,
    DamagedCheckpointError,
    check_whole,
    complete_checkpoints,
    is_pickled_checkpoint,
    pickled_state_message,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
RESUME_ADVICE = "resume from an earlier checkpoint (training.resume=auto takes the newest whole one)"


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


def save_checkpoint(folder: Path, model, processor, training_state: dict | None = None) -> Path:
    """Write ``folder`` atomically and durably: model files, processor files, (unless None) the training state, and
    the manifest. On failure, raise :class:`CheckpointSaveError`; ``folder`` and every other checkpoint are
    then as they were, and no temporary folder is left."""
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_temporaries(folder)
        save_model_folder(tmp, model, processor)
        if training_state is not None:
            write_training_state(tmp, training_state)
        else:
            write_manifest(tmp)
        publish(tmp, folder)
    except (OSError, RuntimeError, SafetensorError) as error:  # a full disk, no permission, an I/O error
        shutil.rmtree(tmp, ignore_errors=True)
        reason = describe_write_error(error, folder)
        raise CheckpointSaveError(f"could not save checkpoint {folder}: {reason}") from error
    return folder


def remove_temporaries(folder: Path) -> None:
    """Remove what saves of ``folder`` killed mid-write left (``.<name>.tmp-<pid>``, and ``.<name>.old-<pid>``
    from a replacement); they never count as checkpoints, but they hold disk space. A replacement killed between
    its two renames left the only complete copy aside: it is put back first."""
    olds = sorted(folder.parent.glob(f".{folder.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not folder.exists():  # killed between moving the old copy aside and renaming the new one in
        olds.pop().rename(folder)
    for leftover in [*folder.parent.glob(f".{folder.name}.tmp-*"), *olds]:
        shutil.rmtree(leftover, ignore_errors=True)


def write_training_state(folder: Path, state: dict) -> None:
    """The state's tensors in safetensors, the rest in JSON, then the manifest (last)."""
    packed, tensors = pack_state(state)
    (folder / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / TENSORS_FILE)
    (folder / STATE_FILE).write_text(json.dumps(packed), encoding="utf-8")
    write_manifest(folder, state["loop"]["step"], state["loop"]["epoch"])


# Tags of :func:`pack_state`: the JSON objects that stand for what JSON has no type for.
_TENSOR = "__tensor__"
_NDARRAY = "__ndarray__"
_TUPLE = "__tuple__"
_ITEMS = "__items__"
_TAGS = (_TENSOR, _NDARRAY, _TUPLE, _ITEMS)


def pack_state(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``tree`` (dicts, lists, tuples, tensors, NumPy arrays, plain values) as JSON-ready data plus its tensors.

    A tensor becomes ``{"__tensor__": key}`` (``key`` its path in the tree, e.g. ``optimizer/state/3/exp_avg``),
    a NumPy array ``{"__ndarray__": values, "dtype": "<u4"}``, a tuple ``{"__tuple__": [...]}``, a dict whose keys
    are not all strings ``{"__items__": [[key, value], ...]}``. :func:`unpack_state` reverses it and builds
    nothing but those types: reading a checkpoint runs no code from it.
    """
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()  # safetensors refuses tensors that share memory (8-bit AdamW's shared qmaps)

    def pack(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            shared = tensor.untyped_storage().data_ptr() in storages
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[path] = tensor.clone() if shared else tensor
            return {_TENSOR: path}
        if isinstance(value, np.ndarray):
            return {_NDARRAY: value.tolist(), "dtype": value.dtype.str}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, tuple):
            return {_TUPLE: [pack(item, _child(path, i)) for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [pack(item, _child(path, i)) for i, item in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(key, str) and key not in _TAGS for key in value):
                return {key: pack(item, _child(path, key)) for key, item in value.items()}
            return {_ITEMS: [[pack(key, path), pack(item, _child(path, key))] for key, item in value.items()]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (at {path or 'the top'})")

    return pack(tree, ""), tensors


def _child(path: str, key: object) -> str:
    return f"{path}/{key}" if path else str(key)


def unpack_state(packed: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The tree :func:`pack_state` packed."""
    if isinstance(packed, list):
        return [unpack_state(item, tensors) for item in packed]
    if not isinstance(packed, dict):
        return packed
    if _TENSOR in packed:
        return tensors[packed[_TENSOR]]
    if _NDARRAY in packed:
        return np.array(packed[_NDARRAY], dtype=np.dtype(packed["dtype"]))
    if _TUPLE in packed:
        return tuple(unpack_state(item, tensors) for item in packed[_TUPLE])
    if _ITEMS in packed:
        return {unpack_state(key, tensors): unpack_state(item, tensors) for key, item in packed[_ITEMS]}
    return {key: unpack_state(item, tensors) for key, item in packed.items()}


def rotate_checkpoints(root: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; return what was deleted."""
    if keep is None:
        return []
    found = complete_checkpoints(root)
    removed = []
    for folder in found[: max(0, len(found) - keep)]:
        # Renamed out of sight first (atomic), then its manifest goes, then the rest: a process killed mid-delete
        # never leaves a folder that still has its manifest but lacks files.
        trash = folder.parent / f".{folder.name}.deleting-{os.getpid()}"
        try:
            folder.rename(trash)
        except OSError as error:  # not worth stopping the run for: the checkpoint just stays
            log.warning("could not remove old checkpoint %s: %s", folder, error)
            continue
        _delete(trash)
        removed.append(folder)
        log.info("removed old checkpoint %s (keeping %d)", folder, keep)
    for leftover in Path(root).glob(".checkpoint_*.deleting-*"):  # what a killed rotation left
        _delete(leftover)
    return removed


def _delete(folder: Path) -> None:
    """Remove a checkpoint folder, its manifest first: a kill during the delete leaves no manifest over holes."""
    (folder / MANIFEST_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def training_state(optimizer, scheduler, loop: dict, rng_states: list[dict], config_yaml: str, scaler=None) -> dict:
    """The training state a checkpoint saves; ``loop``: the loop's position as a plain dict (``dataclasses.asdict``
    of :class:`granite_docling.training_run.LoopState`), saved as state.json's ``loop``."""
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loop": dict(loop),
        "rng": rng_states,  # one per process, by rank
        "config": config_yaml,
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def load_training_state(folder: Path, trust_pickle: bool = False) -> dict:
    """The training state of checkpoint ``folder``, checked against its manifest. The older pickled format is
    read only with ``trust_pickle``; every other problem is a :class:`CheckpointError` that says what to do."""
    folder = Path(folder)
    if is_pickled_checkpoint(folder):
        if not trust_pickle:
            raise CheckpointError(pickled_state_message(folder))
        log.warning("reading %s, a pickle, because trust_checkpoint is set", folder / PICKLED_STATE_FILE)
        return read_pickled_state(folder / PICKLED_STATE_FILE)
    manifest = read_manifest(folder)
    if manifest is None:
        if (folder / STATE_FILE).is_file():
            message = f"{folder} has no {MANIFEST_FILE}, so it was not completely written"
            raise CheckpointError(f"{message}: resume from an earlier checkpoint")
        raise CheckpointError(
            f"{folder} has no {STATE_FILE}: it is a model folder, not a training checkpoint. To fine-tune from "
            f"it, set model.checkpoint={folder} instead of training.resume"
        )
    check_whole(folder, RESUME_ADVICE)
    packed = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    return unpack_state(packed, load_file(folder / TENSORS_FILE))


def read_pickled_state(path: Path) -> dict:
    """An older ``training_state.pt``, unpickled with ``weights_only=True``: tensors, plain values and the NumPy
    arrays of its RNG state are accepted, anything else (code a crafted file would run) is refused."""
    numpy_1_name = (reconstruct, "numpy.core.multiarray._reconstruct")  # how NumPy 1 wrote it
    allowed = [reconstruct, numpy_1_name, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"{path} holds more than tensors and plain values, so it is not read ({reason})"
        ) from error


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Restore trained weights from a checkpoint folder into the (possibly peft-wrapped) training model."""
    if hasattr(model, "merge_and_unload"):  # LoRA: the adapter is the trained state; base weights are the original
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, read_weights(folder / ADAPTER_DIR / "adapter_model.safetensors"))
        return
    state = {}
    for file in sorted(folder.glob("model*.safetensors")):  # model.safetensors or its shards
        state |= read_weights(file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings, not stored twice
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {folder} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a file that is not whole (a checkpoint of the older format has no
    manifest to check it against) is a :class:`DamagedCheckpointError` that names it."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        what = f"{path.name} cannot be read ({str(error).strip().splitlines()[0]})"
        raise DamagedCheckpointError(path.parent, what, RESUME_ADVICE) from error


def push_to_hub(folder: Path, repo_id: str, private: bool) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload fine-tuned granite-docling")
    log.info("pushed %s to https://huggingface.co/%s", folder, repo_id)
    return repo_id
