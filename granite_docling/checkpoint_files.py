"""Which folders are checkpoints, of which format, and which is the newest: read from their small manifests,
without torch and without touching the optimizer state (see :mod:`granite_docling.checkpoint` for the layout).

``checkpoint.json`` is the last file a save writes: ``{"format": 2, "step": N, "epoch": E, "files": {...}}``.
A folder without it is no checkpoint of this format. A folder with only ``training_state.pt`` is one of the
older format, whose pickle is read only when the user trusts it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# In a folder of its own: vLLM loads every *.safetensors file at the top of a model folder as weights.
STATE_FILE = "training_state/state.json"  # the loop position, schedule, RNG and config; tensors by name
TENSORS_FILE = "training_state/tensors.safetensors"  # the training state's tensors
MANIFEST_FILE = "checkpoint.json"  # written last: format, step, epoch, file sizes
PICKLED_STATE_FILE = "training_state.pt"  # the older format: a pickle, read only when trusted
FORMAT = 2
CHECKPOINT_NAME = re.compile(r"^checkpoint_(epoch|step)_(\d+)$")
TRUST_HINT = "training.trust_checkpoint=true for train.py, trust_checkpoint=true for evaluate.py"


class CheckpointError(Exception):
    """A checkpoint that cannot be read as it is (incomplete, damaged, or pickled and not trusted); says what to do."""


class CheckpointSaveError(Exception):
    """A save that failed; its message names the folder and the cause in one line."""


def read_manifest(folder: Path) -> dict | None:
    """``checkpoint.json`` of a checkpoint in this format; None when it has none (or it does not parse)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def is_pickled_checkpoint(folder: Path) -> bool:
    """A checkpoint of the older format: its state is only in ``training_state.pt``."""
    return (Path(folder) / PICKLED_STATE_FILE).is_file() and read_manifest(folder) is None


def is_training_checkpoint(folder: Path) -> bool:
    return read_manifest(folder) is not None or is_pickled_checkpoint(folder)


def pickled_state_message(folder: Path) -> str:
    return (
        f"{folder} keeps its training state in {PICKLED_STATE_FILE}, the older pickled format: to read it, pass "
        f"{TRUST_HINT} (only tensors and plain values are taken from it, never code; checkpoints saved from then on "
        f"are in the new format)"
    )


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root`` that finished writing, oldest first: by the step in their manifest, then
    by time (checkpoints of the older format first, by time). Reads nothing but the manifests."""
    root = Path(root)
    if not root.is_dir():
        return []
    keyed = []
    for folder in root.iterdir():
        if not CHECKPOINT_NAME.match(folder.name):
            continue
        manifest = read_manifest(folder)
        try:
            if manifest is not None:
                keyed.append(((manifest["step"], folder.stat().st_mtime), folder))
            elif (folder / PICKLED_STATE_FILE).is_file():
                keyed.append(((-1, folder.stat().st_mtime), folder))
        except FileNotFoundError:  # rotated away while this looked
            continue
    return [folder for _, folder in sorted(keyed)]


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None
