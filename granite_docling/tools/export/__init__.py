"""``granite-docling export RUNTIME CHECKPOINT OUT``: a checkpoint of ours in another runtime's own format.

    granite-docling export mlx outputs/run/final_model outputs/run/final_model-mlx [--quantize 4|8]
    granite-docling export gguf outputs/run/final_model outputs/run/final_model-gguf [--type f16|q8_0]

Each runtime's module (``mlx``: mlx-vlm, for Apple silicon and docling's MLX pipeline; ``gguf``: llama.cpp, for
llama-server, Ollama and LM Studio) writes the form its
converter reads (:mod:`~granite_docling.tools.export.untied`) into a temporary folder, calls the runtime's own converter
there, and publishes the result as OUT, whole or not at all. The checkpoint is only read. A folder that is not a
granite-docling model, a damaged checkpoint, an OUT that holds files (without ``--overwrite``) or a runtime that is
not installed ends the command with one ``error: ...`` line that says what to do.

A runtime module provides ``add_arguments(parser)`` (its own options) and ``export(checkpoint, out, args)``,
which returns the lines to print; the arguments every runtime shares are declared here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from granite_docling.checkpoint_manifest import MODEL_HINT, check_whole, model_folder_problem
from granite_docling.user_error import UserError

# runtime -> (module, one-line help)
RUNTIMES = {
    "mlx": (
        "granite_docling.tools.export.mlx",
        "MLX (Apple silicon; docling's MLX VLM pipeline), with mlx-vlm's converter",
    ),
    "gguf": ("granite_docling.tools.export.gguf", "GGUF (llama.cpp, Ollama, LM Studio), with llama.cpp's converter"),
}
EXPORT_HINT = "give a model folder saved by train.py (e.g. outputs/<run>/final_model)"
EXPORT_INFO = "export.json"  # written into OUT: where it came from, which converter, what the copy changed


class ExportError(UserError):
    """A checkpoint that cannot be exported as asked, or a runtime that is missing; the message says what to do."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    runtimes = parser.add_subparsers(dest="runtime", metavar="RUNTIME", required=True)
    for name, (module_name, help_text) in RUNTIMES.items():
        sub = runtimes.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("checkpoint", type=Path, help="model folder saved by train.py (e.g. outputs/run/final_model)")
        sub.add_argument("out", type=Path, help="folder to write the exported model to (must be empty or new)")
        sub.add_argument("--overwrite", action="store_true", help="replace OUT if it holds files")
        importlib.import_module(module_name).add_arguments(sub)
        sub.set_defaults(export_module=module_name)


def run(args: argparse.Namespace) -> int:
    checkpoint = checked_checkpoint(args.checkpoint)
    out = checked_out(args.out, checkpoint, args.overwrite)
    module = importlib.import_module(args.export_module)
    for line in module.export(checkpoint, out, args):
        print(line)
    return 0


def checked_checkpoint(checkpoint: Path) -> Path:
    """``checkpoint`` when it is a granite-docling model folder whose files are whole; else :class:`ExportError`."""
    if not checkpoint.is_dir():
        raise ExportError(f"{checkpoint}: no such folder; {EXPORT_HINT}")
    problem = model_folder_problem(None, str(checkpoint))
    if problem is not None:
        raise ExportError(problem.removesuffix(MODEL_HINT) + EXPORT_HINT)
    check_whole(checkpoint, "export a checkpoint whose files are whole (an earlier one, or final_model)", True)
    return checkpoint


def checked_out(out: Path, checkpoint: Path, overwrite: bool) -> Path:
    """``out`` when the export may write it: not the checkpoint nor inside it, and new or empty (or ``overwrite``)."""
    resolved = out.resolve()
    source = checkpoint.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise ExportError(f"{out}: the export would write into the checkpoint {checkpoint}; choose another folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; give a folder to write the exported model to")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already holds files; choose another folder or pass --overwrite")
    return out


def staging_folder(out: Path) -> tempfile.TemporaryDirectory:
    """A temporary folder beside ``out`` (same disk, so OUT is published by a rename), removed when done."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{out.name}.export-", dir=out.parent)


def run_converter(command: list[str], what: str) -> None:
    """Run a runtime's converter, its output going to this terminal; :class:`ExportError` when it fails."""
    done = subprocess.run(command, env=converter_environment())
    if done.returncode != 0:
        raise ExportError(f"{what} failed with exit code {done.returncode} (its output is above): {' '.join(command)}")


def converter_environment() -> dict[str, str]:
    """The converters read local folders only: no hub look-ups (an offline machine would wait on them)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


class Probe(NamedTuple):
    """What a runtime's probe script said: it exits 0 printing what it found (a version), 3 printing the module
    it could not import."""

    code: int  # the exit code
    found: str  # its stripped stdout
    last: str  # its last stderr line

    def outcome(self, missing: str, broken: str) -> tuple[str | None, str]:
        """(what was found, "") when the probe succeeded, else (None, ``missing`` for exit code 3, else ``broken``)."""
        if self.code == 0 and self.found:
            return self.found, ""
        return None, missing if self.code == 3 else broken


def run_probe(python: str, script: str) -> Probe:
    """Run ``script`` in ``python``."""
    done = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=300)
    return Probe(done.returncode, done.stdout.strip(), (done.stderr.strip().splitlines() or ["no output"])[-1])


def runtime_python(given: Path | None, default: Path, probe, install: str) -> tuple[str, str]:
    """(the Python that runs a runtime's converter, what ``probe`` found in it): ``given``, else this interpreter,
    else ``default`` (the venv its make target builds). ``probe(python)`` returns (a non-empty finding such as the
    runtime's version, or None; what is wrong when None). :class:`ExportError` in one line ending in ``install``
    when no candidate has the runtime."""
    if given is not None and not given.is_file():
        raise ExportError(f"--python {given}: no such file; give the python of an environment with the converter")
    candidates = [given] if given is not None else [Path(sys.executable), default]
    problems = []
    for python in candidates:
        if not python.is_file():
            continue
        found, problem = probe(str(python))
        if found is not None:
            return os.path.abspath(python), found
        problems.append(problem)
    raise ExportError(f"{'; '.join(problems)}: {install}")


def folder_size(folder: Path) -> int:
    """Bytes in the files under ``folder``."""
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())


def write_export_info(out: Path, info: dict) -> None:
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
