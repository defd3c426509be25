"""Which folders are checkpoints, of which format, and which is the newest: read from their small manifests,
without torch and without touching the optimizer state (see :mod:`granite_docling.checkpoint` for the layout);
whether a folder's files are still the ones it was saved with; whether a folder is a model this project can load.

``checkpoint.json`` is the last file a save writes: ``{"format": 3, "step": N, "epoch": E, "files": {...}}``,
every file with its size and content hash (``{"bytes": n, "xxh3_128": hex}``; format 2 listed sizes alone and is
still read). A model folder saved without a training state (``final_model``, ``initial_model``) has the same
manifest without ``step`` and ``epoch``. A training checkpoint without it is not of this format: one with only
``training_state.pt`` is of the older format, whose pickle is read only when the user trusts it. A model folder
without it (a hub download, someone else's model) loads as it is.

:func:`check_whole` refuses a folder whose files differ from its manifest (truncated, overwritten, missing) in
one line that names the file; :func:`model_folder_problem` names what makes a folder no model to load (missing,
no ``config.json``, another architecture, a folder that asks to run its own code) before torch is imported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from granite_docling.atomic_folders import damaged_files, file_records
from granite_docling.config import HUB_ID
from granite_docling.user_error import UserError

# In a folder of its own: vLLM loads every *.safetensors file at the top of a model folder as weights.
STATE_FILE = "training_state/state.json"  # the loop position, schedule, RNG and config; tensors by name
TENSORS_FILE = "training_state/tensors.safetensors"  # the training state's tensors
STATE_DIR = "training_state/"  # what resuming reads beyond the model's files
MANIFEST_FILE = "checkpoint.json"  # written last: format, step, epoch, every file's size and content hash
PICKLED_STATE_FILE = "training_state.pt"  # the older format: a pickle, read only when trusted
FORMAT = 3  # 3: sizes and content hashes; 2: sizes alone
READABLE_FORMATS = (2, 3)
MODEL_TYPE = "idefics3"  # granite-docling's architecture (Idefics3ForConditionalGeneration), the one loaded here
CHECKPOINT_NAME = re.compile(r"^checkpoint_(epoch|step)_(\d+)$")
TRUST_HINT = "training.trust_checkpoint=true for train.py, trust_checkpoint=true for evaluate.py"


class CheckpointError(UserError):
    """A checkpoint that cannot be read as it is (incomplete, damaged, or pickled and not trusted); says what to do."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are not the ones it was saved with (truncated, overwritten, missing)."""

    def __init__(self, folder: Path, what: str, advice: str):
        super().__init__(f"checkpoint {folder} is damaged: {what}; {advice}")
        self.folder = folder
        self.what = what  # which files, and what is wrong with them


class CheckpointSaveError(UserError):
    """A save that failed; its message names the folder and the cause in one line."""


def folder_manifest(folder: Path) -> dict | None:
    """``checkpoint.json`` of a folder saved by this project, training checkpoint or model folder; None when it
    has none (or it does not parse)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    readable = isinstance(manifest, dict) and manifest.get("format") in READABLE_FORMATS
    return manifest if readable and isinstance(manifest.get("files"), dict) else None


def read_manifest(folder: Path) -> dict | None:
    """``checkpoint.json`` of a training checkpoint in this format; None when it has none, or when the folder is a
    model folder saved without a training state."""
    manifest = folder_manifest(folder)
    return manifest if manifest is not None and "step" in manifest else None


def write_manifest(folder: Path, step: int | None = None, epoch: int | None = None) -> None:
    """``checkpoint.json`` for every file now in ``folder`` (hashed here): the last file a save writes. ``step``
    and ``epoch`` for a training checkpoint, None for a model folder alone."""
    manifest: dict = {"format": FORMAT}
    if step is not None:
        manifest |= {"step": step, "epoch": epoch}
    manifest["files"] = file_records(Path(folder))
    (Path(folder) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def check_whole(folder: Path, advice: str, model_only: bool = False) -> None:
    """Raise :class:`DamagedCheckpointError` when a file that ``folder``'s manifest lists is missing, of another size or
    of other bytes (the first three named, and ``advice``). ``model_only``: the files a model loader reads, not the
    training state. A folder without a manifest (someone else's model, the older format) passes."""
    manifest = folder_manifest(folder)
    if manifest is None:
        return
    files = manifest["files"]
    names = {name for name in files if not name.startswith(STATE_DIR)} if model_only else None
    wrong = damaged_files(Path(folder), files, names)
    if wrong:
        raise DamagedCheckpointError(folder, ", ".join(wrong[:3]), advice)


def looks_like_hub_id(value: str) -> bool:
    """True for a 'name' or 'org/name' that is not a path here: from_pretrained and load_dataset look it up on the
    hub. '/data', './x', 'a/b/c' are local paths."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(value).exists():
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


MODEL_HINT = f"give a model folder with config.json (e.g. outputs/<run>/final_model) or a hub id such as {HUB_ID}"


def model_folder_problem(key: str | None, value: str | None) -> str | None:
    """What makes ``value`` (named ``key`` in the message, when given) no model folder to load: missing, no
    ``config.json``, a ``config.json`` of another architecture or none, or one that asks to run its own code
    (``auto_map``: a folder's code is never run here). None for a hub id (checked when it is downloaded) and
    for a granite-docling model folder."""
    if value is None or looks_like_hub_id(value):
        return None
    given = f"{key}={value}" if key else value
    path = Path(value)
    if not path.exists():
        return f"{given}: no such folder; {MODEL_HINT}"
    if not (path / "config.json").is_file():
        return f"{given} is not a model folder (no config.json); {MODEL_HINT}"
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{given}: its config.json cannot be read as JSON ({str(error).splitlines()[0]}); {MODEL_HINT}"
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        return f"{given}: its config.json names no model_type, so it describes no model; {MODEL_HINT}"
    if "auto_map" in config:
        return (
            f"{given}: its config.json asks to run the folder's own code (auto_map), which granite-docling never "
            f"does; {MODEL_HINT}"
        )
    if model_type != MODEL_TYPE:
        return (
            f"{given} holds a {model_type!r} model, not granite-docling's architecture (model_type "
            f"{MODEL_TYPE!r}); {MODEL_HINT}"
        )
    return None


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
